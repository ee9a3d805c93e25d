"""`smadlrp vuln` (being built)."""
