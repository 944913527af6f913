"""Scoring results: metrics (with their empty-mask conventions) and the evaluation report."""
