"""What a run reports and writes: summary.json (summary.py), the sweep table (sweep.py), loggers (loggers.py), the
routing heatmap (heatmap.py) and keeping secrets out of all of it (redact.py)."""
