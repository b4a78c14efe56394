"""edge-run devices."""
