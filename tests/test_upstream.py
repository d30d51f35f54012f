"""The private upstream APIs lightning_moe.upstream relies on still exist and still do what it assumes."""

from __future__ import annotations

import torch
from conftest import tiny_model


def test_bnb_cpu_repacking_is_off_for_layers_it_cannot_pack(tmp_path):
    """bitsandbytes' CPU inference repacking needs in_features divisible by its block size; the tiny model's
    352-wide down_proj is not. With it off, a 4-bit model runs validation-style (eval, no grad) on any CPU."""
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from lightning_moe.upstream import disable_bnb_cpu_packing

    tiny_model().save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, device_map={"": "cpu"}, quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32))
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and all(hasattr(m, "support_avx512bf16_for_cpu") for m in layers)  # the attribute we set
    disable_bnb_cpu_packing(model)
    assert not any(m.support_avx512bf16_for_cpu for m in layers if m.in_features % 64)
    with torch.no_grad():
        out = model.eval()(input_ids=torch.randint(0, 2000, (1, 8))).logits
    assert torch.isfinite(out).all()
