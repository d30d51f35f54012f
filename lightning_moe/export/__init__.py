"""Export for serving: merged HF models, PEFT adapters, and one adapter per domain with its router (export.py)."""
