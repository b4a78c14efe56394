"""edge-run export."""
