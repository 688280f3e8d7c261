"""The HTTP side: the application, the guard, the proxy and everything it routes with.

``app`` builds the aiohttp application; ``component`` owns the lifetime of the connection
pool, fleet, router and prober. The gateway imports the core (``daemon.settings``,
``daemon.domain``, ...) and, for ``/admin/sync``, the sync service
(``daemon.sync.service``); nothing of ``daemon.ops``, ``daemon.emulator`` or the CLI.
"""
