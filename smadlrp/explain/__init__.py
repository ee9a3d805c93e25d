"""Explaining a detector: explain/trace runs, heatmaps and the comparison of rules."""
