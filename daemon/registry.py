"""Plugins by name: built-ins from a table, third parties from entry points.

A plugin kind ("balancers", "transports") maps a short name used in settings to an
object spec ``"module:attr"``. Third-party packages add names through the entry point
group ``olmd.<kind>``. Every failure says which kind, which name, and what exists.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from typing import Any

BUILTINS: dict[str, dict[str, str]] = {
    "balancers": {
        "round_robin": "plugins.balancers.round_robin:RoundRobinBalancer",
        "weighted": "plugins.balancers.weighted:WeightedBalancer",
        "least_busy": "plugins.balancers.least_busy:LeastBusyBalancer",
        "adaptive": "plugins.balancers.adaptive:AdaptiveBalancer",
    },
    "transports": {
        "http": "plugins.transports.http_pull:HttpPullTransport",
        "ssh": "plugins.transports.ssh_pull:SshPullTransport",
    },
}


class PluginError(LookupError):
    """A plugin name that is unknown, or whose object cannot be imported."""


def _third_party(kind: str) -> dict[str, str]:
    return {ep.name: ep.value for ep in entry_points(group=f"olmd.{kind}")}


def names(kind: str) -> list[str]:
    """Every name usable for ``kind``, built-ins first."""
    if kind not in BUILTINS:
        raise PluginError(f"unknown plugin kind {kind!r}; expected one of {sorted(BUILTINS)}")
    extra = [n for n in sorted(_third_party(kind)) if n not in BUILTINS[kind]]
    return [*BUILTINS[kind], *extra]


def import_from_string(spec: str) -> Any:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise PluginError(f"plugin spec {spec!r} must have the form 'module:attribute'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise PluginError(f"cannot import {module_name!r} for plugin {spec!r}: {exc}") from exc
    try:
        return getattr(module, attr)
    except AttributeError as exc:
        raise PluginError(f"module {module_name!r} has no attribute {attr!r}") from exc


def load(kind: str, name: str) -> Any:
    """The plugin object (usually a class) registered as ``name`` for ``kind``."""
    table = {**_third_party(kind), **BUILTINS.get(kind, {})}
    spec = table.get(name)
    if spec is None:
        raise PluginError(f"unknown {kind[:-1]} {name!r}; expected one of {names(kind)}")
    return import_from_string(spec)
