"""Offline fleets: `olmd models export` and `import`, and a sync with the registry gone."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from daemon.emulator.registry import EmulatedRegistry
from daemon.settings import load_settings
from tests.distribution.support import fleet, gateway_settings, listed, olmd, publish
from tests.helpers import run_cli, write_settings


@pytest.fixture
async def registry() -> AsyncIterator[EmulatedRegistry]:
    async with EmulatedRegistry() as reg:
        yield reg


async def test_a_site_without_internet_is_seeded_from_a_disk(
    tmp_path: Path, registry: EmulatedRegistry, capsys: pytest.CaptureFixture[str]
) -> None:
    digests = publish(registry, ["llama3.1:8b"])
    # A connected site fills its cache and exports the model to a disk.
    online = tmp_path / "online"
    online.mkdir()
    data = gateway_settings(online, registry, [], models=["llama3.1:8b"])
    online_file = write_settings(online / "settings.toml", data)
    async with olmd(load_settings(online_file)) as server:
        from daemon.distribution.component import DISTRIBUTION

        await server.app[DISTRIBUTION].ensure("llama3.1:8b")
    disk = tmp_path / "disk"
    code, out, _ = await run_cli(
        capsys, "models", "--config", str(online_file), "export", "llama3.1:8b", str(disk)
    )
    assert code == 0, out
    assert f"exported llama3.1:8b sha256:{digests['llama3.1:8b']}" in out
    await registry.stop()  # the offline site has no registry
    offline = tmp_path / "offline"
    offline.mkdir()
    async with fleet(2) as nodes:
        data = gateway_settings(offline, registry, nodes, models=["llama3.1:8b"])
        path = write_settings(offline / "settings.toml", data)
        code, out, _ = await run_cli(capsys, "models", "--config", str(path), "import", str(disk))
        assert code == 0, out
        async with olmd(load_settings(path)):
            code, out, err = await run_cli(capsys, "sync", "--config", str(path))
            assert code == 0, out + err
            for _, emu in nodes:
                assert await listed(emu) == {"llama3.1:8b": digests["llama3.1:8b"]}


async def test_an_import_refuses_a_blob_that_does_not_match_its_digest(
    tmp_path: Path, registry: EmulatedRegistry, capsys: pytest.CaptureFixture[str]
) -> None:
    publish(registry, ["llama3.1:8b"])
    data = gateway_settings(tmp_path, registry, [], models=["llama3.1:8b"])
    path = write_settings(tmp_path / "settings.toml", data)
    async with olmd(load_settings(path)) as server:
        from daemon.distribution.component import DISTRIBUTION

        cached = await server.app[DISTRIBUTION].ensure("llama3.1:8b")
    disk = tmp_path / "disk"
    code, _, _ = await run_cli(
        capsys, "models", "--config", str(path), "export", "llama3.1:8b", str(disk)
    )
    assert code == 0
    digest = cached.blobs[0][0]
    blob = disk / "blobs" / digest.replace(":", "-")
    blob.write_bytes(b"x" + blob.read_bytes()[1:])
    other = tmp_path / "other"
    other.mkdir()
    data = gateway_settings(other, registry, [], models=["llama3.1:8b"])
    other_file = write_settings(other / "settings.toml", data)
    code, out, _ = await run_cli(capsys, "models", "--config", str(other_file), "import", str(disk))
    assert code == 1
    assert f"refused llama3.1:8b: blob {digest}" in out
    assert not (other / "cache" / "blobs" / digest.replace(":", "-")).exists()
    assert not list((other / "cache" / "manifests").rglob("8b"))
