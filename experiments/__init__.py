"""Experiment scripts behind RESULTS.md's figures: each is run with `python -m experiments.<name>` from the root."""
