from __future__ import annotations

import json
from pathlib import Path

import pytest

from daemon.cli.main import main
from daemon.settings import SettingsError, load_settings
from tests.conftest import ROOT

GUIDE_JSON = {
    "services": {
        "ollama": {
            "scheme": "http",
            "host": "olm.example.org",
            "port": 11434,
            "health_timeout": 10,
            "baseline_models": ["gpt-oss:20b", "qwen3-coder:30b"],
            "fallback_models": ["llama3.1:8b", "mistral-nemo:12b"],
            "download": {
                "data_root": "~/.ollama",
                "retry": {"max_attempts": 3, "backoff_seconds": 20},
                "allowed_window": "02:00-06:00 UTC+8",
                "max_parallel_jobs": 1,
            },
        }
    },
    "jobs": {
        "ollama_sync": {
            "enabled": True,
            "schedule_cron": "0 3 * * *",
            "manifest_path": "docs/deployment/ollama-models-manifest.json",
        }
    },
}


def write(tmp_path: Path, text: str, name: str = "settings.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_shipped_settings_are_valid(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--config", str(ROOT / "settings.toml"), "config", "check"]) == 0
    assert "settings OK: 1 node(s)" in capsys.readouterr().out
    settings = load_settings(ROOT / "settings.toml")
    assert settings.server.port == 11435
    assert settings.routing.strategy == "adaptive"
    assert str(settings.services.ollama.download.allowed_window) == "02:00-06:00 UTC+8"
    assert settings.models() == [
        "gpt-oss:20b",
        "qwen3-coder:30b",
        "llama3.1:8b",
        "mistral-nemo:12b",
    ]


def test_no_file_gives_defaults_and_one_node() -> None:
    settings = load_settings()
    [node] = settings.nodes()
    assert (node.host, node.port, node.weight) == ("127.0.0.1", 11434, 1)
    assert settings.server.host == "127.0.0.1"


def test_guide_json_is_accepted(tmp_path: Path) -> None:
    path = write(tmp_path, json.dumps(GUIDE_JSON), "config.json")
    settings = load_settings(path)
    assert settings.nodes()[0].host == "olm.example.org"
    assert settings.services.ollama.download.retry.backoff_seconds == 20


BROKEN = [
    ("wrong type", "[server]\nport = 'eleven'\n", "server.port"),
    ("port range", "[server]\nport = 70000\n", "server.port"),
    (
        "bad window hour",
        '[services.ollama.download]\nallowed_window = "25:00-06:00 UTC+8"\n',
        "services.ollama.download.allowed_window",
    ),
    (
        "bad window zone",
        '[services.ollama.download]\nallowed_window = "02:00-06:00 Mars/Base"\n',
        "services.ollama.download.allowed_window",
    ),
    (
        "bad cron",
        '[jobs.ollama_sync]\nschedule_cron = "0 27 * * *"\n',
        "jobs.ollama_sync.schedule_cron",
    ),
    (
        "cron fields",
        '[jobs.ollama_sync]\nschedule_cron = "every night"\n',
        "jobs.ollama_sync.schedule_cron",
    ),
    (
        "weight 0",
        '[[services.ollama.nodes]]\nname = "a"\nhost = "h"\nweight = 0\n',
        "services.ollama.nodes[0].weight",
    ),
    (
        "duplicate names",
        (
            '[[services.ollama.nodes]]\nname = "a"\nhost = "h1"\n'
            '[[services.ollama.nodes]]\nname = "a"\nhost = "h2"\n'
        ),
        "services.ollama.nodes",
    ),
    ("unknown key", "[server]\nprot = 1\n", "server.prot"),
    ("unknown section", "[serverz]\nport = 1\n", "serverz"),
    ("unknown strategy", '[routing]\nstrategy = "fastest"\n', "routing.strategy"),
    (
        "negative timeout",
        "[services.ollama]\nhealth_timeout = -1\n",
        "services.ollama.health_timeout",
    ),
    (
        "hostile model name",
        '[services.ollama]\nbaseline_models = ["x; rm -rf /"]\n',
        "services.ollama.baseline_models[0]",
    ),
    ("secret in file", 'api_keys = "abc"\n', "api_keys"),
    ("not toml", "[server\nport = 1\n", "not valid TOML"),
]


@pytest.mark.parametrize(
    ("text", "key"), [(t, k) for _, t, k in BROKEN], ids=[b[0] for b in BROKEN]
)
def test_broken_file_exits_2_naming_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, key: str
) -> None:
    path = write(tmp_path, text)
    assert main(["--config", str(path), "config", "check"]) == 2
    err = capsys.readouterr().err
    assert key in err
    assert str(path) in err


@pytest.mark.parametrize(
    ("mutate", "key"),
    [
        (lambda d: d["services"]["ollama"].update(port="11434x"), "services.ollama.port"),
        (
            lambda d: d["services"]["ollama"]["download"].update(allowed_window="02:00 to 06:00"),
            "services.ollama.download.allowed_window",
        ),
        (
            lambda d: d["services"]["ollama"]["download"]["retry"].update(max_attempts=0),
            "services.ollama.download.retry.max_attempts",
        ),
        (
            lambda d: d["jobs"]["ollama_sync"].update(enabled="sometimes"),
            "jobs.ollama_sync.enabled",
        ),
    ],
    ids=["port", "window", "attempts", "enabled"],
)
def test_broken_guide_json_names_the_key(tmp_path: Path, capsys, mutate, key: str) -> None:
    data = json.loads(json.dumps(GUIDE_JSON))
    mutate(data)
    path = write(tmp_path, json.dumps(data), "config.json")
    assert main(["--config", str(path), "config", "check"]) == 2
    assert key in capsys.readouterr().err


def test_truncated_json_is_reported(tmp_path: Path) -> None:
    path = write(tmp_path, json.dumps(GUIDE_JSON)[:-5], "config.json")
    with pytest.raises(SettingsError, match="not valid JSON"):
        load_settings(path)


def test_error_names_value_and_expectation(tmp_path: Path) -> None:
    path = write(tmp_path, '[services.ollama.download]\nallowed_window = "25:00-06:00 UTC+8"\n')
    with pytest.raises(SettingsError) as caught:
        load_settings(path)
    [problem] = caught.value.problems
    assert "25:00-06:00 UTC+8" in problem
    assert "HH:MM" in problem


def test_precedence_file_then_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, "[server]\nport = 9000\ndrain_timeout = 5\n")
    assert load_settings(path).server.port == 9000
    monkeypatch.setenv("OLMD_SERVER__PORT", "9100")
    settings = load_settings(path)
    assert settings.server.port == 9100
    assert settings.server.drain_timeout == 5  # the file's other keys survive the merge


def test_config_file_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, "[server]\nport = 9200\n", "other.toml")
    monkeypatch.setenv("OLMD_CONFIG", str(path))
    assert load_settings().server.port == 9200


def test_missing_explicit_file_is_an_error(tmp_path: Path, capsys) -> None:
    assert main(["--config", str(tmp_path / "nope.toml"), "config", "check"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_unknown_environment_variable_is_a_warning(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("OLMD_SERVR__PORT", "1")  # no such section: maybe not olmd's at all
    assert load_settings().server.port == 11435
    err = capsys.readouterr().err
    assert "OLMD_SERVR__PORT" in err and "OLMD_SERVER__PORT (server.port)" in err


def test_misspelt_environment_key_names_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OLMD_ROUTING__STRATEGYY", "x")
    with pytest.raises(SettingsError, match=r"did you mean routing\.strategy\?"):
        load_settings()


def test_bad_environment_value_names_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OLMD_ROUTING__STRATEGY", "random")
    with pytest.raises(SettingsError, match=r"routing\.strategy"):
        load_settings()


def test_secrets_from_dotenv_override_and_stay_masked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / ".env").write_text(
        "OLMD_API_KEYS=key-alpha-123, key-beta-4567\nOLMD_ADMIN_TOKEN=admin-secret-99\n"
        "OLLAMA_REMOTE_HOST=gpu.example.net\nOLLAMA_REMOTE_PORT=11500\n"
        "OLLAMA_SSH_KEY_PATH=/keys/id_olmd\nUNRELATED=1\n"
    )
    settings = load_settings()
    assert [k.get_secret_value() for k in settings.api_keys] == ["key-alpha-123", "key-beta-4567"]
    [node] = settings.nodes()
    assert (node.host, node.port) == ("gpu.example.net", 11500)
    assert main(["config", "show"]) == 0
    out = capsys.readouterr().out
    for secret in ("key-alpha-123", "admin-secret-99", "/keys/id_olmd"):
        assert secret not in out
    assert 'OLMD_API_KEYS = "***"' in out
    assert "[services.ollama.download]" in out


def test_config_show_round_trips(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--config", str(ROOT / "settings.toml"), "config", "show"]) == 0
    shown = capsys.readouterr().out
    text = "\n".join(line for line in shown.splitlines() if not line.startswith("OLMD_"))
    # What `config show` prints (minus the masked secrets) is itself a valid settings file.
    body = text.split("[secrets]")[0]
    assert load_settings(write(tmp_path, body)).server.port == 11435


def test_short_api_key_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OLMD_API_KEYS", "abc")
    with pytest.raises(SettingsError, match="OLMD_API_KEYS") as caught:
        load_settings()
    assert "abc" not in str(caught.value)


def test_relative_paths_count_from_the_settings_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    etc = tmp_path / "etc"
    etc.mkdir()
    path = write(
        etc,
        '[jobs.ollama_sync]\nmanifest_path = "state/manifest.json"\n'
        '[report]\npath = "/var/reports/health.md"\n',
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the CLI run from another folder: same manifest and lock
    settings = load_settings(path)
    assert settings.jobs.ollama_sync.manifest_path == etc / "state" / "manifest.json"
    assert str(settings.report.path) == "/var/reports/health.md"
    monkeypatch.chdir(tmp_path)
    assert load_settings(path).jobs.ollama_sync.manifest_path == etc / "state" / "manifest.json"


def test_redact_address_hides_host_and_port_in_every_form() -> None:
    from daemon.settings import redact_address

    text = (
        "Cannot connect to host 10.0.0.5:11500 ssl:default "
        "[Connect call failed ('10.0.0.5', 11500)] after 115001 ms"
    )
    shown = redact_address(text, "10.0.0.5", 11500, "ollama")
    assert shown == (
        "Cannot connect to host ollama ssl:default "
        "[Connect call failed ('ollama', ollama)] after 115001 ms"  # 115001 is not the port
    )
