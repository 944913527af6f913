"""Cohorts: many studies in one run - the cases and their output names, the results table, one model per
process segmenting case after case, and the same run on a Ray cluster. Torch-free at import."""
