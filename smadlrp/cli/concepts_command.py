"""`smadlrp concepts` (being built)."""
