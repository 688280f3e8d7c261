"""[distribution] settings: defaults, and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon.settings import SettingsError, load_settings
from tests.helpers import write_settings


def test_direct_mode_is_the_default_and_paths_count_from_the_file(tmp_path: Path) -> None:
    path = write_settings(tmp_path / "s.toml", {"distribution": {"cache_dir": "cache"}})
    settings = load_settings(path)
    assert settings.distribution.mode == "direct"
    assert settings.distribution.registry == "https://registry.ollama.ai"
    assert settings.distribution.cache_dir == tmp_path / "cache"
    assert settings.advertise_url() == "http://127.0.0.1:11435"


@pytest.mark.parametrize(
    ("section", "problem"),
    [
        ({"mode": "mirror"}, "distribution.mode: Input should be 'direct' or 'gateway'"),
        ({"registry": "ftp://x"}, "distribution.registry: String should match pattern"),
        ({"max_cache_gb": 0}, "distribution.max_cache_gb: Input should be greater than 0"),
        ({"advertise_url": "10.0.0.5:11435"}, "distribution.advertise_url: String should"),
    ],
)
def test_a_bad_value_names_its_key(tmp_path: Path, section: dict, problem: str) -> None:
    path = write_settings(tmp_path / "s.toml", {"distribution": section})
    with pytest.raises(SettingsError) as caught:
        load_settings(path)
    assert any(line.startswith(problem) for line in caught.value.problems), caught.value.problems


def test_gateway_mode_on_every_address_needs_an_advertise_url(tmp_path: Path) -> None:
    data = {"server": {"host": "0.0.0.0"}, "distribution": {"mode": "gateway"}}
    with pytest.raises(SettingsError, match=r"distribution\.advertise_url: gateway mode needs"):
        load_settings(write_settings(tmp_path / "s.toml", data))
    data["distribution"]["advertise_url"] = "http://10.0.0.5:11435"
    assert load_settings(write_settings(tmp_path / "s.toml", data)).advertise_url() == (
        "http://10.0.0.5:11435"
    )
