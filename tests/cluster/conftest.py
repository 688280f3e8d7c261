"""Fixtures the cluster tests share."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from daemon.cluster.client import Cluster
from daemon.settings import ClusterSettings
from tests.helpers import RedisServer


@pytest.fixture
async def clusters(redis_server: RedisServer) -> AsyncIterator[tuple[Cluster, Cluster]]:
    """Two gateways' handles, gw-a and gw-b, on the test's Redis server."""
    a = Cluster(ClusterSettings(name="gw-a", redis_timeout=0.3), redis_server.url)
    b = Cluster(ClusterSettings(name="gw-b", redis_timeout=0.3), redis_server.url)
    try:
        yield a, b
    finally:
        await a.stop()
        await b.stop()
