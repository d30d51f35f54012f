"""The callbacks this project adds to Lightning's (conf/callbacks/default.yaml lists them all): the wall-clock
budget (budget.py), expert usage (expert_usage.py), MFU against the right peak (throughput.py) and the run's
numbers for summary.json (run_stats.py). Checkpoint and resume callbacks are in lightning_moe/checkpointing/."""
