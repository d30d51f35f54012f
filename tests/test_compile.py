"""model.compile: compiled training equals eager training, and micro-batches of varying shapes do not keep
recompiling. aot_eager runs dynamo and AOTAutograd (the graphs, guards and recompiles inductor would get) without
generating code, so the test takes seconds on a CPU; tests/test_gpu.py runs inductor on a GPU."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import REPO, compose
from lightning_moe.config.validate import validate_config
from lightning_moe.data.chat import ChatRenderer
from lightning_moe.data.collate import ChatCollator
from lightning_moe.models.compilation import compiled_modules
from lightning_moe.models.prechecks import check_before_weights
from lightning_moe.moe.layer import MoEBlock
from lightning_moe.training.module import MoELoRAModule

# layer 0: MoE, not checkpointed; 1: MoE, checkpointed; 2: dense; 3: dense, checkpointed (spread_layers(4, 2))
LAYOUT = ["moe.layers=[0,1]", "model.gradient_checkpointing=true", "model.gradient_checkpointing_layers=2",
          "data.packing=true"]


def _module(tokenizer, *overrides):
    cfg = compose([*LAYOUT, *overrides])
    sections = validate_config(cfg)
    module = MoELoRAModule(sections, check_before_weights(cfg, sections), len(tokenizer), seed=0)
    module.configure_model()
    return module.train()


def _batches(tokenizer, sizes):
    """Packed micro-batches of the bundled conversations, `sizes` conversations each: rows of up to 256 tokens,
    so the row count and the row length both change from one micro-batch to the next."""
    lines = (REPO / "data" / "therapeutic_sample.jsonl").read_text().splitlines()
    render = ChatRenderer(tokenizer, 256)
    feats = [render(json.loads(line)["messages"]) | {"domain_id": i % 4} for i, line in enumerate(lines)]
    collate = ChatCollator(tokenizer.pad_token_id, packing=True, row_length=256)
    out, start = [], 0
    for size in sizes:
        out.append(collate(feats[start:start + size]))
        start += size
    return out


def test_compile_scopes_pick_whole_layers_and_split_a_checkpointed_moe_layer(tokenizer):
    model = _module(tokenizer).model
    layers = [m for m in model.modules() if type(m).__name__ == "MistralDecoderLayer"]
    blocks = [m for m in model.modules() if isinstance(m, MoEBlock)]
    assert [layer.gradient_checkpointing for layer in layers] == [False, True, False, True]
    assert compiled_modules(model, "none") == []
    assert compiled_modules(model, "layers") == [layers[2], layers[3]]
    assert compiled_modules(model, "moe") == blocks
    # the checkpointed MoE layer child by child: its block's routing record cannot sit inside a checkpoint
    assert compiled_modules(model, "all") == [layers[0], *layers[1].children(), layers[2], layers[3]]


@pytest.mark.slow
@pytest.mark.parametrize("scope", ["all", "moe"])
def test_compiled_training_equals_eager_and_recompiles_stop_growing(tokenizer, scope):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    eager = _module(tokenizer)
    compiled = _module(tokenizer, f"model.compile={scope}", "model.compile_backend=aot_eager")
    sizes = [3, 7, 2, 11, 5, 9, 4, 13]
    batches = _batches(tokenizer, sizes)
    assert len({tuple(b["input_ids"].shape) for b in batches}) >= 6  # shapes really vary
    frames = []
    for batch in batches:
        losses = []
        for module in (eager, compiled):
            module.zero_grad(set_to_none=True)
            loss, _ = module.forward_batch(batch)
            loss.backward()
            losses.append(loss.detach())
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
        for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
            if p.requires_grad:
                torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)
        gates = [[r.out.gates for r in m.routing_records] for m in (eager, compiled)]
        assert len(gates[1]) == len(gates[0]) == 2
        for a, b in zip(*gates):
            torch.testing.assert_close(b, a)
        frames.append(counters["frames"]["ok"])
    assert frames[0] > 0, "nothing was compiled"
    # the first micro-batch compiles each variant (a layer checkpointed or not, the first layer's input without
    # gradients, the backward's recomputation), shapes dynamic from the start; later ones only reuse them, and the
    # layers of one kind share theirs: at most 7 frames for `all` (6 on transformers 5.17, which checkpoints a
    # layer's whole call; 7 from 5.2x, which checkpoints its forward inside the call), 2 for `moe`
    assert frames == [frames[0]] * len(batches), f"recompiled after the first micro-batch: {frames}"
    assert frames[0] <= {"all": 7, "moe": 2}[scope], f"more compiled variants than layer kinds explain: {frames}"
    assert counters["graph_break"] == {}, dict(counters["graph_break"])
    _assert_kernels_routing_restored(compiled.model)


def _assert_kernels_routing_restored(model):
    """The side effect that compiled checkpoints do not replay (compilation.allow_restored_side_effects_under_checkpoint):
    transformers >= 5.2x wraps each attention forward in `kernels`' use_kernelized_func, which sets a module-level
    variable and restores it. After compiled and eager steps it must hold what it held before any: nothing."""
    from lightning_moe.models.compilation import kernelized_attention

    if not kernelized_attention(model):
        return  # a transformers without the wrapper: no such side effect
    attention = next(m for m in model.modules() if type(m).__name__ == "MistralAttention")
    active = type(attention).forward.__globals__["_ACTIVE_KERNEL_FUNCS"]
    assert active.get() is None and active.global_var is None
    assert not active.uses_global_var


@pytest.mark.slow  # inductor generates and compiles C++ on a CPU: a minute or more a run
def test_compiled_code_is_kept_with_the_run_and_a_second_start_reuses_it(tmp_path):
    """model.compile with inductor (the MoE blocks alone: the least C++ to build) keeps its compiled graphs in
    model.compile_cache_dir (by default the run's
    compile_cache/): a second process on the same folder takes every graph from it and generates none."""
    from conftest import read_summary, run_train

    cache = tmp_path / "shared_cache"
    counts = []
    for run in ("first", "second"):
        # one optimizer step and no validation (eval mode compiles graphs of its own): the least C++ to build
        out = run_train("model.compile=moe", f"model.compile_cache_dir={cache}", "trainer.max_steps=1",
                        "trainer.limit_val_batches=0", "trainer.num_sanity_val_steps=0", "data.max_length=64",
                        "logger=csv", f"hydra.run.dir={tmp_path / run}", timeout=900)
        assert out.returncode == 0, out.stdout[-3000:]
        counts.append(read_summary(tmp_path / run)["model"]["compile_cache"])
    assert counts[0]["fx_graph_misses"] > 0 and counts[0]["fx_graph_hits"] == 0, counts
    assert counts[1]["fx_graph_hits"] >= counts[0]["fx_graph_misses"] and counts[1]["fx_graph_misses"] == 0, counts
    assert any((cache / "inductor").rglob("*")), "nothing written to the cache folder"
