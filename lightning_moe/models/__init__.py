"""The model: find its tokenizer (tokenizer.py), build it (build.py: pretrained or random base, 4-bit, kernels,
activation checkpointing, LoRA, MoE), the LoRA (lora.py) and checkpointing policies (activation_checkpointing.py),
Liger's kernels (kernels.py), the FLOP count (flops.py) and the architecture configs (architectures/*.json)."""
