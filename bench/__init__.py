"""The pain-cds benchmark: `python bench/run.py` (see the README, Performance)."""
