"""The callbacks this project adds to Lightning's (conf/callbacks/default.yaml lists them all): the wall-clock
budget (budget.py), expert usage (expert_usage.py), MFU against the right peak (throughput.py) and the run's
numbers for summary.json (run_stats.py); sigterm.py (always on, not in the config) makes DDP ranks stop on
SIGTERM after the same micro-batch. Checkpoint and resume callbacks are in lightning_moe/checkpointing/."""
