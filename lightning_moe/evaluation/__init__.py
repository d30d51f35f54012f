"""Evaluating a trained run against its base: per-domain loss and perplexity, routing, bias probes (evaluate.py)."""
