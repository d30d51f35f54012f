"""lightning-moe: Lightning fine-tuning recipes with LoRA and domain-expert MoE layers.

Importing the package is cheap on purpose (no torch/transformers): `train.py` validates the
config before the heavy stack is imported, so a bad override fails in about a second.
"""

__version__ = "0.1.0"

import logging as _logging

# bitsandbytes (imported by peft) looks for an optional 4-bit CPU kernel on the Hugging Face Hub at import on CPUs
# with AVX-512 BF16 and, offline or refused, warns "Failed to load CPU gemm_4bit_forward" in every command before
# falling back to its own kernel, the one QLoRA on a CPU has always used here. Nothing is lost: keep only its errors.
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)
# torchao (imported by transformers and peft when installed: model.base_precision=fp8) tries its CUDA-only kernel
# libraries at import and warns "Failed to load ... .so" on a CPU, then registers two enums with torch's pytree, which
# torch 2.13 answers with a deprecation warning: neither concerns anything this project runs.
_logging.getLogger("torchao").setLevel(_logging.ERROR)
_logging.getLogger("torch.utils._pytree").setLevel(_logging.ERROR)
