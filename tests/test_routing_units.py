"""Per-turn routing's metadata (lightning_moe.data.collate.routing_units and the collator's unit tables), packed and
padded alike, and its causality: no token's routing depends on a later turn."""

from __future__ import annotations

import pytest
import torch
from conftest import compose

from lightning_moe.config import validate_config
from lightning_moe.data.chat import IGNORE_INDEX, ChatRenderer
from lightning_moe.data.collate import ChatCollator, routing_units
from lightning_moe.models.architecture import resolve_model_config
from lightning_moe.models.build import build_model
from lightning_moe.moe.layer import RoutingContext

I = IGNORE_INDEX
#          prompt      turn 1    user 2     turn 2    trailing
LABELS = [I, I, I, I, 5, 6, 7, I, I, I, I, 8, 9, I]


def test_units_and_spans_of_each_level():
    assert routing_units(LABELS, "sequence") == ([0] * 14, [(0, 4)])
    units, spans = routing_units(LABELS, "turn", "mean")
    assert units == [0] * 7 + [1] * 7 and spans == [(0, 4), (0, 11)]  # turn 2 pools everything before it
    assert routing_units(LABELS, "turn", "last_turn") == (units, [(0, 4), (7, 11)])  # only since turn 1 ended
    # causal: each unit's pooled span ends where its turn's first trained token begins
    assert all(end <= LABELS.index(5 if k == 0 else 8) for k, (_, end) in enumerate(spans))


CONVERSATIONS = [
    [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello, what is on your mind?"},
     {"role": "user", "content": "I have panic attacks at night"}, {"role": "assistant", "content": "That sounds hard."}],
    [{"role": "user", "content": "Can we talk about my sister?"}, {"role": "assistant", "content": "Of course."}],
    [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "hey"},
     {"role": "assistant", "content": "hey!"}, {"role": "user", "content": "I feel judged at work"},
     {"role": "assistant", "content": "Tell me more."}, {"role": "user", "content": "ok"},
     {"role": "assistant", "content": "Go on."}],
]


@pytest.mark.parametrize("pooling", ["mean", "last_turn"])
def test_packed_and_padded_batches_pool_the_same_tokens_for_each_turn(tokenizer, pooling):
    rows = [ChatRenderer(tokenizer, 512)(c) | {"domain_id": d} for d, c in enumerate(CONVERSATIONS)]
    tables = {}
    for packing in (False, True):
        batch = ChatCollator(tokenizer.pad_token_id, packing=packing, row_length=4096, routing_level="turn",
                             pooling=pooling)(rows)
        ids, units = batch["input_ids"], batch["unit_ids"]
        pooled = [tuple(ids[r, s:e].tolist()) for r, s, e in batch["unit_spans"].tolist()]
        members = [[tuple(ids.flatten()[units.flatten() == u].tolist())] for u in range(len(pooled))]
        tables[packing] = (pooled, members, batch["unit_domain"].tolist(), batch["unit_example"].tolist())
        assert (units >= 0).sum() == batch["num_tokens"]  # every real token has a unit, padding none
    assert tables[False] == tables[True]
    assert tables[True][3] == [0, 0, 1, 2, 2, 2]  # 2 + 1 + 3 assistant turns, each its conversation's
    assert tables[True][2] == [0, 0, 1, 2, 2, 2]  # and its domain (domain supervision applies to every turn)


def test_a_tokens_routing_never_depends_on_a_later_turn(tokenizer):
    """Two conversations equal up to the end of turn 1 and different after it: every token up to and including
    turn 1 gets the same gates and the same logits in both (all MoE layers, turn-level routing, padded batch)."""
    s = validate_config(compose(["moe=sequence", "moe.routing_level=turn", "moe.expert_dim=8"]))
    ctx = RoutingContext()
    model, _ = build_model(s.model, s.lora, s.moe, resolve_model_config(s.model), ctx, len(tokenizer), training=False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.normal_(std=0.5 if "router" in name else 0.05)
    base = CONVERSATIONS[0]
    other = base[:2] + [{"role": "user", "content": "Something else entirely, and longer than before"},
                        {"role": "assistant", "content": "I see."}]
    rows = [ChatRenderer(tokenizer, 512)(c) | {"domain_id": -1} for c in (base, other)]
    batch = ChatCollator(tokenizer.pad_token_id, routing_level="turn")(rows)
    first_turn_end = next(i for i, lab in enumerate(rows[0]["labels"]) if lab != I)
    first_turn_end = next(i for i in range(first_turn_end, 512) if rows[0]["labels"][i] == I)  # end of turn 1's run
    assert rows[0]["input_ids"][:first_turn_end] == rows[1]["input_ids"][:first_turn_end]
    ctx.start_batch(batch)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    records = ctx.stop()
    width = batch["input_ids"].shape[1]
    for r in records:
        gates = r.token_gates.view(2, width, -1)
        torch.testing.assert_close(gates[0, :first_turn_end], gates[1, :first_turn_end])
    torch.testing.assert_close(logits[0, :first_turn_end], logits[1, :first_turn_end], rtol=1e-5, atol=1e-5)
