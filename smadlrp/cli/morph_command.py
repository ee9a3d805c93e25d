"""`smadlrp morph` (being built)."""
