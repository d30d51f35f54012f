"""What only a CUDA GPU can check: Liger's Triton kernels (model.liger_kernel) change speed, not results.
Skipped on CPU (CI); run on the GPU machine: `python -m pytest tests/test_gpu.py`."""

from __future__ import annotations

import contextlib
import importlib
import math
import warnings

import pytest
import torch
from conftest import read_summary, run_train

from lightning_moe.config.schema import LoRAConfig, ModelConfig, MoEConfig
from lightning_moe.models.architecture import resolve_model_config
from lightning_moe.models.build import build_model
from lightning_moe.moe.layer import RoutingContext

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


# transformers' Mistral module before any test applied Liger to it (collection imports this file before any test runs)
_MISTRAL_AS_IMPORTED = dict(vars(importlib.import_module("transformers.models.mistral.modeling_mistral")))

def _loss_and_grads(liger: bool, ids: torch.Tensor, labels: torch.Tensor):
    torch.manual_seed(0)
    cfg = resolve_model_config(ModelConfig(init="random", arch="tiny-mistral"))
    m = ModelConfig(init="random", arch="tiny-mistral", liger_kernel=liger)
    model, _ = build_model(m, LoRAConfig(r=8, alpha=16), MoEConfig(enabled=False), cfg, RoutingContext(),
                           vocab_size=2048, device=torch.device("cuda"))
    for name, p in model.named_parameters():  # LoRA B starts at 0: give it values so every gradient is non-trivial
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02, generator=torch.Generator("cuda").manual_seed(len(name)))
    model.train()
    loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def test_liger_kernels_give_the_same_loss_and_lora_gradients():
    gen = torch.Generator("cuda").manual_seed(1)
    ids = torch.randint(4, 2048, (2, 96), device="cuda", generator=gen)
    labels = ids.clone()
    labels[:, :40] = -100  # prompt tokens masked, as in chat training
    ref_loss, ref_grads = _loss_and_grads(False, ids, labels)
    loss, grads = _loss_and_grads(True, ids, labels)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=1e-4)
    assert grads.keys() == ref_grads.keys() and len(grads) > 0
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-3, atol=1e-5, msg=name)


def test_the_recipe_trains_on_the_gpu_with_liger_and_moe(tmp_path):
    run_dir = tmp_path / "run"
    out = run_train("+recipe=therapeutic_h100", "model.init=random", "model.arch=tiny-mistral", "moe.layers=[1,3]",
                    "model.gradient_checkpointing_layers=2", "model.tokenizer=bundled", "data=sample",
                    "data.max_length=256", "logger=csv",
                    "trainer.max_steps=4", "trainer.accumulate_grad_batches=2", "trainer.val_check_interval=4",
                    "trainer.limit_val_batches=2", f"hydra.run.dir={run_dir}", timeout=300)
    assert out.returncode == 0, out.stdout[-3000:]
    s = read_summary(run_dir)
    assert s["stop_reason"] == "max_steps" and s["global_step"] == 4 and s["model"]["moe_layers"] == [1, 3]
    assert math.isfinite(s["train_loss"]) and math.isfinite(s["val_loss"])


def test_activation_offloading_on_a_side_stream_gives_the_same_gradients():
    """model.offload_activations on CUDA: copies to pinned memory on a side stream, back on the compute stream.
    A missing stream wait would hand the backward pass stale or half-copied activations."""
    from lightning_moe.training.offload import OffloadSavedActivations

    cfg = resolve_model_config(ModelConfig(init="random", arch="tiny-mistral"))
    ids = torch.randint(4, 2048, (4, 512), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    runs = []
    for offload in (False, True):
        torch.manual_seed(0)
        ctx = RoutingContext()
        model, _ = build_model(ModelConfig(init="random", arch="tiny-mistral", gradient_checkpointing=True),
                               LoRAConfig(r=8, alpha=16), MoEConfig(expert_dim=8, num_layers=2), cfg, ctx,
                               vocab_size=2048, device=torch.device("cuda"))
        hooks = OffloadSavedActivations(min_bytes=4096)
        ctx.start()
        with hooks if offload else torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        ctx.stop()
        loss.backward()
        runs.append((hooks.offloaded_bytes, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    assert runs[0][0] == 0 and runs[1][0] >= cfg.num_hidden_layers * 4 * 512 * cfg.hidden_size * 4
    for name, grad in runs[1][1].items():
        torch.testing.assert_close(grad, runs[0][1][name], msg=name)


# torch 2.11's inductor fails to lower flex_attention's kernel for this mask (seen on an H200 with transformers 5.17:
# an inductor error "Found from: ... flex_attention_hop(", benchmarks/2026-12-01_h200/flex_test.txt); the recipes
# run varlen.
# Not strict: a torch that compiles it passes, and the test then checks the packed result as for the others
FLEX_XFAIL = pytest.mark.xfail(
    torch.__version__.startswith("2.11"), strict=False,
    reason="torch 2.11: inductor fails to lower flex_attention's kernel (an error in flex_attention_hop)")


@pytest.mark.parametrize("attn", ["sdpa", "varlen", pytest.param("flex_attention", marks=FLEX_XFAIL)])
def test_packed_rows_on_the_gpu_attend_within_each_conversation(tokenizer, attn):
    """The GPU attention paths of packed rows (one row of several conversations, marked by position_ids): each
    conversation's logits equal it alone, for SDPA, varlen's FlashAttention spans and flex_attention's document
    mask."""
    from lightning_moe.data.chat import ChatRenderer
    from lightning_moe.data.collate import ChatCollator
    from lightning_moe.models.varlen import varlen_inputs

    torch.manual_seed(0)
    cfg = resolve_model_config(ModelConfig(init="random", arch="tiny-mistral"))
    m = ModelConfig(init="random", arch="tiny-mistral", attn_implementation=attn)
    model, _ = build_model(m, LoRAConfig(enabled=False), MoEConfig(enabled=False), cfg, RoutingContext(), 2048,
                           device=torch.device("cuda"), training=False)
    render = ChatRenderer(tokenizer, 512)
    texts = ["I keep worrying about work.", "Why do I feel tired all the time?", "Is it normal to cry a lot?"]
    rows = [render([{"role": "user", "content": t}, {"role": "assistant", "content": t[::-1]}]) | {"domain_id": -1}
            for t in texts]
    packed = ChatCollator(tokenizer.pad_token_id, packing=True, row_length=4096)(rows)
    assert packed["input_ids"].shape[0] == 1  # one row holds all three
    # FlashAttention (varlen) takes 16-bit inputs: autocast as in bf16-mixed training
    amp = torch.autocast("cuda", torch.bfloat16) if attn == "varlen" else contextlib.nullcontext()
    tol = 3e-2 if attn == "varlen" else 2e-3
    with torch.no_grad(), amp, warnings.catch_warnings():
        warnings.filterwarnings("error", message="attn_implementation=varlen on float32")  # the kernel, not SDPA
        spans = {k: v.cuda() if torch.is_tensor(v) else v for k, v in varlen_inputs(model, packed).items()}
        assert bool(spans) == (attn == "varlen")
        together = model(input_ids=packed["input_ids"].cuda(), position_ids=packed["position_ids"].cuda(),
                         use_cache=False, **spans).logits[0]
        start = 0
        for r in rows:
            n = len(r["input_ids"])
            alone = model(input_ids=torch.tensor([r["input_ids"]], device="cuda"), use_cache=False).logits[0]
            torch.testing.assert_close(together[start:start + n], alone, rtol=tol, atol=tol)
            start += n
        if spans:  # the spans keep them apart: one span over the row mixes the last conversation with the others
            whole = spans | {"cu_seq_lens_q": spans["cu_seq_lens_q"][[0, -1]], "max_length_q": start}
            mixed = model(input_ids=packed["input_ids"].cuda(), position_ids=packed["position_ids"].cuda(),
                          use_cache=False, **whole).logits[0]
            assert (mixed[start - n:start] - alone).abs().max() > 10 * (together[start - n:start] - alone).abs().max()


def test_compiled_layers_with_liger_and_varlen_match_eager_and_stop_recompiling(tokenizer):
    """model.compile=all with inductor over the recipe's kernels (varlen spans; Liger's fused cross-entropy, its
    in-layer kernels left to inductor) and the MoE blocks: the same losses as eager with all of Liger's kernels
    (bf16 autocast: the fusions round differently), no graph break, and no new compile once each shape variant
    has been seen."""
    from test_compile import _batches, _module
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    from transformers.models.mistral import modeling_mistral

    kernels = ["model.liger_kernel=true", "model.attn_implementation=varlen", "trainer.accelerator=gpu"]
    eager = _module(tokenizer, *kernels).cuda()
    # Liger swaps transformers' Mistral classes and RoPE function module-wide, here and in every earlier test that
    # applied it: restore them as imported, so the compiled model is built (and runs) as in a process of its own
    vars(modeling_mistral).update(_MISTRAL_AS_IMPORTED)
    compiled = _module(tokenizer, *kernels, "model.compile=all").cuda()
    frames = []
    for batch in _batches(tokenizer, [3, 7, 2, 11, 5, 9]):
        batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()}
        assert "cu_seq_lens_q" in batch  # the varlen kernel runs, not the SDPA fallback
        losses = []
        for module in (eager, compiled):
            module.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss, _ = module.forward_batch(batch)
            loss.backward()
            losses.append(loss.detach().float())
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-2, atol=1e-2)
        frames.append(counters["frames"]["ok"])
    assert frames[0] > 0 and frames[-1] == frames[0], frames
    assert counters["graph_break"] == {}, dict(counters["graph_break"])


@pytest.mark.parametrize("cache", [False, True])
def test_fp8_base_trains_a_step_with_the_frozen_projections_in_float8(tmp_path, cache):
    """model.base_precision=fp8 on a GPU with FP8 (compute capability >= 8.9): the recipe trains, and every frozen
    projection under LoRA (7 a layer) became torchao's float8 linear; with model.fp8_weight_cache=true their
    weights are held in FP8 alone (the real _scaled_mm reading the stored copy)."""
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("needs FP8 tensor cores (compute capability >= 8.9)")
    run_dir = tmp_path / "run"
    out = run_train("+recipe=therapeutic_h100", "model.init=random", "model.arch=tiny-mistral", "moe.layers=[1,3]",
                    "model.gradient_checkpointing_layers=2", "model.tokenizer=bundled", "data=sample",
                    "data.max_length=256", "logger=csv", "model.base_precision=fp8", f"model.fp8_weight_cache={cache}",
                    "trainer.max_steps=2", "trainer.accumulate_grad_batches=2", "trainer.val_check_interval=2",
                    "trainer.limit_val_batches=2", f"hydra.run.dir={run_dir}", timeout=300)
    assert out.returncode == 0, out.stdout[-3000:]
    s = read_summary(run_dir)
    assert s["stop_reason"] == "max_steps" and s["global_step"] == 2
    assert s["model"]["fp8_modules"] == 4 * 7 and math.isfinite(s["train_loss"])
