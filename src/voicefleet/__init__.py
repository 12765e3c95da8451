"""voicefleet: run LiveKit voice agents in production on your own machines."""

__version__ = "0.1.0"

__all__ = ["__version__"]
