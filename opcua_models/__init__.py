"""vbatt."""
