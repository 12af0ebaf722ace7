"""Objective, judge-free scorers and the statistics behind every eval verdict (no Prefect, no torch)."""
