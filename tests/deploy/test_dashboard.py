"""deploy/grafana/olmd.json: importable as is, and every metric it queries is one olmd exports.

The metric names come out of the dashboard's PromQL (panel targets, nested rows included, and
the template variables' ``label_values`` queries); the exported names come from the registry
of a running daemon with a tenant that served real requests (a 429 among them) and ran a
sync. Renaming a metric, or a label a panel selects on, fails here.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from daemon.emulator.server import Emulator, EmulatorConfig
from daemon.runtime import RUNTIME
from daemon.sync.service import SYNC, SyncOptions
from tests.helpers import eventually, running_olmd, settings_dict

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "olmd.json"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
MODEL = "llama3.1:8b"

# Labels Prometheus adds to every scraped series; olmd itself never exports them.
TARGET_LABELS = frozenset({"job", "instance"})
# Grafana's own variables; the dashboard defines the others in ``templating``.
GRAFANA_VARIABLES = frozenset(
    {"__rate_interval", "__interval", "__interval_ms", "__range", "__range_s", "__range_ms"}
)

# ----------------------------------------------------------------------- PromQL names


def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


AGGREGATIONS = _words(
    "sum min max avg group stddev stdvar count count_values bottomk topk quantile "
    "limitk limit_ratio"
)
FUNCTIONS = _words(
    "abs absent absent_over_time acos acosh asin asinh atan atanh avg_over_time ceil "
    "changes clamp clamp_max clamp_min cos cosh count_over_time day_of_month day_of_week "
    "day_of_year days_in_month deg delta deriv double_exponential_smoothing end exp floor "
    "histogram_avg histogram_count histogram_fraction histogram_quantile histogram_stddev "
    "histogram_stdvar histogram_sum holt_winters hour idelta increase info irate label_join "
    "label_replace last_over_time ln log10 log2 mad_over_time max_over_time min_over_time "
    "minute month predict_linear present_over_time quantile_over_time rad rate resets "
    "round scalar sgn sin sinh sort sort_by_label sort_by_label_desc sort_desc sqrt start "
    "stddev_over_time stdvar_over_time sum_over_time tan tanh time timestamp vector year"
)
KEYWORDS = _words(
    "and or unless by without on ignoring group_left group_right bool offset atan2 inf nan"
)
_STRING = re.compile(r""""(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`""")
_VARIABLE = re.compile(r"\$\{([^}:]+)(?::[^}]*)?\}|\$(\w+)|\[\[(\w+)(?::\w+)?\]\]")
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^()]*)\)")
_NUMBER = re.compile(r"(?<![\w:])\d[\w.]*")  # 0.95, 1e3, 0x1f, 5m, 1h30m
_IDENTIFIER = re.compile(r"[A-Za-z_:][\w:]*")
_SELECTOR = re.compile(r"(?<![\w:])([A-Za-z_:][\w:]*)\s*\{([^{}]*)\}")
_MATCHER = re.compile(r"""([A-Za-z_]\w*)\s*(=~|!~|!=|=)\s*("(?:[^"\\]|\\.)*"|'[^']*')""")
_LABEL_VALUES = re.compile(r"^\s*label_values\(\s*(?:(.*?)\s*,\s*)?([A-Za-z_]\w*)\s*\)\s*$")


def _without_strings(expr: str) -> str:
    return _STRING.sub('""', expr)


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects.

    Strings, Grafana variables, label matchers, ranges, grouping clauses and numbers are
    cut out first; of the identifiers left, one followed by ``(`` must be a known function
    or aggregation (a ValueError otherwise, so a typo cannot hide a metric), keywords are
    skipped, and the rest are metric names.
    """
    if "__name__" in expr:
        raise ValueError(f"select metrics by name, not with __name__: {expr}")
    text = _without_strings(expr)
    text = _VARIABLE.sub(" ", text)
    text = _MATCHERS.sub(" ", text)
    text = _RANGE.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    text = _NUMBER.sub(" ", text)
    names = set()
    for match in _IDENTIFIER.finditer(text):
        word = match.group()
        if word.lower() in KEYWORDS:
            continue
        if text[match.end() :].lstrip().startswith("("):
            if word not in FUNCTIONS | AGGREGATIONS:
                raise ValueError(f"unknown PromQL function {word!r} in: {expr}")
            continue
        names.add(word)
    return names


def selectors(expr: str) -> Iterator[tuple[str, str, str, str]]:
    """(metric, label, operator, value) for each matcher written on a metric."""
    for metric, body in _SELECTOR.findall(_VARIABLE.sub("x", expr)):
        for label, op, quoted in _MATCHER.findall(body):
            yield metric, label, op, quoted[1:-1]


def grouping_labels(expr: str) -> set[str]:
    labels = set()
    for inside in _GROUPING.findall(_without_strings(expr)):
        labels |= {label.strip() for label in inside.split(",") if label.strip()}
    return labels


def template_query(query: str) -> tuple[str, str]:
    """A ``label_values([selector,] label)`` variable query as (selector, label)."""
    match = _LABEL_VALUES.match(query)
    if match is None:
        raise ValueError(f"not a label_values() query: {query}")
    return match.group(1) or "", match.group(2)


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ("up", {"up"}),
        (
            'sum by (node) (rate(olmd_requests_total{node=~"$node", code=~"5.."}'
            "[$__rate_interval]))",
            {"olmd_requests_total"},
        ),
        (
            "histogram_quantile(0.95, sum by (le, endpoint) (rate(a_seconds_bucket[5m])))",
            {"a_seconds_bucket"},
        ),
        (
            "sum(rate(x_total[1h30m] offset 1d)) by (node) / ignoring(code) group_left y",
            {"x_total", "y"},
        ),
        ("max((a >= bool b) and (b > 0)) * 1e3", {"a", "b"}),
        ("time() - z{state='down'} @ end()", {"z"}),
        ('count_values("state", m) or on(node) vector(0)', {"m"}),
        ("topk(5, sum without (instance) (rule:requests:rate5m))", {"rule:requests:rate5m"}),
        ('label_replace(q, "dst", "$1", "src", "(sum|rate)")', {"q"}),
        ('rate(m[${__rate_interval}]) unless m2{a="{b}"}', {"m", "m2"}),
        ("Inf > NaN", set()),
    ],
)
def test_metric_names_extractor(expr: str, expected: set[str]) -> None:
    assert metric_names(expr) == expected


@pytest.mark.parametrize("expr", ["rat(x[5m])", '{__name__="x"}', "sum_by_node(x)"])
def test_metric_names_extractor_refuses_what_it_cannot_check(expr: str) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 -- the message names the expression
        metric_names(expr)


def test_selectors_and_grouping_labels() -> None:
    expr = 'sum by (le, model) (rate(m_bucket{job=~"$job", state="down"}[5m])) / on(x) n{a!="b,c"}'
    assert list(selectors(expr)) == [
        ("m_bucket", "job", "=~", "x"),
        ("m_bucket", "state", "=", "down"),
        ("n", "a", "!=", "b,c"),
    ]
    assert grouping_labels(expr) == {"le", "model", "x"}
    assert template_query('label_values(m{job=~"$job"}, node)') == ('m{job=~"$job"}', "node")
    assert template_query("label_values(job)") == ("", "job")


# ----------------------------------------------------------------------- the dashboard


def load() -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return dashboard


def all_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from all_panels(panel.get("panels", []))


def expressions(dashboard: dict[str, Any]) -> list[str]:
    """Every PromQL expression: panel targets (rows' panels too) and variable queries."""
    exprs = [
        target["expr"]
        for panel in all_panels(dashboard["panels"])
        for target in panel.get("targets", [])
    ]
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            selector, _ = template_query(var["definition"])
            exprs.append(selector or "vector(0)")
    return exprs


def test_dashboard_is_importable_as_is() -> None:
    dashboard = load()
    assert dashboard["id"] is None and dashboard["uid"] and dashboard["title"]
    assert 36 <= dashboard["schemaVersion"] <= 41
    panels = list(all_panels(dashboard["panels"]))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    assert any(p.get("panels") for p in panels if p["type"] == "row"), "no nested row checked"
    for panel in panels:
        assert panel.get("datasource") == DATASOURCE, panel["title"]
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["w"] > 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["targets"], panel["title"]
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        for target in panel["targets"]:
            assert target.get("datasource") == DATASOURCE, panel["title"]
            assert target["expr"].strip(), panel["title"]


def test_template_variables() -> None:
    variables = {v["name"]: v for v in load()["templating"]["list"]}
    source = variables["datasource"]
    assert (source["type"], source["query"]) == ("datasource", "prometheus")
    for name in ("node", "model", "tenant"):
        var = variables[name]
        assert var["type"] == "query" and var["datasource"] == DATASOURCE
        assert var["query"]["query"] == var["definition"]
        assert template_query(var["definition"])[1] == name
    # Every variable a query uses is defined (or one of Grafana's own).
    for expr in expressions(load()):
        for groups in _VARIABLE.findall(expr):
            name = next(g for g in groups if g)
            assert name in variables or name in GRAFANA_VARIABLES, (name, expr)


def test_expressions_are_balanced() -> None:
    pairs = {")": "(", "]": "[", "}": "{"}
    for expr in expressions(load()):
        stack: list[str] = []
        for char in _without_strings(expr):
            if char in "([{":
                stack.append(char)
            elif char in pairs:
                assert stack and stack.pop() == pairs[char], expr
        assert not stack, expr


# ----------------------------------------------------------------------- against olmd

# The sample names each metric type adds to its family name (as Prometheus scrapes them).
SAMPLE_SUFFIXES = {
    "counter": ("_total",),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count"),
    "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
    "summary": ("", "_sum", "_count"),
    "info": ("_info",),
    "stateset": ("",),
    "unknown": ("",),
}


def exported(registry: CollectorRegistry) -> tuple[set[str], dict[str, list[dict[str, str]]]]:
    """Every sample name the registry can expose (also for labelled metrics not yet
    observed, from their family), and the label sets of the samples present now."""
    names: set[str] = set()
    samples: dict[str, list[dict[str, str]]] = {}
    for family in registry.collect():
        names |= {family.name + suffix for suffix in SAMPLE_SUFFIXES[family.type]}
        for sample in family.samples:
            names.add(sample.name)
            samples.setdefault(sample.name, []).append(dict(sample.labels))
    return names, samples


@pytest.fixture
async def nodes() -> AsyncIterator[list[tuple[str, int, Emulator]]]:
    a = Emulator(EmulatorConfig(name="a", models=[MODEL, "nomic-embed-text"]))
    b = Emulator(EmulatorConfig(name="b", models=[MODEL]))
    await a.start()
    await b.start()
    yield [("a", 1, a), ("b", 1, b)]
    await a.stop()
    await b.stop()


async def _traffic(http: aiohttp.ClientSession, server: Any, a: Emulator) -> None:
    """Requests that create the labelled series: answers, a rejection, a cut stream, a
    failover."""

    async def post(path: str, body: dict[str, Any]) -> int:
        async with http.post(str(server.make_url(path)), json=body) as response:
            await response.read()
            return response.status

    for _ in range(4):
        assert await post("/api/generate", {"model": MODEL, "prompt": "hi", "stream": False}) == 200
        assert await post("/api/chat", {"model": MODEL, "messages": []}) == 200
    assert await post("/api/generate", {"model": "no-such-model", "prompt": "hi"}) == 404
    a.state.update({"fault": "cut", "fault_after": 1, "fault_count": 1})
    for _ in range(2):  # equal weights: one of the two goes to a
        await post("/api/generate", {"model": MODEL, "prompt": "hi"})
    a.state.update({"fault": "http500", "fault_count": 1})
    for _ in range(2):
        assert await post("/api/generate", {"model": MODEL, "prompt": "x", "stream": False}) == 200


async def _tenant_traffic(http: aiohttp.ClientSession, server: Any) -> None:
    """Answers and a 429 for the tenant chat (two requests a minute), named by its proxy."""
    statuses = []
    for _ in range(3):
        async with http.post(
            str(server.make_url("/api/generate")),
            json={"model": MODEL, "prompt": "hi", "stream": False},
            headers={"X-Team": "chat"},
        ) as response:
            await response.read()
            statuses.append(response.status)
    assert statuses == [200, 200, 429]


async def test_every_dashboard_metric_is_exported(nodes, tmp_path: Path) -> None:
    data = settings_dict(nodes)
    data["services"]["ollama"]["baseline_models"] = [MODEL, "qwen3:0.6b"]
    data["jobs"]["ollama_sync"]["manifest_path"] = str(tmp_path / "manifest.json")
    # Tenants, so the tenant series exist: chat by a trusted proxy's header, else default.
    data["server"] |= {"tenant_header": "X-Team", "trusted_proxies": ["127.0.0.1/32"]}
    data["tenants"] = [{"name": "chat", "requests_per_minute": 2}]
    data["usage"] = {"record": str(tmp_path / "usage.json")}
    async with running_olmd(data) as server, aiohttp.ClientSession() as http:
        sync = server.app[SYNC]
        assert await sync.start(SyncOptions(ignore_window=True), trigger="test")
        await eventually(lambda: not sync.running, timeout=20)
        assert sync.last_result is not None and sync.last_result.ok
        await _traffic(http, server, nodes[0][2])
        await _tenant_traffic(http, server)
        names, samples = exported(server.app[RUNTIME].metrics.registry)

    for name in (
        "olmd_requests_total",
        "olmd_rejected_requests_total",
        "olmd_failovers_total",
        "olmd_stream_errors_total",
        "olmd_sync_pulls_total",
        "olmd_tenant_requests_total",
        "olmd_tenant_rate_limited_total",
        "olmd_tenant_tokens_total",
        "olmd_tenant_gpu_seconds_total",
        "olmd_tenant_queue_wait_seconds_bucket",
        "olmd_tenant_in_flight",
        "olmd_tenant_queued",
    ):
        assert name in samples, f"the test's traffic did not create {name}"
    used: dict[str, set[str]] = {}
    for expr in expressions(load()):
        for name in metric_names(expr):
            used.setdefault(name, set()).add(expr)
    missing = sorted(set(used) - names)
    assert not missing, f"the dashboard queries metrics olmd does not export: {missing}"

    # Labels: a matcher's label exists on the metric, an exact value occurs in its samples,
    # and a grouping label exists on some metric of the expression. Metrics without samples
    # yet (their labels are unknown) are checked by name only.
    for name, exprs in used.items():
        for expr in exprs:
            for metric, label, op, value in selectors(expr):
                if metric != name or name not in samples or label in TARGET_LABELS:
                    continue
                present = {s[label] for s in samples[name] if label in s}
                assert present, f"{name} has no label {label!r}: {expr}"
                if op == "=":
                    assert value in present, f"{name}{{{label}={value!r}}} never occurs"
    for expr in expressions(load()):
        metrics = metric_names(expr)
        if not metrics <= samples.keys():
            continue
        labels = {label for m in metrics for s in samples[m] for label in s} | TARGET_LABELS
        assert grouping_labels(expr) <= labels, f"grouping by a missing label: {expr}"
    for var in load()["templating"]["list"]:
        if var["type"] == "query":
            selector, label = template_query(var["definition"])
            (metric,) = metric_names(selector)
            labels = {k for s in samples.get(metric, []) for k in s} | TARGET_LABELS
            assert label in labels, f"variable {var['name']}: {metric} has no label {label!r}"
