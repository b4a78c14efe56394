"""edge-run quant."""
