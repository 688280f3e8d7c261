"""One download per model for the whole fleet (``[distribution] mode = "gateway"``).

``cache`` is the blob cache on disk, ``client`` fetches manifests and blobs from a
registry as Ollama does, ``mirror`` is the engine that brings a model into the cache,
``nodeapi`` the node calls a fan-out makes (pull, copy, delete), ``fanout`` runs one of
them on many nodes with one merged progress stream, ``offline`` imports and exports
Ollama models directories. It may import only the core (settings, domain, metrics,
atomicfile, logs); ``sync`` and ``gateway`` import it, never the other way round.
"""
