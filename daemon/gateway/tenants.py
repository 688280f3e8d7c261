"""Tenancy on the HTTP side: who a request's key (or a trusted proxy's header) names, the
429 in each route's dialect, and the component that owns the usage record.

The guard calls :func:`identify` for every request it lets through to the LLM and catalog
routes; the tenant's name then travels in ``request[TENANT]``. The proxy admits, routes
and finishes the request with :class:`~daemon.tenancy.tenancy.Tenancy`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
from collections.abc import AsyncIterator, Callable

from aiohttp import web

from daemon.cluster.client import CLUSTER
from daemon.cluster.quota import SharedQuota
from daemon.gateway.component import GATEWAY
from daemon.gateway.wire import TENANT
from daemon.logs import get_logger
from daemon.runtime import RUNTIME
from daemon.settings import DEFAULT_TENANT, Settings
from daemon.tenancy.keys import KeysFileError
from daemon.tenancy.tenancy import Tenancy

__all__ = ["TENANCY", "identify", "tenancy_component"]

log = get_logger("olmd.tenancy")

TENANCY = web.AppKey("tenancy", Tenancy)
_SHARE_EVERY = 0.5
Error = Callable[..., web.Response]


def _trusted(
    request: web.Request, networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
) -> bool:
    try:
        address = ipaddress.ip_address(request.remote or "")
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in networks)


def identify(
    request: web.Request,
    tenancy: Tenancy,
    token: bytes | None,
    is_admin: Callable[[bytes], bool],
    error: Error,
) -> web.Response | None:
    """Name the tenant in ``request[TENANT]``, or the refusal (401 without a valid key,
    403 for a trusted header naming no tenant)."""
    required = tenancy.keys_required
    if token is not None and required:
        tenant = tenancy.tenant_of_key(token)
        if tenant is None and is_admin(token):
            tenant = DEFAULT_TENANT
        if tenant is None:
            return _unauthorised(error)
        request[TENANT] = tenant
        return None
    header = tenancy.settings.server.tenant_header
    if header:
        name = request.headers.get(header)
        if name and _trusted(request, tenancy.trusted):
            if not tenancy.known(name):
                return error(403, f"{header} names no tenant olmd knows")
            request[TENANT] = name
            return None
    if required and not (token is not None and is_admin(token)):
        return _unauthorised(error)
    request[TENANT] = DEFAULT_TENANT
    return None


def _unauthorised(error: Error) -> web.Response:
    return error(401, "missing or invalid API key", **{"WWW-Authenticate": 'Bearer realm="olmd"'})


async def tenancy_component(app: web.Application) -> AsyncIterator[None]:
    """Tenants, keys and usage: the record read at start, saved every ``flush_seconds``
    and at stop; the proxy admits requests through it while tenancy is on."""
    runtime = app[RUNTIME]
    settings = runtime.settings
    try:
        tenancy = Tenancy(settings, runtime.metrics)
        tenancy.load_record()
    except (KeysFileError, ValueError) as exc:
        raise RuntimeError(f"tenancy cannot start: {exc}") from None
    app[TENANCY] = tenancy
    cluster = app.get(CLUSTER)
    if cluster is not None:  # limits, budgets and usage shared through Redis
        tenancy.shared = SharedQuota(cluster)
        tenancy.book.collect = True
    proxy = app[GATEWAY].proxy

    def attach() -> None:
        proxy.tenancy = tenancy if tenancy.enabled else None

    async def reload(new: Settings) -> None:
        tenancy.configure(new)  # a keys file others can read is refused: old keys stay
        attach()

    async def flush() -> None:
        # The cluster gets usage and settled answers every half second at most; the
        # record is written every flush_seconds.
        saved = asyncio.get_running_loop().time()
        while True:
            every = tenancy.settings.usage.flush_seconds
            await asyncio.sleep(min(every, _SHARE_EVERY) if tenancy.shared else every)
            await tenancy.flush_shared()
            if asyncio.get_running_loop().time() - saved >= every:
                saved = asyncio.get_running_loop().time()
                try:
                    tenancy.save_record()
                except OSError as exc:
                    log.warning("usage_record_not_saved", error=str(exc))

    attach()
    runtime.on_reload.append(reload)
    task = asyncio.create_task(flush(), name="usage-flush")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        runtime.on_reload.remove(reload)
        proxy.tenancy = None
        with contextlib.suppress(Exception):  # Redis may be gone: the record keeps it
            await tenancy.flush_shared()
        try:
            tenancy.save_record()
        except OSError as exc:
            log.warning("usage_record_not_saved", error=str(exc))
        tenancy.close()
