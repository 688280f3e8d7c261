"""The cluster's Redis client against a real redis-server: up, down, and back."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from daemon.cluster.client import Cluster, ClusterDown, from_settings
from daemon.metrics import Metrics
from daemon.settings import ClusterSettings, Settings, SettingsError, load_settings
from tests.helpers import RedisServer, eventually


async def test_connected_follows_redis_going_and_coming_back(redis_server: RedisServer) -> None:
    metrics = Metrics(CollectorRegistry())
    cluster = Cluster(ClusterSettings(name="gw-1", redis_timeout=0.5), redis_server.url, metrics)
    await cluster.start()
    try:
        assert cluster.connected
        assert await cluster.call(lambda r: r.set(cluster.key("x"), "1")) is True
        await redis_server.stop()
        with pytest.raises(ClusterDown):
            await cluster.call(lambda r: r.get(cluster.key("x")))
        assert not cluster.connected
        assert metrics.cluster_connected._value.get() == 0
        await redis_server.start()
        await eventually(lambda: cluster.connected, timeout=5)
        assert metrics.cluster_connected._value.get() == 1
    finally:
        await cluster.stop()


def test_the_cluster_needs_a_redis_url_from_the_environment(tmp_path, monkeypatch) -> None:
    settings_file = tmp_path / "s.toml"
    settings_file.write_text("[cluster]\nenabled = true\n")
    with pytest.raises(SettingsError, match="OLMD_REDIS_URL"):
        load_settings(settings_file)
    monkeypatch.setenv("OLMD_REDIS_URL", "redis://:s3cret-pass@127.0.0.1:1/0")
    settings = load_settings(settings_file)
    assert from_settings(settings) is not None
    shown = str(settings.public_dict())
    assert "s3cret-pass" not in shown and "OLMD_REDIS_URL" in shown
    settings_file.write_text('redis_url = "redis://x"\n')
    with pytest.raises(SettingsError, match="secrets belong in the environment"):
        load_settings(settings_file)
    assert from_settings(Settings()) is None  # off by default: nothing needs Redis
