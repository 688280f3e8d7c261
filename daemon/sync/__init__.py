"""Model sync: plan, pull with retries inside the download window, write the manifest.

``service`` is the one entry point (the CLI, the scheduler and ``/admin/sync`` call it);
``engine`` runs a plan (``watchdog`` cancels a stalled pull), ``plan`` is the pure half,
``inventory`` reads what the nodes hold, ``manifest`` is the file's model and atomic
write, ``run_manifest`` assembles a run's manifest, ``state`` holds the lock and the last
run, ``scheduler`` fires the nightly run. With the cluster on, ``claim`` holds the
fleet-wide sync lease for a run and writes what it does under its fencing number, and
``shared`` reads the fleet's run record for every gateway's status and metrics. Sync
imports only the core and the cluster; never the gateway, ops, the emulator or the CLI.
"""
