"""olmd, the Ollama fleet daemon."""

__version__ = "0.1.0"
