"""Metric modules for `evaluate.load` (each folder holds one script named like the folder)."""
