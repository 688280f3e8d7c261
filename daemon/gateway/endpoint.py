"""A proxied route as the route table declares it (``daemon.gateway.routes.ENDPOINTS``)."""

from __future__ import annotations

from dataclasses import dataclass

from daemon.gateway.dialects import Dialect


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A proxied route: the client's path, the node's path, and its dialect."""

    path: str
    upstream: str
    dialect: Dialect = "ollama"
    streams: bool = False  # the route can stream (Ollama's by default, the others if asked)
    form: bool = False  # a multipart form, its model a form field
    events: bool = False  # an SSE stream that names its events (``event:`` lines)
