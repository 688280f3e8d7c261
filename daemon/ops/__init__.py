"""Environment checks for operators: facts (local or over SSH), health reports, smoke tests.

``envcheck`` gathers facts (``runners``: locally or over SSH) and judges them against
thresholds, ``report`` renders and writes the health report, ``smoke`` sends a prompt and
checks every node's API. Ops imports only the core; never the gateway, sync, the emulator
or the CLI.
"""
