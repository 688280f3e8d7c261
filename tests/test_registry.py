"""Plugins by name: built-ins, third parties from entry points, clear errors."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

from daemon import registry
from daemon.ports import NodeT
from daemon.settings import SettingsError, load_settings


class FirstBalancer:
    """A third-party balancer: always the first candidate."""

    def choose(self, candidates: Sequence[NodeT]) -> NodeT:
        return candidates[0]


@pytest.fixture
def third_party(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An installed distribution (a real .dist-info on sys.path) declaring a balancer."""
    info = tmp_path / "olmd_first-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: olmd-first\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(
        "[olmd.balancers]\nfirst = tests.test_registry:FirstBalancer\n"
        "broken = tests.no_such_module:Nothing\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))


def test_builtins_are_listed_first() -> None:
    assert registry.names("balancers")[:3] == ["round_robin", "weighted", "least_busy"]
    assert registry.names("transports")[:2] == ["http", "ssh"]


def test_third_party_balancer_from_an_entry_point(third_party, tmp_path: Path) -> None:
    assert "first" in registry.names("balancers")
    assert registry.load("balancers", "first") is FirstBalancer
    settings_file = tmp_path / "s.toml"
    settings_file.write_text('[routing]\nstrategy = "first"\n')
    assert load_settings(settings_file).routing.strategy == "first"


def test_errors_name_the_plugin_and_the_choices(third_party) -> None:
    with pytest.raises(registry.PluginError, match=r"unknown balancer 'fastest'.*round_robin"):
        registry.load("balancers", "fastest")
    with pytest.raises(registry.PluginError, match=r"cannot import 'tests\.no_such_module'"):
        registry.load("balancers", "broken")
    with pytest.raises(registry.PluginError, match="unknown plugin kind"):
        registry.names("gizmos")


def test_unknown_strategy_in_settings_lists_the_choices(tmp_path: Path) -> None:
    settings_file = tmp_path / "s.toml"
    settings_file.write_text('[routing]\nstrategy = "first"\n')
    with pytest.raises(SettingsError, match="least_busy"):
        load_settings(settings_file)
