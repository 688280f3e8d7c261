"""olmd's settings: one validated, immutable object built at start-up and on SIGHUP.

Sources, lowest to highest precedence: defaults, the settings file (TOML, or JSON with the
same keys), ``OLMD_*`` environment variables (``OLMD_SERVER__PORT=8080``; lists as JSON),
then secrets from the environment or a ``.env`` file. Secrets never come from the file.
Every problem is reported as ``key: reason (got value)`` in one :class:`SettingsError`.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import stat
import tomllib
import typing
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Annotated, Any

import structlog
from pydantic import (
    BaseModel,
    BeforeValidator,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from daemon.sections import (
    ClusterSettings,
    DistributionSettings,
    DownloadSettings,
    JobsSettings,
    NodeSettings,
    OllamaSettings,
    Port,
    ReportSettings,
    RetrySettings,
    RoutingSettings,
    ServerSettings,
    ServicesSettings,
    SshSettings,
    SyncJobSettings,
    TenantSettings,
    UsageSettings,
    redact_address,
)
from daemon.window import AllowedWindow

# The sections are defined in daemon.sections; settings.py is where everyone imports them.
__all__ = [
    "ClusterSettings",
    "DistributionSettings",
    "DownloadSettings",
    "JobsSettings",
    "NodeSettings",
    "OllamaSettings",
    "ReportSettings",
    "RetrySettings",
    "RoutingSettings",
    "ServerSettings",
    "ServicesSettings",
    "Settings",
    "SettingsError",
    "SshSettings",
    "SyncJobSettings",
    "TenantSettings",
    "UsageSettings",
    "anchor_paths",
    "load_settings",
    "redact_address",
]

ENV_PREFIX = "OLMD_"
DEFAULT_PATHS = (Path("settings.toml"), Path("/etc/olmd/settings.toml"))
# Environment variables that carry secrets, by field name. The guide's names are kept.
SECRET_ENV = {
    "api_keys": "OLMD_API_KEYS",
    "admin_token": "OLMD_ADMIN_TOKEN",
    "remote_host": "OLLAMA_REMOTE_HOST",
    "remote_port": "OLLAMA_REMOTE_PORT",
    "ssh_user": "OLLAMA_SSH_USER",
    "ssh_key_path": "OLLAMA_SSH_KEY_PATH",
    "redis_url": "OLMD_REDIS_URL",
}
# OLMD_* names that are not settings keys but are still ours.
OTHER_ENV = {"OLMD_CONFIG"}


class SettingsError(Exception):
    """Settings that cannot be used. ``problems`` holds one ``key: reason`` line each."""

    def __init__(self, source: str, problems: Iterable[str]) -> None:
        self.source = source
        self.problems = list(problems)
        super().__init__(f"invalid settings ({source}):\n  " + "\n  ".join(self.problems))


DEFAULT_TENANT = "default"
_TENANT_PREFIX = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]{0,62}):(.+)$")


def key_of(entry: str) -> tuple[str, str]:
    """``"team:key"`` → ("team", "key"); a bare ``"key"`` → ("default", "key")."""
    match = _TENANT_PREFIX.match(entry)
    return (match[1], match[2]) if match else (DEFAULT_TENANT, entry)


def _split_keys(value: object) -> object:
    if isinstance(value, str):
        return [key.strip() for key in value.split(",") if key.strip()]
    return value


class Settings(BaseSettings):
    """The whole configuration. Build it with :func:`load_settings`."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="ignore",  # unknown keys are caught by _check_keys, with better messages
        frozen=True,
        case_sensitive=False,
    )

    server: ServerSettings = ServerSettings()
    routing: RoutingSettings = RoutingSettings()
    report: ReportSettings = ReportSettings()
    services: ServicesSettings = ServicesSettings()
    jobs: JobsSettings = JobsSettings()
    ssh: SshSettings = SshSettings()
    cluster: ClusterSettings = ClusterSettings()
    tenants: list[TenantSettings] = []
    usage: UsageSettings = UsageSettings()
    distribution: DistributionSettings = DistributionSettings()

    # Secrets: environment or .env only.
    api_keys: Annotated[list[SecretStr], NoDecode, BeforeValidator(_split_keys)] = Field(
        default=[], validation_alias=SECRET_ENV["api_keys"]
    )
    admin_token: SecretStr | None = Field(default=None, validation_alias=SECRET_ENV["admin_token"])
    remote_host: str | None = Field(default=None, validation_alias=SECRET_ENV["remote_host"])
    remote_port: Port | None = Field(default=None, validation_alias=SECRET_ENV["remote_port"])
    ssh_user: str | None = Field(default=None, validation_alias=SECRET_ENV["ssh_user"])
    ssh_key_path: SecretStr | None = Field(
        default=None, validation_alias=SECRET_ENV["ssh_key_path"]
    )
    redis_url: SecretStr | None = Field(default=None, validation_alias=SECRET_ENV["redis_url"])

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The file's contents arrive as init arguments; the environment overrides them.
        return env_settings, dotenv_settings, init_settings

    @field_validator("api_keys")
    @classmethod
    def _api_keys_usable(cls, keys: list[SecretStr]) -> list[SecretStr]:
        if any(len(key_of(key.get_secret_value())[1]) < 8 for key in keys):
            raise ValueError("every key needs 8 characters or more")
        return keys

    @field_validator("tenants")
    @classmethod
    def _unique_tenants(cls, tenants: list[TenantSettings]) -> list[TenantSettings]:
        names = [t.name for t in tenants]
        if doubled := sorted({n for n in names if names.count(n) > 1}):
            raise ValueError(f"tenant names must be unique; repeated: {doubled}")
        return tenants

    @model_validator(mode="after")
    def _keys_name_tenants(self) -> Settings:
        known = {t.name for t in self.tenants} | {DEFAULT_TENANT}
        for key in self.api_keys:
            tenant, _ = key_of(key.get_secret_value())
            if tenant not in known:  # never echo the key itself
                raise ValueError(
                    f"OLMD_API_KEYS: a key names the tenant {tenant!r}, which no [[tenants]] "
                    f"entry defines (known: {sorted(known)})"
                )
        return self

    def tenant_keys(self) -> list[tuple[str, str]]:
        """``OLMD_API_KEYS`` as (tenant, key) pairs; a bare key is the tenant ``default``'s."""
        return [key_of(k.get_secret_value()) for k in self.api_keys]

    @model_validator(mode="after")
    def _cluster_has_redis(self) -> Settings:
        if self.cluster.enabled and self.redis_url is None:
            raise ValueError(
                "cluster.enabled: a cluster needs a Redis server; set OLMD_REDIS_URL "
                "(e.g. redis://:password@10.0.0.5:6379/0) in the environment or .env"
            )
        return self

    @model_validator(mode="after")
    def _nodes_can_reach_olmd(self) -> Settings:
        dist = self.distribution
        if (
            dist.mode == "gateway"
            and not dist.advertise_url
            and self.server.host in ("0.0.0.0", "::")
        ):
            raise ValueError(
                "distribution.advertise_url: gateway mode needs the address the nodes reach "
                f"olmd at; server.host {self.server.host!r} listens on every address "
                '(e.g. advertise_url = "http://10.0.0.5:11435")'
            )
        return self

    @model_validator(mode="after")
    def _cron_inside_window(self) -> Settings:
        job, window = self.jobs.ollama_sync, self.services.ollama.download.allowed_window
        outside = _first_time_outside(job.schedule_cron, window) if job.enabled else None
        if outside is not None:
            raise ValueError(
                f"jobs.ollama_sync.schedule_cron {job.schedule_cron!r} fires at {outside}, "
                f"outside services.ollama.download.allowed_window {str(window)!r} "
                "(the cron is read in the window's zone)"
            )
        return self

    def nodes(self) -> list[NodeSettings]:
        """The fleet: the listed nodes, or the single ``services.ollama`` host as one node."""
        ollama = self.services.ollama
        if ollama.nodes:
            return list(ollama.nodes)
        host = self.remote_host or ollama.host
        # OLLAMA_REMOTE_HOST is a secret: it must not become a name that metrics, logs
        # and X-Olmd-Node show.
        name = "ollama" if self.remote_host else _node_name(host)
        return [
            NodeSettings(
                name=name,
                secret_address=bool(self.remote_host),
                host=host,
                port=self.remote_port or ollama.port,
                scheme=ollama.scheme,
                ssh_user=self.ssh_user,
            )
        ]

    def advertise_url(self) -> str:
        """How the nodes reach olmd: ``distribution.advertise_url``, else ``[server]``'s
        address (a wildcard listen address cannot be reached: set advertise_url then)."""
        if self.distribution.advertise_url:
            return self.distribution.advertise_url.rstrip("/")
        host = self.server.host
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.server.port}"

    def models(self) -> list[str]:
        """Baseline then fallback models, each once, in order."""
        out: dict[str, None] = {}
        for name in (*self.services.ollama.baseline_models, *self.services.ollama.fallback_models):
            out.setdefault(name, None)
        return list(out)

    def public_dict(self) -> dict[str, Any]:
        """Every non-secret setting, JSON-compatible; secrets shown only as set or not."""
        data = self.model_dump(mode="json", exclude=set(SECRET_ENV))
        data["secrets"] = {
            SECRET_ENV[name]: ("***" if getattr(self, name) not in (None, []) else "(not set)")
            for name in SECRET_ENV
        }
        return data


def _first_time_outside(cron: str, window: AllowedWindow) -> str | None:
    """The first time of day (HH:MM) at which ``cron`` fires outside ``window``, if any."""
    from datetime import UTC, datetime, timedelta

    from apscheduler.triggers.cron import CronTrigger

    # Only the minute and hour fields decide the times of day; dates and DST do not enter
    # into it, so one day of wall-clock times (read as UTC) covers every case.
    minute, hour = cron.split()[:2]
    trigger = CronTrigger(minute=minute, hour=hour, timezone=UTC)
    day = datetime(2024, 1, 1, tzinfo=UTC)
    fire = trigger.get_next_fire_time(None, day)
    while fire is not None and fire < day + timedelta(days=1):
        if not window.contains_time(fire.time().replace(tzinfo=None)):
            return f"{fire:%H:%M}"
        fire = trigger.get_next_fire_time(fire, fire + timedelta(minutes=1))
    return None


def _node_name(host: str) -> str:
    cleaned = "".join(c if c.isalnum() or c in "._-" else "-" for c in host).strip("-.")
    return cleaned[:63] or "node"


def find_settings_file(explicit: str | os.PathLike[str] | None) -> Path | None:
    """``--config``, else ``$OLMD_CONFIG``, else ./settings.toml, else /etc/olmd/settings.toml."""
    chosen = explicit or os.environ.get("OLMD_CONFIG")
    if chosen:
        path = Path(chosen).expanduser()
        if not path.is_file():
            raise SettingsError(str(path), [f"settings file {str(path)!r} does not exist"])
        return path
    return next((p for p in DEFAULT_PATHS if p.is_file()), None)


def read_settings_file(path: Path) -> dict[str, Any]:
    """The file's contents as a dict: TOML, or JSON when the name ends in .json."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SettingsError(str(path), [f"cannot read the file: {exc.strerror}"]) from exc
    try:
        data: object = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        kind = "JSON" if path.suffix == ".json" else "TOML"
        raise SettingsError(str(path), [f"not valid {kind}: {exc}"]) from exc
    if not isinstance(data, dict):
        raise SettingsError(str(path), ["the top level must be a table of sections"])
    return data


def _model_in(annotation: object) -> type[BaseModel] | None:
    """The settings model an annotation holds: itself, or inside ``list[...]``/``X | None``."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        if (found := _model_in(arg)) is not None:
            return found
    return None


def _setting_paths(model: type[BaseModel] = Settings, prefix: str = "") -> Iterator[str]:
    """Every settings key as a dotted path (``routing.strategy``); a list of tables once."""
    for name, field in model.model_fields.items():
        if name in SECRET_ENV:
            continue
        inner = _model_in(field.annotation)
        if inner is None:
            yield prefix + name
        else:
            yield from _setting_paths(inner, f"{prefix}{name}.")


def _env_name(path: str) -> str:
    return ENV_PREFIX + path.replace(".", "__").upper()


def _nearest(key: str, choices: Iterable[str]) -> str | None:
    """The choice a misspelt or misplaced key most likely meant: the same last part
    (``port`` → ``server.port``), else the closest spelling."""
    choices = list(choices)
    leaf = key.rsplit(".", 1)[-1]
    same_leaf = [c for c in choices if c.rsplit(".", 1)[-1] == leaf]
    if same_leaf:
        return same_leaf[0]
    close = difflib.get_close_matches(key, choices, n=1, cutoff=0.6)
    return close[0] if close else None


def _sibling_keys(loc: tuple[int | str, ...]) -> list[str]:
    """The keys valid beside ``loc``'s last part, as dotted paths from the top."""
    model: type[BaseModel] | None = Settings
    parts = [str(p) for p in loc[:-1] if not isinstance(p, int)]
    for part in parts:
        field = model.model_fields.get(part) if model else None
        model = _model_in(field.annotation) if field else None
    if model is None:
        return []
    prefix = "".join(f"{p}." for p in parts)
    return [prefix + name for name in model.model_fields if name not in SECRET_ENV]


def _check_keys(file_data: Mapping[str, Any], environ: Mapping[str, str]) -> list[str]:
    """Problems that stop olmd (a secret or an unknown section in the file). An ``OLMD_*``
    variable that names no section is only warned about: it may belong to something else
    (a shell's ``OLMD_PORT``); a misspelt key under a known section fails validation."""
    sections = set(Settings.model_fields) - set(SECRET_ENV)
    problems = []
    for key in file_data:
        if key in SECRET_ENV or key.upper() in SECRET_ENV.values():
            problems.append(f"{key}: secrets belong in the environment or .env, not in the file")
        elif key not in sections:
            problems.append(f"{key}: unknown section; expected one of {sorted(sections)}")
    for name in environ:
        upper = name.upper()
        if not upper.startswith(ENV_PREFIX) or upper in SECRET_ENV.values() or upper in OTHER_ENV:
            continue
        section = upper[len(ENV_PREFIX) :].split("__", 1)[0].lower()
        if section not in sections:
            key = upper[len(ENV_PREFIX) :].lower().replace("__", ".")
            nearest = _nearest(key, _setting_paths())
            hint = {"did_you_mean": f"{_env_name(nearest)} ({nearest})"} if nearest else {}
            structlog.get_logger("olmd.settings").warning(
                "unknown_environment_variable", variable=name, note="not a setting; ignored", **hint
            )
    return problems


def _dotenv(path: Path | None) -> dict[str, str]:
    if path is None or not path.is_file():
        return {}
    from dotenv import dotenv_values  # a pydantic-settings dependency

    return {k: v for k, v in dotenv_values(path).items() if v is not None}


def _key(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            part = SECRET_ENV.get(part, part)
            out += f".{part}" if out else part
    return out


def _describe(error: Mapping[str, Any]) -> str:
    loc = tuple(p for p in error["loc"] if not str(p).startswith("function-"))
    key = _key(loc)
    message = str(error["msg"]).removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        nearest = _nearest(key, _sibling_keys(loc))
        return f"{key}: unknown key" + (f"; did you mean {nearest}?" if nearest else "")
    if error["type"] == "missing":
        return f"{key}: required"
    if not key or key.upper() in SECRET_ENV.values():
        return f"{key or 'settings'}: {message}"  # never echo a secret back
    return f"{key}: {message} (got {error['input']!r})"


def keys_file_problem(path: Path) -> str | None:
    """Why the keys file cannot be used (missing, or readable by others), or None."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        return f"{path}: no such file (olmd keys add creates it)"
    if mode & 0o077:
        return (
            f"{path} is readable by group or others (mode {mode:04o}); "
            f"it holds key hashes: chmod 600 {path}"
        )
    return None


def load_settings(
    path: str | os.PathLike[str] | None = None,
    *,
    env_file: str | os.PathLike[str] | None = ".env",
    keys_file_needed: bool = True,
) -> Settings:
    """Build and validate the settings, or raise :class:`SettingsError`.

    ``keys_file_needed=False`` (``olmd keys``, which creates it) skips the keys file check.
    """
    file = find_settings_file(path)
    source = str(file) if file else "defaults and environment"
    file_data = read_settings_file(file) if file else {}
    dotenv_path = Path(env_file) if env_file else None
    problems = _check_keys(file_data, {**_dotenv(dotenv_path), **os.environ})
    if problems:
        raise SettingsError(source, problems)
    try:
        settings = Settings(_env_file=dotenv_path, **file_data)
    except ValidationError as exc:
        raise SettingsError(source, [_describe(e) for e in exc.errors()]) from exc
    except ValueError as exc:  # raised by a source, e.g. an OLMD_* value that is not JSON
        raise SettingsError(source, [str(exc)]) from exc
    settings = anchor_paths(settings, file.parent if file else Path.cwd())
    keys_file = settings.server.keys_file
    if keys_file_needed and keys_file is not None:
        problem = keys_file_problem(keys_file)
        if problem is not None:
            raise SettingsError(source, [f"server.keys_file: {problem}"])
    return settings


def anchor_paths(settings: Settings, base: Path) -> Settings:
    """Make the local file paths absolute: relative ones count from ``base``.

    ``base`` is the settings file's folder, so ``olmd sync`` from any directory and the
    daemon use the same manifest, lock and state files. (``download.data_root`` is a
    path on the nodes and stays as written.)
    """

    def anchor(path: Path) -> Path:
        path = path.expanduser()
        return path if path.is_absolute() else (base / path).absolute()

    job = settings.jobs.ollama_sync
    ssh = settings.ssh
    usage = settings.usage
    server = settings.server
    return settings.model_copy(
        update={
            "usage": usage.model_copy(
                update={
                    "record": anchor(usage.record),
                    "access_log": str(anchor(Path(usage.access_log))) if usage.access_log else "",
                }
            ),
            "server": server.model_copy(
                update={"keys_file": anchor(server.keys_file) if server.keys_file else None}
            ),
            "jobs": settings.jobs.model_copy(
                update={
                    "ollama_sync": job.model_copy(
                        update={"manifest_path": anchor(job.manifest_path)}
                    )
                }
            ),
            "report": settings.report.model_copy(update={"path": anchor(settings.report.path)}),
            "distribution": settings.distribution.model_copy(
                update={"cache_dir": anchor(settings.distribution.cache_dir)}
            ),
            "ssh": ssh.model_copy(
                update={"known_hosts": anchor(ssh.known_hosts) if ssh.known_hosts else None}
            ),
        }
    )
