"""model.base_precision=fp8 on a CPU: the knob's validation, its refusal before any weights, and the conversion
itself through torchao's emulated FP8 matmuls (the GPU run: tests/test_gpu.py)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import compose, run_guarded, tiny_hf_config

from lightning_moe.config import ConfigError, validate_config
from lightning_moe.models.prechecks import check_fp8


@pytest.mark.parametrize("overrides, message", [
    (["model.base_precision=fp16"], "model.base_precision: 'fp16' is not one of bf16, fp8"),
    (["model.base_precision=fp8"], "model.base_precision: fp8 needs model.dtype=bfloat16, got float32"),
    (["model.base_precision=fp8", "model.dtype=bfloat16", "lora.enabled=false"], "enable lora"),
    (["model.base_precision=fp8", "model.dtype=bfloat16", "model.compile=all"], "fp8 with model.compile=all fails"),
    (["model.fp8_grad_dtype=e3m4"], "model.fp8_grad_dtype: 'e3m4' is not one of e5m2, e4m3"),
])
def test_the_fp8_knob_is_validated_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        validate_config(compose(overrides))


def test_fp8_is_refused_on_gpus_without_fp8_naming_the_device():
    with pytest.raises(ConfigError, match=r"A100-SXM4-80GB has 8.0: use model.base_precision=bf16"):
        check_fp8("gpu", True, (8, 0), "NVIDIA A100-SXM4-80GB")
    check_fp8("gpu", True, (9, 0), "NVIDIA H100 80GB HBM3")  # Hopper: accepted (torchao is installed)


def test_fp8_on_a_cpu_is_refused_before_any_weights(tmp_path):
    out, report = run_guarded("model.dtype=bfloat16", "model.base_precision=fp8", f"hydra.run.dir={tmp_path}/run",
                              cwd=tmp_path)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "model.base_precision: fp8 needs a CUDA GPU with FP8 tensor cores" in out.stderr
    assert not report["weights_built"]


def _tiny_lora_moe(seed: int = 0):
    from lightning_moe.config.schema import LoRAConfig, ModelConfig, MoEConfig
    from lightning_moe.models.build import build_model
    from lightning_moe.moe.layer import RoutingContext

    torch.manual_seed(seed)
    model, _ = build_model(ModelConfig(init="random", arch="tiny-mistral"), LoRAConfig(r=8, alpha=16, dropout=0.0),
                           MoEConfig(expert_dim=16, num_layers=2), tiny_hf_config(), RoutingContext(),
                           vocab_size=2048, seed=seed)
    for name, p in model.named_parameters():  # LoRA B starts at 0: make every adapter's gradient non-trivial
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    return model


def test_only_the_frozen_lora_bases_become_fp8_and_their_weights_get_no_gradient():
    pytest.importorskip("torchao.float8")
    from torchao.float8.float8_linear import Float8Linear

    from lightning_moe.checkpointing.contents import trainable_state_keys
    from lightning_moe.models.fp8 import convert_frozen_base_to_fp8

    model = _tiny_lora_moe()
    bf16_bytes = {n: m.weight.nbytes for n, m in model.named_modules() if n.endswith(".base_layer")}
    count = convert_frozen_base_to_fp8(model, cache_weights=True, emulate=True)  # emulated FP8 rounding, on a CPU
    fp8 = {n for n, m in model.named_modules() if isinstance(m, Float8Linear)}
    assert count == len(fp8) == 4 * 7  # q, k, v, o, gate, up, down of each of the 4 layers
    assert all(n.endswith(".base_layer") for n in fp8)
    # the cache replaces the weight: 1 byte an element in place of the model's dtype, the old tensor gone
    modules = dict(model.named_modules())
    assert all(modules[n].weight.dtype == torch.float8_e4m3fn and modules[n].weight.nbytes * 4 == bf16_bytes[n]
               for n in fp8)  # this tiny model is float32: a quarter (half of bf16's on the GPU)
    assert sum(n.endswith("base_layer.weight_scale") for n, _ in model.named_buffers()) == count
    assert all(p.dtype != torch.float8_e4m3fn for p in model.parameters() if p.requires_grad)
    assert not any(".base_layer." in k for k in trainable_state_keys(model))  # never checkpointed
    model.to("cpu")  # a move keeps the FP8 weights...
    with pytest.raises(RuntimeError, match="use trainer.precision=bf16-mixed"):
        copy.deepcopy(model).to(torch.bfloat16)  # ...a dtype cast would read them without their scales: refused

    ids = torch.randint(4, 2048, (2, 48), generator=torch.Generator().manual_seed(1))
    ref = _tiny_lora_moe()
    losses = []
    for m in (ref, model):
        loss = m(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        losses.append(loss.detach())
    # FP8's rounding moves the loss a little, not the function: close to the float32 model's
    torch.testing.assert_close(losses[1], losses[0], rtol=2e-2, atol=2e-2)
    trained = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None for g in trained.values())
    assert all(g.abs().sum() > 0 for n, g in trained.items() if "lora_" in n)
    assert all(m.weight.grad is None for n, m in model.named_modules() if n in fp8)


@pytest.mark.parametrize("cache, grads", [(True, "e5m2"), (False, "e5m2"), (False, "e4m3")])
def test_the_frozen_fp8_matmul_equals_torchaos_float8_linear_without_the_weight_gradient(cache, grads):
    """Our glue runs torchao's own casts and FP8 matmuls, minus the third (the weight's gradient): the output and
    the input's gradient equal Float8Linear's exactly, with the weight's FP8 copy cached or cast in the forward and
    again in the backward (then only the bf16 weight waits for the backward)."""
    pytest.importorskip("torchao.float8")
    from torchao.float8.float8_linear import Float8Linear

    from lightning_moe.models.fp8 import convert_frozen_base_to_fp8, fp8_config

    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 32, bias=False)
    lin.weight.requires_grad_(False)
    holder = torch.nn.Module()
    holder.base_layer = lin
    reference = Float8Linear.from_float(torch.nn.Linear(64, 32, bias=False), config=fp8_config(grads, emulate=True))
    reference.weight = torch.nn.Parameter(lin.weight.detach().clone())
    assert convert_frozen_base_to_fp8(holder, cache_weights=cache, grad_dtype=grads, emulate=True) == 1
    assert str(holder.base_layer.config.cast_config_grad_output.target_dtype) == f"torch.float8_{grads}" + "fn" * (
        grads == "e4m3")
    x = torch.randn(3, 5, 64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    g = torch.randn(3, 5, 32)
    saved = []  # what the backward keeps alive: without the cache, no FP8 copy of the weight waits for it
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(type(t).__name__) or t, lambda t: t):
        out = holder.base_layer(x)
    assert ("Float8TrainingTensor" in saved) == cache, saved
    out.backward(g)
    out_ref = reference(x_ref)
    out_ref.backward(g)
    torch.testing.assert_close(out, out_ref, rtol=0, atol=0)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=0, atol=0)
    assert holder.base_layer.weight.grad is None and reference.weight.grad is not None
