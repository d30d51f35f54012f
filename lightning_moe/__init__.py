"""lightning-moe: Lightning fine-tuning recipes with LoRA and domain-expert MoE layers.

Importing the package is cheap on purpose (no torch/transformers): `train.py` validates the
config before the heavy stack is imported, so a bad override fails in about a second.
"""

__version__ = "0.1.0"
