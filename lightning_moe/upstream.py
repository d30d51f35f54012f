"""Every use of a library's private API, in one place.

Each entry says which upstream version it was written against; tests/test_upstream.py fails loudly when an
upstream change breaks one, so a library upgrade shows up as one failing test, not as a silent wrong result.
"""

from __future__ import annotations

import torch


def disable_bnb_cpu_packing(model: torch.nn.Module) -> int:
    """bitsandbytes 0.50.2: on a CPU with AVX512-BF16, a 4-bit linear layer called in inference (eval mode, no
    grad: validation) repacks its weight for a CPU kernel that needs in_features divisible by the quantisation
    block size, and crashes otherwise (`shape '[128, 5]' is invalid`: tiny models' 352-wide MLPs). Whether it
    crashes depends on the machine's CPU, so a QLoRA run could pass on one machine and fail on another. Turn the
    repacking off for the layers it cannot handle (`Linear4bit.support_avx512bf16_for_cpu`, set in its
    __init__); they keep bitsandbytes' ordinary 4-bit path. Returns the number of layers changed."""
    changed = 0
    for module in model.modules():
        if type(module).__name__ != "Linear4bit" or not getattr(module, "support_avx512bf16_for_cpu", False):
            continue
        state = getattr(module.weight, "quant_state", None)
        block = getattr(state, "blocksize", 64)
        if module.in_features % block or module.out_features % 32:
            module.support_avx512bf16_for_cpu = False
            changed += 1
    return changed
