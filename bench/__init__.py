"""edge-run bench."""
