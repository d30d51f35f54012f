"""Generating from a trained run: batched generation and chat through the tokenizer's chat template, with routing
decided as in training and a KV cache (generate.py, chat.py)."""
