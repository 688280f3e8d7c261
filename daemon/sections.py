"""The sections of olmd's settings: server, routing, nodes, download, jobs, SSH, report.

Each is a frozen pydantic model that rejects unknown keys; :mod:`daemon.settings` puts them
together into :class:`~daemon.settings.Settings` and loads them from files and the
environment.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    field_validator,
)

from daemon import registry
from daemon.domain import ModelRef
from daemon.window import AllowedWindow


def _parse_window(value: object) -> object:
    return AllowedWindow.parse(value) if isinstance(value, str) else value


Window = Annotated[
    AllowedWindow, BeforeValidator(_parse_window), PlainSerializer(str, return_type=str)
]


def _model_name(value: object) -> object:
    if isinstance(value, str):
        ModelRef.parse(value)  # raises ValueError naming the rule the name breaks
    return value


ModelName = Annotated[str, BeforeValidator(_model_name)]
Seconds = Annotated[float, Field(gt=0)]
Port = Annotated[int, Field(ge=1, le=65535)]


def _known_plugin(kind: str, what: str, value: str) -> str:
    known = registry.names(kind)
    if value not in known:
        raise ValueError(f"unknown {what}; expected one of {known}")
    return value


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _networks(value: object) -> object:
    if isinstance(value, list):
        for item in value:
            try:
                ipaddress.ip_network(str(item), strict=False)
            except ValueError:
                raise ValueError(f"{item!r} is not an IP address or network") from None
    return value


class ServerSettings(Section):
    host: str = "127.0.0.1"
    port: Port = 11435
    drain_timeout: Seconds = 30.0
    max_body_bytes: int = Field(default=16 * 1024 * 1024, gt=0)
    # /readyz: "routable" answers 503 while no node answers (a load balancer in front then
    # sends traffic to another gateway); "process" only says the daemon is up and not
    # draining, as before.
    readiness: Literal["routable", "process"] = "routable"
    # Hashes of API keys per tenant, managed by `olmd keys`; mode 0600 (refused when group-
    # or world-readable). Relative to the settings file's folder.
    keys_file: Path | None = None
    # Behind an authenticating reverse proxy: the header naming the tenant (e.g.
    # X-Forwarded-User), believed only from these addresses or networks.
    tenant_header: str = Field(default="", pattern=r"^[A-Za-z0-9-]*$")
    trusted_proxies: Annotated[list[str], BeforeValidator(_networks)] = []


class RoutingSettings(Section):
    strategy: str = "adaptive"
    probe_interval: Seconds = 5.0
    probe_concurrency: int = Field(default=64, ge=1, le=1024)
    cooldown: Seconds = 10.0
    cooldown_max: Seconds = 300.0
    failures_to_eject: int = Field(default=3, ge=1)
    busy_cooldown: float = Field(default=1.0, ge=0)
    rise: int = Field(default=2, ge=1)
    fall: int = Field(default=3, ge=1)
    max_ejection_percent: int = Field(default=100, ge=0, le=100)
    # Requests a node runs at once per model: its OLLAMA_NUM_PARALLEL. Ollama's default is 1
    # since 0.10 (it was 4 or 1 by memory before); a node's own ``parallel`` overrides it.
    parallel: int = Field(default=1, ge=1, le=256)
    # Requests a node may hold beyond its slots, waiting in Ollama's own queue: the next
    # one starts without a round trip through olmd. 0 keeps every wait in olmd's queue,
    # where it goes to whichever node frees a slot first.
    overcommit: int = Field(default=0, ge=0, le=64)
    max_in_flight_per_node: int = Field(default=0, ge=0)  # all models together; 0: no cap
    queue_limit: int = Field(default=256, ge=0)
    queue_timeout: Seconds = 30.0
    # What adaptive assumes before it has measured a node: a cold load's seconds, the
    # prompt tokens evaluated per second, the seconds a request holds a slot.
    cold_load_seconds: Seconds = 10.0
    prompt_tokens_per_second: Seconds = 1000.0
    service_seconds: Seconds = 5.0
    # A conversation pinned by X-Olmd-Session (or OpenAI's ``user``) stays on its node
    # while that node's estimate is at most this many times the best one.
    pin_tolerance: float = Field(default=1.5, ge=1.0)
    # Conversation prefixes remembered per slot of a node and model (LRU beyond).
    affinity_entries_per_slot: int = Field(default=4, ge=1, le=1024)
    max_attempts: int = Field(default=3, ge=1, le=10)
    retry_budget_percent: int = Field(default=20, ge=0, le=100)
    connect_timeout: Seconds = 5.0
    first_byte_timeout: Seconds = 300.0
    non_streaming_timeout: Seconds = 1800.0
    idle_timeout: Seconds = 120.0
    # A client that reads nothing while one write waits this long is cut, and the node's
    # request cancelled: a reader that went away without closing holds no GPU slot.
    write_timeout: Seconds = 60.0
    total_timeout: float = Field(default=0, ge=0)  # 0: none
    # Headroom for people: while an interactive request for a model was seen in the last
    # interactive_window seconds, batch requests leave interactive_reserve slots free
    # across the nodes holding it. With no interactive traffic batch may use every slot.
    interactive_window: Seconds = 30.0
    interactive_reserve: int = Field(default=1, ge=0, le=64)

    @field_validator("strategy")
    @classmethod
    def _known_strategy(cls, value: str) -> str:
        return _known_plugin("balancers", "strategy", value)


_PERIOD = re.compile(r"^([1-9][0-9]{0,3})([hd])$")
TENANT_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"


def period_seconds(period: str) -> int:
    """``"1d"`` → 86400; ``"12h"`` → 43200 (a period is hours or days)."""
    match = _PERIOD.match(period)
    if match is None:
        raise ValueError(f'{period!r} is not a period such as "12h", "1d" or "30d"')
    return int(match[1]) * (3600 if match[2] == "h" else 86400)


def _period(value: object) -> object:
    if isinstance(value, str):
        period_seconds(value)
    return value


def _model_pattern(value: object) -> object:
    if isinstance(value, str) and not re.fullmatch(r"[A-Za-z0-9_.:/*?\[\]-]{1,200}", value):
        raise ValueError("a model name or a glob (*, ?, [...]) of one")
    return value


class TenantSettings(Section):
    """A team sharing the fleet: its priority, share, limits and models. Keys are secrets:
    ``OLMD_API_KEYS`` (``tenant:key``) or ``[server] keys_file``, never this file."""

    name: str = Field(pattern=TENANT_NAME)
    priority: Literal["interactive", "batch"] = "interactive"
    weight: float = Field(default=1.0, gt=0, le=1000)  # share among the same priority
    max_in_flight: int = Field(default=0, ge=0)  # requests waiting or running; 0: no limit
    requests_per_minute: int = Field(default=0, ge=0)  # 0: no limit
    tokens_per_minute: int = Field(default=0, ge=0)  # prompt + completion; 0: no limit
    budget_tokens: int = Field(default=0, ge=0)  # per budget_period; 0: no budget
    budget_period: Annotated[str, BeforeValidator(_period)] = "30d"
    models: list[Annotated[str, BeforeValidator(_model_pattern)]] = ["*"]
    queue_limit: int = Field(default=0, ge=0)  # its requests waiting for a slot; 0: routing's


class UsageSettings(Section):
    """What each tenant used, kept across restarts (in Redis too with a cluster)."""

    # Per tenant, model and day; written atomically every flush_seconds and at stop.
    record: Path = Path("olmd-usage.json")
    flush_seconds: Seconds = 10.0
    days_kept: int = Field(default=400, ge=1)
    # One JSON line per request for chargeback (never the key, never the prompt); a path,
    # relative to the settings file's folder, or "" for none.
    access_log: str = ""


class ReportSettings(Section):
    min_ram_gb: float = Field(default=64, ge=0)
    min_free_disk_gb: float = Field(default=700, ge=0)
    path: Path = Path("docs/deployment/ollama-health-report.md")


class RetrySettings(Section):
    max_attempts: int = Field(default=3, ge=1, le=100)
    backoff_seconds: float = Field(default=20, ge=0)


class DownloadSettings(Section):
    data_root: str = "~/.ollama"
    allowed_window: Window = AllowedWindow.parse("02:00-06:00 UTC+8")
    max_parallel_jobs: int = Field(default=1, ge=1, le=64)
    # A pull showing no progress for this long is cancelled and retried (Ollama resumes).
    stall_timeout: Seconds = 300.0
    retry: RetrySettings = RetrySettings()


class NodeSettings(Section):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
    host: str = Field(min_length=1)
    port: Port = 11434
    scheme: Literal["http", "https"] = "http"
    weight: int = Field(default=1, ge=1, le=1000)
    # The node's OLLAMA_NUM_PARALLEL; unset: [routing] parallel.
    parallel: int | None = Field(default=None, ge=1, le=256)
    # The node's OLLAMA_MAX_LOADED_MODELS, if known: loading one more evicts one (0: unknown).
    max_loaded_models: int = Field(default=0, ge=0, le=64)
    transport: str = "http"
    ssh_host: str | None = None
    ssh_port: Port = 22
    ssh_user: str | None = None
    # Set for the node OLLAMA_REMOTE_HOST names: its address is a secret, shown nowhere.
    secret_address: bool = Field(default=False, exclude=True)

    @field_validator("transport")
    @classmethod
    def _known_transport(cls, value: str) -> str:
        return _known_plugin("transports", "transport", value)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    @property
    def shown_address(self) -> str:
        """The address for output (manifest, /admin): the URL, unless it is a secret."""
        return "(OLLAMA_REMOTE_HOST)" if self.secret_address else self.url

    def redact(self, text: str) -> str:
        """``text`` (an error message, say) with a secret address replaced by the name."""
        return (
            redact_address(text, self.host, self.port, self.name) if self.secret_address else text
        )


class OllamaSettings(Section):
    scheme: Literal["http", "https"] = "http"
    host: str = "127.0.0.1"
    port: Port = 11434
    health_timeout: Seconds = 10.0
    baseline_models: list[ModelName] = []
    fallback_models: list[ModelName] = []
    download: DownloadSettings = DownloadSettings()
    nodes: list[NodeSettings] = []

    @field_validator("nodes")
    @classmethod
    def _unique_names(cls, nodes: list[NodeSettings]) -> list[NodeSettings]:
        seen: set[str] = set()
        for node in nodes:
            if node.name in seen:
                raise ValueError(f"duplicate node name {node.name!r}; names must be unique")
            seen.add(node.name)
        return nodes


class ServicesSettings(Section):
    ollama: OllamaSettings = OllamaSettings()


class SyncJobSettings(Section):
    enabled: bool = True
    schedule_cron: str = "0 3 * * *"
    manifest_path: Path = Path("docs/deployment/ollama-models-manifest.json")

    @field_validator("schedule_cron")
    @classmethod
    def _cron_parses(cls, value: str) -> str:
        from apscheduler.triggers.cron import CronTrigger

        try:
            CronTrigger.from_crontab(value, timezone="UTC")
        except ValueError as exc:
            raise ValueError(
                f"not a cron expression ({exc}); expected five fields, e.g. '0 3 * * *'"
            ) from exc
        return value


class JobsSettings(Section):
    ollama_sync: SyncJobSettings = SyncJobSettings()


class SshSettings(Section):
    known_hosts: Path | None = None
    connect_timeout: Seconds = 10.0


class DistributionSettings(Section):
    """How models reach the nodes: each from the registry itself (``direct``), or
    downloaded once by olmd into its blob cache and pulled by the nodes from olmd
    (``gateway``)."""

    mode: Literal["direct", "gateway"] = "direct"
    # Models named without a host come from here (Ollama's own registry by default).
    registry: str = Field(default="https://registry.ollama.ai", pattern=r"^https?://[^/\s]+/?$")
    cache_dir: Path = Path("/var/cache/olmd/models")
    # Least recently used blobs that no configured model needs go first.
    max_cache_gb: float = Field(default=500.0, gt=0)
    # How the nodes reach olmd ("http://10.0.0.5:11435"); empty: from [server].
    advertise_url: str = Field(default="", pattern=r"^(https?://[^/\s]+/?)?$")
    # Nodes may pull cached models from olmd outside the download window (LAN only).
    fanout_outside_window: bool = True
    # Parallel Range requests per blob, and the size of each part.
    download_parts: int = Field(default=8, ge=1, le=64)
    part_size_mb: int = Field(default=100, ge=1, le=4096)


def redact_address(text: str, host: str, port: int, name: str) -> str:
    """``text`` without ``host`` and ``port``: "host:port", the host, and the port as a
    whole number (error texts also show them apart, as in ``('10.0.0.5', 11434)``)."""
    text = text.replace(f"{host}:{port}", name).replace(host, name)
    return re.sub(rf"(?<!\d){port}(?!\d)", name, text)


def _host_name() -> str:
    import socket

    name = socket.gethostname().split(".")[0]
    return "".join(c if c.isalnum() or c in "._-" else "-" for c in name)[:63] or "olmd"


class ClusterSettings(Section):
    """Several gateways over one fleet, sharing state through Redis (``OLMD_REDIS_URL``)."""

    enabled: bool = False
    # This gateway's name among the others: logs, the sync lease's holder, /admin.
    name: str = Field(default_factory=_host_name, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
    key_prefix: str = Field(default="olmd", pattern=r"^[A-Za-z0-9:._-]{1,64}$")
    # The sync lease lasts this long unless renewed (every third of it while a run lives):
    # a gateway killed mid-sync is replaced after at most this long.
    lease_seconds: Seconds = 30.0
    # How often each gateway publishes its view of the nodes and its requests in flight,
    # and reads the others'. Published state older than peer_timeout is ignored.
    publish_interval: Seconds = 0.25
    peer_timeout: Seconds = 3.0
    # Redis calls that take longer fail; the gateway then goes on on its own state.
    redis_timeout: Seconds = 1.0
