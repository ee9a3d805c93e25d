"""Measuring a detector: S-MAD metrics, reports and figures."""
