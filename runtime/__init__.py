"""edge-run runtime."""
