"""Several gateways over one fleet: what they share through Redis (``[cluster]``).

``client`` owns the connection and says whether Redis answers; ``lease`` is the sync's
fleet-wide lock with a fencing number; ``record`` keeps the last sync run and manifest;
``peers`` publishes this gateway's view of the nodes and reads the others'. With the
cluster off none of this runs and nothing needs Redis. The cluster imports only the core;
the gateway, the sync service and ``service.py`` use it.
"""
