"""Editing SAM codes: the direction library and the per-layer rule (paper Sec. 3.4)."""
