"""Every use of a library's private API, in one place, where no public one does the job.

Each entry names the upstream version it was written against; tests/test_upstream.py fails loudly when an
upstream change breaks one, so a library upgrade shows up as one failing test, not as a silent wrong result.
Replaced by public APIs (no longer here): Lightning's RNG-state helpers (checkpointing/resume.py uses torch's,
numpy's and random's own), `Timer._duration` (the budget keeps its own), Liger's `_apply_liger_kernel_to_instance`
(models/kernels.py calls the public per-family `apply_liger_kernel_to_*`).
"""

from __future__ import annotations

import torch


# ---- lightning 2.6.6 ---------------------------------------------------------------------------------------
def save_last_checkpoint(callback, trainer) -> None:
    """ModelCheckpoint's own 'last' save (ModelCheckpoint._save_last_checkpoint + _monitor_candidates): the name,
    the symlink option and the bookkeeping stay Lightning's. No public method saves 'last' on demand."""
    callback._save_last_checkpoint(trainer, callback._monitor_candidates(trainer))


def last_saved_step(callback) -> int:
    """The global step of ModelCheckpoint's most recent save (`_last_global_step_saved`)."""
    return callback._last_global_step_saved


def set_throughput_peak(monitor, peak_flops: float) -> None:
    """ThroughputMonitor computes MFU against `available_flops`, which it looks up in setup() from a table that
    lacks the H200's dense peak; its per-stage Throughput objects (`_throughputs`) copy the value at creation."""
    monitor.available_flops = peak_flops
    for throughput in monitor._throughputs.values():
        throughput.available_flops = peak_flops


def keep_csv_history(writer_class):
    """A subclass of Lightning's CSV ExperimentWriter whose start-up check (`_check_log_dir_exists`, which deletes
    an existing metrics.csv) reads the existing header instead, so a resumed run appends to its history."""
    import csv

    class AppendingWriter(writer_class):
        def _check_log_dir_exists(self) -> None:
            if self._fs.isfile(self.metrics_file_path):
                with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                    self.metrics_keys = list(next(csv.reader(f), []))

    return AppendingWriter


# ---- peft 0.21 ---------------------------------------------------------------------------------------------
def keep_lora_inputs_in_autocast_dtype(model: torch.nn.Module) -> int:
    """Under bf16 autocast, peft casts every LoRA input to the adapter's float32 (a copy of the activations per
    adapted projection) only for autocast to cast it back to bf16 for the matmul: 15% of an H200 step's GPU time.
    Off (`cast_input_dtype_enabled`, the flag behind peft.helpers.disable_input_dtype_casting), the same bf16
    matmuls run on the bf16 activations. The public context manager cannot be used: activation checkpointing
    recomputes the forward outside it, and non-reentrant checkpointing refuses recomputed tensors whose dtype
    differs from the first pass. Returns the number of LoRA layers changed."""
    layers = [m for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "cast_input_dtype_enabled")]
    for m in layers:
        m.cast_input_dtype_enabled = False
    return len(layers)


# ---- bitsandbytes 0.50.2 -----------------------------------------------------------------------------------
def disable_bnb_cpu_packing(model: torch.nn.Module) -> int:
    """On a CPU with AVX512-BF16, a 4-bit linear layer called in inference (eval mode, no grad: validation)
    repacks its weight for a CPU kernel that needs in_features divisible by the quantisation block size, and
    crashes otherwise (`shape '[128, 5]' is invalid`: tiny models' 352-wide MLPs). Whether it crashes depends on
    the machine's CPU, so a QLoRA run could pass on one machine and fail on another. Turn the repacking off for
    the layers it cannot handle (`Linear4bit.support_avx512bf16_for_cpu`, set in its __init__); they keep
    bitsandbytes' ordinary 4-bit path. Returns the number of layers changed."""
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


# ---- liger-kernel 0.8 ------------------------------------------------------------------------------------
def _liger_table() -> dict:
    """model type -> Liger's public `apply_liger_kernel_to_*` function. The table is module-level in
    liger_kernel.transformers.monkey_patch but not exported (names do not always follow the model type:
    llama4_text -> apply_liger_kernel_to_llama4)."""
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    return MODEL_TYPE_TO_APPLY_LIGER_FN


def liger_model_types() -> set[str]:
    return set(_liger_table())


def liger_apply_function(model_type: str):
    return _liger_table()[model_type]


# ---- torchao 0.17.0 (float8 training) -------------------------------------------------------------------------
def torchao_float8_cast():
    """torchao.float8's dynamic cast of a high-precision tensor to a `Float8TrainingTensor` (tensorwise scale), the
    one Float8Linear's own matmul uses (`float8_scaling_utils.hp_tensor_to_float8_dynamic`, not exported): our
    frozen-weight matmul (models/fp8.py) casts its activations and output gradients the same way."""
    from torchao.float8.float8_scaling_utils import hp_tensor_to_float8_dynamic

    return hp_tensor_to_float8_dynamic


# ---- torch 2.11-2.13 (compile) ----------------------------------------------------------------------------------
def compile_cache_counts() -> dict:
    """How many compiled graphs this process took from torch's on-disk caches and how many it had to generate:
    dynamo's `counters` (torch._dynamo.utils), keyed as inductor and AOTAutograd count them."""
    from torch._dynamo.utils import counters

    return {"fx_graph_hits": counters["inductor"]["fxgraph_cache_hit"],
            "fx_graph_misses": counters["inductor"]["fxgraph_cache_miss"],
            "autograd_cache_hits": counters["aot_autograd"]["autograd_cache_hit"],
            "autograd_cache_misses": counters["aot_autograd"]["autograd_cache_miss"]}
