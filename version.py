"""edge-run's version: one definition, read by pyproject.toml, manifests and cache keys."""

__version__ = "0.1.0"
