"""The model: its architecture config without weights (architecture.py) and the checks that need it but no weights
(prechecks.py), its module layout (layout.py: decoder layers, MLPs, which layers get MoE), its tokenizer
(tokenizer.py), building it (build.py: pretrained or random base, 4-bit, kernels, activation checkpointing, LoRA,
MoE blocks put in by inject.py), the LoRA (lora.py) and checkpointing policies (activation_checkpointing.py),
Liger's kernels (kernels.py), the FLOP count (flops.py) and the architecture configs (architectures/*.json)."""
