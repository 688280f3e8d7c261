"""How many requests a node runs at once per model: configured, or learned by trying.

Ollama says nothing of its slots (``OLLAMA_NUM_PARALLEL``). A node whose ``parallel`` is
set (on the node, or fleet-wide in ``[routing]``) has that many. Otherwise olmd learns it
per node and model, starting from one: while requests wait in olmd for a model and the
node's slots are all taken, one more request is let onto the node (a probe). When it is
answered, its timings say whether it ran at once or waited inside the node: its time from
dispatch to its last byte against the node's own time on it (load, prompt evaluation and
generation, from the final chunk). Ran at once: the node has another slot. Waited: the
figure holds, and the next probe comes after ``PROBE_BACKOFF`` seconds. A configured
figure is checked on every answer the same way: a request that waited inside a node
holding no more than its configured slots means the node has fewer; logged once.
"""

from __future__ import annotations

from collections.abc import Callable

from daemon.gateway.fleet import Node
from daemon.gateway.routing.rates import Sample
from daemon.logs import get_logger
from daemon.settings import RoutingSettings

log = get_logger("olmd.router")

MAX_LEARNED = 64
PROBE_BACKOFF = 30.0  # seconds between probes of a node that showed its figure
_WAITED_SHARE = 0.25  # waited inside the node: more than this share of its own time...
_WAITED_SECONDS = 0.02  # ...and more than this, for network and olmd's own overhead


def waited_inside(sample: Sample) -> bool:
    """Whether the request spent a while queued inside the node (not running)."""
    own = (sample.load_ns + sample.prompt_ns + sample.eval_ns) / 1e9
    return sample.held_seconds - own > max(_WAITED_SECONDS, _WAITED_SHARE * own)


class Slots:
    def __init__(self, routing: RoutingSettings, clock: Callable[[], float]) -> None:
        self.clock = clock
        # Models asked for embeddings and never for generations: Ollama runs embedding-only
        # models one request at a time.
        self.embedding: set[str] = set()
        self.configure(routing)

    def configure(self, routing: RoutingSettings) -> None:
        # Fleet-wide only when written in the settings: the default is learned.
        self.fleet_wide = routing.parallel if "parallel" in routing.model_fields_set else None

    def configured(self, node: Node) -> int | None:
        return node.config.parallel or self.fleet_wide

    def slots(self, node: Node, key: str | None = None) -> int:
        """Requests ``node`` runs at once for ``key``: one for an embedding model (as
        Ollama forces), the configured figure, else the learned one (one to start)."""
        if key is not None and key in self.embedding:
            return 1
        configured = self.configured(node)
        if configured is not None:
            return configured
        return node.learned_slots.get(key, 1) if key is not None else 1

    def may_probe(self, node: Node, key: str) -> bool:
        """Whether one request more than the slots may go to ``node`` now, to learn."""
        return (
            self.configured(node) is None
            and key not in self.embedding
            and key not in node.probing
            and node.learned_slots.get(key, 1) < MAX_LEARNED
            and self.clock() >= node.probe_after.get(key, 0.0)
        )

    def finished(self, node: Node, key: str, sample: Sample, *, probe: bool, ahead: int) -> None:
        """An answer came: learn from a probe's timings, check a configured figure's.
        ``ahead``: olmd's requests on the node for ``key`` when this one was sent."""
        waited = waited_inside(sample)
        if probe:
            node.probing.discard(key)
            if waited:
                node.probe_after[key] = self.clock() + PROBE_BACKOFF
            else:
                learned = node.learned_slots.get(key, 1) + 1
                node.learned_slots[key] = learned
                log.info("slots_learned", node=node.name, model=key, slots=learned)
            return
        configured = self.configured(node)
        if configured is not None and waited and ahead < configured and key not in node.warned:
            node.warned.add(key)
            log.warning(
                "slots_mismatch",
                node=node.name,
                model=key,
                configured=configured,
                note=f"a request waited inside the node with {ahead} others on it: "
                "its OLLAMA_NUM_PARALLEL is lower than olmd's parallel",
            )
