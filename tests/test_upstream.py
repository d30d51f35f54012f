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


def test_lightning_private_parts_used_by_upstream_py_exist():
    """lightning 2.6: ModelCheckpoint's last-save internals, ThroughputMonitor's per-stage Throughput objects, the CSV
    writer's start-up check. If one is renamed, this fails instead of the final-step checkpoint silently vanishing."""
    from lightning.pytorch.callbacks import ModelCheckpoint, ThroughputMonitor
    from lightning.pytorch.loggers.csv_logs import ExperimentWriter

    from lightning_moe.upstream import keep_csv_history

    ckpt = ModelCheckpoint(save_last=True)
    assert callable(ckpt._save_last_checkpoint) and callable(ckpt._monitor_candidates)
    assert ckpt._last_global_step_saved == 0
    assert isinstance(ThroughputMonitor(batch_size_fn=len)._throughputs, dict)
    assert callable(ExperimentWriter._check_log_dir_exists)
    assert keep_csv_history(ExperimentWriter)._check_log_dir_exists is not ExperimentWriter._check_log_dir_exists


def test_csv_history_is_kept_where_lightning_would_delete_it(tmp_path):
    from lightning.pytorch.loggers.csv_logs import ExperimentWriter

    from lightning_moe.upstream import keep_csv_history

    first = ExperimentWriter(str(tmp_path))
    first.log_metrics({"loss": 1.0}, step=0)
    first.save()
    again = keep_csv_history(ExperimentWriter)(str(tmp_path))
    again.log_metrics({"loss": 0.5}, step=1)
    again.save()
    rows = (tmp_path / "metrics.csv").read_text().splitlines()
    assert rows[0].split(",") == ["loss", "step"] and len(rows) == 3


def test_peft_input_cast_flag_exists_on_lora_layers():
    """peft 0.21: `cast_input_dtype_enabled` on every LoRA layer (the flag behind peft.helpers.disable_input_dtype_casting)."""
    from peft import LoraConfig, get_peft_model

    from lightning_moe.upstream import keep_lora_inputs_in_autocast_dtype

    model = get_peft_model(tiny_model(), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert keep_lora_inputs_in_autocast_dtype(model) == 2 * 4
    assert not any(m.cast_input_dtype_enabled for m in model.modules() if hasattr(m, "cast_input_dtype_enabled"))


def test_liger_table_maps_the_tiny_families_to_public_functions():
    import pytest

    liger = pytest.importorskip("liger_kernel.transformers")
    from lightning_moe.upstream import liger_apply_function, liger_model_types

    assert {"mistral", "llama", "qwen2"} <= liger_model_types()
    assert liger_apply_function("mistral") is liger.apply_liger_kernel_to_mistral


def test_torchao_float8_cast_is_the_one_float8_linear_uses():
    import pytest

    pytest.importorskip("torchao.float8")
    from torchao.float8 import float8_linear

    from lightning_moe.upstream import torchao_float8_cast

    assert torchao_float8_cast() is float8_linear.hp_tensor_to_float8_dynamic


def test_compile_cache_counts_read_the_counters_inductor_and_aot_autograd_keep():
    from torch._dynamo.utils import counters

    from lightning_moe.upstream import compile_cache_counts

    counters.clear()
    counters["inductor"]["fxgraph_cache_hit"] += 2
    counters["aot_autograd"]["autograd_cache_miss"] += 1
    assert compile_cache_counts() == {"fx_graph_hits": 2, "fx_graph_misses": 0, "autograd_cache_hits": 0,
                                      "autograd_cache_misses": 1}
    counters.clear()
