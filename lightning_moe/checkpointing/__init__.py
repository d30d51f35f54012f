"""Checkpoints: atomic files (io.py), what they hold (contents.py), the base-model and trained-settings record
compared before weights load (fingerprint.py), exact resume (resume.py), the final-step checkpoint callback
(last.py) and loading a trained run for evaluation, generation and export (load.py)."""
