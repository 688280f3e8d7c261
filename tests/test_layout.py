"""The layout's rules, checked on the source: which part may import which, and no circles.

Every import counts, at module level or inside a function, under ``TYPE_CHECKING`` or not:
a dependency that only the type checker sees still ties the parts together.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

from tests.conftest import ROOT

# The core: what every part may use. Everything else under daemon/ is a part of its own.
CORE = frozenset(
    {
        "daemon",
        "daemon.atomicfile",
        "daemon.domain",
        "daemon.logs",
        "daemon.metrics",
        "daemon.ports",
        "daemon.registry",
        "daemon.runtime",
        "daemon.sections",
        "daemon.settings",
        "daemon.systemd",
        "daemon.window",
    }
)
# The parts each part may import besides itself. "core" is CORE above.
ALLOWED: dict[str, frozenset[str]] = {
    "core": frozenset({"core"}),
    "emulator": frozenset(),  # behaves as an independent Ollama node: nothing of olmd
    "cluster": frozenset({"core"}),  # what several gateways share through Redis
    "tenancy": frozenset({"core"}),  # who is asking: tenants, keys, limits, usage, fair shares
    "distribution": frozenset({"core"}),  # the registry client, blob cache and fan-out
    "sync": frozenset({"core", "cluster", "distribution"}),
    "ops": frozenset({"core"}),
    # + the sync service, from gateway.admin only
    "gateway": frozenset({"core", "cluster", "tenancy", "distribution"}),
    # composes the daemon
    "service": frozenset({"core", "gateway", "sync", "cluster", "tenancy", "distribution"}),
    "cli": frozenset(
        {"core", "gateway", "sync", "ops", "emulator", "service", "cluster", "tenancy"}
        | {"distribution"}
    ),
    "main": frozenset({"cli"}),
    "plugins": frozenset(),  # only daemon.ports and daemon.domain (below)
}
# Single edges the design names.
EXCEPTIONS = frozenset({("daemon.gateway.admin", "daemon.sync.service")})
PLUGIN_API = frozenset({"daemon.ports", "daemon.domain"})


def part_of(module: str) -> str:
    if module.startswith("plugins"):
        return "plugins"
    if module in CORE:
        return "core"
    if module == "daemon.service":
        return "service"
    if module == "daemon.__main__":
        return "main"
    return module.split(".")[1]


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, module: str, known: Iterable[str]) -> set[str]:
    """The project modules ``path`` imports (``from a import b`` is ``a.b`` if that is one)."""
    known = set(known)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names = [f"{base}.{alias.name}" for alias in node.names]
            names = [n if n in known else base for n in names]
        else:
            continue
        for name in names:
            # the longest project module that the name is, or lies in
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
    return found


def project_graph(root: Path = ROOT) -> dict[str, set[str]]:
    files = {
        module_name(p, root): p for top in ("daemon", "plugins") for p in (root / top).rglob("*.py")
    }
    return {m: imports_of(p, m, files) for m, p in files.items()}


def violations(graph: Mapping[str, Iterable[str]]) -> list[str]:
    out = []
    for module, targets in sorted(graph.items()):
        part = part_of(module)
        for target in sorted(targets):
            other = part_of(target)
            if other == part or (module, target) in EXCEPTIONS:
                continue
            ok = target in PLUGIN_API if part == "plugins" else other in ALLOWED[part]
            if not ok:
                out.append(f"{module} imports {target} ({part} may not import {other})")
    return out


def cycles(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_every_part_imports_only_what_the_design_allows() -> None:
    assert violations(project_graph()) == []


def test_no_import_circles() -> None:
    assert cycles(project_graph()) == []


# gateway.routing decides where a request runs: it knows the fleet, never the HTTP side.
ROUTING = "daemon.gateway.routing"
ROUTING_MAY_USE = frozenset({"daemon.gateway.fleet"})


def routing_violations(graph: Mapping[str, Iterable[str]]) -> list[str]:
    return [
        f"{module} imports {target} (routing may use only the fleet of the gateway)"
        for module, targets in sorted(graph.items())
        if module.startswith(ROUTING)
        for target in sorted(targets)
        if target.startswith("daemon.gateway")
        and not target.startswith(ROUTING)
        and target not in ROUTING_MAY_USE
    ]


def test_routing_uses_only_the_fleet_of_the_gateway() -> None:
    assert routing_violations(project_graph()) == []
    graph = {k: set(v) for k, v in project_graph().items()}
    graph["daemon.gateway.routing.queue"].add("daemon.gateway.proxy")
    assert routing_violations(graph) == [
        "daemon.gateway.routing.queue imports daemon.gateway.proxy"
        " (routing may use only the fleet of the gateway)"
    ]


def test_every_package_says_what_it_does() -> None:
    for init in sorted((ROOT / "daemon").glob("*/__init__.py")):
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and "import" in doc, f"{init.relative_to(ROOT)}: say what it may import"


@pytest.mark.parametrize(
    ("module", "target"),
    [
        ("daemon.emulator.server", "daemon.gateway.proxy"),
        ("daemon.emulator.server", "daemon.settings"),
        ("daemon.sync.engine", "daemon.gateway.fleet"),
        ("daemon.cluster.client", "daemon.gateway.fleet"),
        ("daemon.ops.smoke", "daemon.cluster.client"),
        ("daemon.ops.smoke", "daemon.sync.service"),
        ("daemon.gateway.proxy", "daemon.sync.service"),
        ("daemon.gateway.routing.router", "daemon.cli.common"),
        ("daemon.metrics", "daemon.gateway.fleet"),
        ("daemon.settings", "plugins.balancers.weighted"),
        ("plugins.balancers.weighted", "daemon.settings"),
        ("plugins.transports.http_pull", "daemon.gateway.wire"),
    ],
)
def test_the_check_catches_a_broken_rule(module: str, target: str) -> None:
    graph = {k: set(v) for k, v in project_graph().items()}
    graph[module].add(target)
    assert violations(graph) == [
        f"{module} imports {target} ({part_of(module)} may not import {part_of(target)})"
    ]


def test_the_check_catches_a_circle() -> None:
    graph = {k: set(v) for k, v in project_graph().items()}
    graph["daemon.cli.common"].add("daemon.cli.main")  # the circle this layout removed
    [circle] = cycles(graph)
    assert {"daemon.cli.common", "daemon.cli.main"} <= set(circle)


def test_the_check_sees_imports_inside_functions_and_type_checking_blocks(tmp_path: Path) -> None:
    source = tmp_path / "daemon" / "sync" / "x.py"
    source.parent.mkdir(parents=True)
    source.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from daemon.gateway.fleet import Fleet\n"
        "def f():\n    from daemon.ops import smoke\n"
        "from . import plan\n"
    )
    known = {"daemon.gateway.fleet", "daemon.ops.smoke", "daemon.ops", "daemon.sync.plan"}
    assert imports_of(source, "daemon.sync.x", known) == {
        "daemon.gateway.fleet",
        "daemon.ops.smoke",
        "daemon.sync.plan",
    }
