"""The ``olmd`` command line: the parser and one module per group of subcommands.

``main`` builds the parser and is the only module that imports the subcommand modules
(``sync``, ``ops``, ``demo``); they take exit codes and helpers from ``common``. The CLI
composes the rest and may import any part of the daemon.
"""
