"""Generation routes as training does: with the KV cache it gives exactly the tokens of a full recompute for every
router, expert form and routing level; prompts become the routing units training forms; replies stop at the end
of the assistant turn."""

from __future__ import annotations

import pytest
import torch
from conftest import REPO, compose

from lightning_moe.checkpointing.load import LoadPlan, TrainedRun
from lightning_moe.config import registry, validate_config
from lightning_moe.config.schema import MoEConfig
from lightning_moe.data.chat import ChatRenderer
from lightning_moe.data.collate import routing_units
from lightning_moe.generation.generate import Generator, Sampling
from lightning_moe.generation.prompts import render_prompt
from lightning_moe.models.architecture import resolve_model_config
from lightning_moe.models.build import build_model
from lightning_moe.moe.layer import RoutingContext


def _registered(kind: str, names) -> list[tuple[list[str], str]]:
    """Every registered router or expert form but the default's: its conf/moe group where it has one of its name
    (with the knobs it ships with), else `moe.<kind>=NAME`; a newly registered one is covered without editing this."""
    default = getattr(MoEConfig, kind)
    return [([f"moe={n}"] if (REPO / "conf" / "moe" / f"{n}.yaml").exists() else [f"moe.{kind}={n}"], f"{kind}-{n}")
            for n in names if n != default]


CASES = [  # (overrides, id): every router, every expert form, every routing level
    ([], "default"), *_registered("router", registry.ROUTERS), *_registered("expert", registry.EXPERTS),
    (["moe=lora_experts"], "lora_experts"), (["moe=sequence"], "sequence"),
    (["moe=sequence", "moe.routing_level=turn"], "turn"),
    (["moe=sequence", "moe.routing_level=turn", "moe.pooling=last_turn"], "turn_last"),
]
CONVERSATIONS = [
    [{"role": "user", "content": "I keep worrying about everything at work."}],
    [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hello"},
     {"role": "assistant", "content": "Hi, how can I help?"}, {"role": "user", "content": "I feel low lately."}],
]


def trained_like(overrides: list[str], tokenizer) -> TrainedRun:
    """A tiny model whose adapters and experts are non-zero (as after training), wrapped as a loaded run."""
    s = validate_config(compose([*overrides, "moe.expert_dim=8"]))
    hf = resolve_model_config(s.model)
    ctx = RoutingContext()
    model, blocks = build_model(s.model, s.lora, s.moe, hf, ctx, len(tokenizer), seed=0, training=False)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.normal_(std=0.5 if "router" in name else 0.05)
    plan = LoadPlan(None, None, s, hf, None, {})
    return TrainedRun(plan, tokenizer, model.eval(), blocks, ctx, torch.device("cpu"))


@pytest.mark.parametrize("overrides", [c[0] for c in CASES], ids=[c[1] for c in CASES])
def test_greedy_generation_with_the_cache_equals_full_recompute(tokenizer, overrides):
    assert_cache_equals_recompute(overrides, tokenizer)


def assert_cache_equals_recompute(overrides: list[str], tokenizer) -> None:
    gen = Generator(trained_like(overrides, tokenizer))
    prompts = [gen.render(m, 12) for m in CONVERSATIONS]  # a batch of two: left padding
    cached = gen.generate(prompts, Sampling(max_new_tokens=12), use_cache=True)
    recomputed = gen.generate(prompts, Sampling(max_new_tokens=12), use_cache=False)
    assert [r.token_ids for r in cached] == [r.token_ids for r in recomputed]
    assert all(len(r.token_ids) > 0 for r in cached)
    if gen.level != "token":  # one decision per reply and layer, taken at the prefill
        assert all(set(r.routing["layers"]) == {f"layer{b.layer_idx}" for b in gen.run.blocks} for r in cached)


@pytest.mark.parametrize("level, pooling", [("sequence", "mean"), ("turn", "mean"), ("turn", "last_turn")])
def test_a_prompt_gets_the_units_training_gives_the_same_conversation(tokenizer, level, pooling):
    """The prompt of turn k is the training conversation cut before turn k's content: its tokens must get the
    units and pooled spans training gives those tokens."""
    full = CONVERSATIONS[1] + [{"role": "assistant", "content": "I am sorry to hear that."}]
    row = ChatRenderer(tokenizer, 512)(full)
    units, spans = routing_units(row["labels"], level, pooling)
    prompt = render_prompt(tokenizer, CONVERSATIONS[1], level, pooling)
    n = len(prompt.ids)
    assert prompt.ids == row["input_ids"][:n]
    assert prompt.units == units[:n] and prompt.spans == spans and prompt.final_unit == units[n]


def test_replies_stop_at_the_end_of_the_assistant_turn(tokenizer):
    """A model that always prefers the turn terminator after a few tokens stops there (finish_reason stop), and a
    cap that comes first says length."""
    run = trained_like(["moe=none"], tokenizer)
    gen = Generator(run)
    end = gen.stop_ids[0]
    lm_head = run.model.get_output_embeddings()
    with torch.no_grad():
        lm_head.weight.zero_()
        lm_head.weight[end] = 1.0  # every hidden state now scores the terminator highest...
        run.model.get_input_embeddings().weight.abs_()  # ...given positive activations
    reply = gen.generate([gen.render(CONVERSATIONS[0], 8)], Sampling(max_new_tokens=8))[0]
    assert reply.finish_reason == "stop" and reply.token_ids == []
