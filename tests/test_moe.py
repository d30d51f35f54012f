"""The MoE block against transformers' reference implementations, and inside real tiny HF models."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_ARCHS, tiny_hf_config, tiny_model
from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter, load_balancing_loss_func
from transformers.models.switch_transformers.modeling_switch_transformers import router_z_loss_func

from lightning_moe.moe import (
    AdapterExperts,
    MoEBlock,
    RoutingContext,
    TopKRouter,
    decoder_layers,
    domain_routing_loss,
    inject_moe,
    load_balancing_loss,
    router_z_loss,
    routing_stats,
)

E, K, H = 4, 2, 32


def _layers_logits(num_layers=3, tokens=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(tokens, E, generator=g) * 2 for _ in range(num_layers)]


def _topk(logits):
    return [lg.softmax(-1).topk(K, dim=-1).indices for lg in logits]


def test_load_balancing_equals_mixtral_without_mask():
    logits = _layers_logits()
    ours = load_balancing_loss(logits, _topk(logits), E, torch.ones(40, dtype=torch.bool))
    ref = load_balancing_loss_func(tuple(logits), num_experts=E, top_k=K)
    torch.testing.assert_close(ours, ref)


def test_load_balancing_equals_mixtral_with_padding_mask():
    logits = _layers_logits(tokens=5 * 8)  # batch 5 x seq 8
    attention = torch.ones(5, 8, dtype=torch.long)
    attention[0, 5:] = 0
    attention[3, 2:] = 0
    ours = load_balancing_loss(logits, _topk(logits), E, attention.reshape(-1).bool())
    ref = load_balancing_loss_func(tuple(logits), num_experts=E, top_k=K, attention_mask=attention)
    torch.testing.assert_close(ours, ref)
    # and padding really is excluded: changing padded logits changes nothing
    logits2 = [lg.clone() for lg in logits]
    for lg in logits2:
        lg[attention.reshape(-1) == 0] = 50.0
    torch.testing.assert_close(load_balancing_loss(logits2, _topk(logits2), E, attention.reshape(-1).bool()), ours)


def test_uniform_routing_gives_k():
    logits = [torch.zeros(E * 10, E)]
    idx = [torch.stack([torch.arange(E * 10) % E, (torch.arange(E * 10) + 1) % E], -1)]
    assert load_balancing_loss(logits, idx, E, torch.ones(E * 10, dtype=torch.bool)).item() == pytest.approx(K)


def test_router_matches_mixtral_top_k_router():
    from transformers import MixtralConfig

    cfg = MixtralConfig(hidden_size=H, num_local_experts=E, num_experts_per_tok=K)
    ref = MixtralTopKRouter(cfg)
    ours = TopKRouter(H, E, K)
    torch.nn.init.normal_(ref.weight)
    ours.weight.data.copy_(ref.weight.data)
    x = torch.randn(3, 7, H)
    ref_logits, ref_w, ref_idx = ref(x)
    logits, w, idx = ours(x.reshape(-1, H))
    torch.testing.assert_close(logits, ref_logits)
    torch.testing.assert_close(idx, ref_idx)
    torch.testing.assert_close(w, ref_w)
    torch.testing.assert_close(w.sum(-1), torch.ones(21))


def test_z_loss_equals_switch_transformers():
    logits = _layers_logits(num_layers=1, tokens=24)[0]
    ours = router_z_loss([logits], torch.ones(24, dtype=torch.bool))
    ref = router_z_loss_func(logits.view(3, 8, E))
    torch.testing.assert_close(ours, torch.as_tensor(ref))


def test_domain_loss_is_cross_entropy_on_labelled_tokens_only():
    logits = _layers_logits(num_layers=2, tokens=6)
    domain = torch.tensor([2, 2, -1, 0, -1, 3])
    labelled = domain >= 0
    expected = sum(torch.nn.functional.cross_entropy(lg[labelled], domain[labelled]) for lg in logits) / 2
    torch.testing.assert_close(domain_routing_loss(logits, domain), expected)
    unlabelled = domain_routing_loss(logits, torch.full((6,), -1))
    assert unlabelled.item() == 0.0


def test_domain_loss_gradient_moves_routing_toward_domain_expert():
    torch.manual_seed(0)
    router = TopKRouter(H, E, K, init_std=0.1)
    x = torch.randn(64, H) + 1.0  # hidden states share a mean direction, as real ones do
    domain = torch.full((64,), 3)
    opt = torch.optim.SGD(router.parameters(), lr=0.5)
    assert router(x)[0].softmax(-1)[:, 3].mean() < 0.5
    for _ in range(50):
        opt.zero_grad()
        domain_routing_loss([router(x)[0]], domain).backward()
        opt.step()
    assert router(x)[0].softmax(-1)[:, 3].mean() > 0.9
    assert (router(x)[2][:, 0] == 3).float().mean() > 0.9  # expert 3 is now every token's first choice


def test_dense_adapter_experts_equal_per_expert_loop():
    torch.manual_seed(0)
    experts = AdapterExperts(H, E, expert_dim=8)
    torch.nn.init.normal_(experts.w_down)
    x = torch.randn(10, H)
    router = TopKRouter(H, E, K, init_std=1.0)
    _, w, idx = router(x)
    gates = torch.zeros(10, E).scatter(1, idx, w)
    d = experts.expert_dim
    loop = torch.zeros(10, H)
    for t in range(10):
        for slot in range(K):
            e = idx[t, slot]
            gate_w = experts.w_in[:, e * d : (e + 1) * d]
            up_w = experts.w_in[:, E * d + e * d : E * d + (e + 1) * d]
            h = torch.nn.functional.silu(x[t] @ gate_w) * (x[t] @ up_w)
            loop[t] += w[t, slot] * (h @ experts.w_down[e * d : (e + 1) * d])
    torch.testing.assert_close(experts(x, gates), loop, rtol=1e-4, atol=1e-5)


def test_routing_stats_load_fractions_sum_to_one_and_skip_padding():
    logits = torch.randn(6, E)
    idx = torch.tensor([[0, 1], [0, 1], [0, 2], [3, 1], [3, 3], [3, 3]])
    mask = torch.tensor([1, 1, 1, 1, 0, 0], dtype=torch.bool)
    s = routing_stats(logits, idx, E, mask)
    torch.testing.assert_close(s["load"], torch.tensor([3, 3, 1, 1]) / 8.0)
    assert 0 < s["entropy"].item() <= torch.log(torch.tensor(float(E))).item()


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_injection_into_each_family_starts_as_identity_and_trains(arch):
    model = tiny_model(arch)
    cfg = model.config
    ids = torch.randint(0, 1000, (2, 12))
    with torch.no_grad():
        before = model(ids).logits
    ctx = RoutingContext()
    blocks = inject_moe(model, [1, 3], ctx, cfg.hidden_size, cfg.num_hidden_layers, E, K, expert_dim=8)
    layers = decoder_layers(model, cfg.num_hidden_layers)
    assert [type(getattr(layers[i], "mlp", None)) is MoEBlock for i in range(4)] == [False, True, False, True]
    ctx.start()
    out = model(ids, labels=ids)
    records = ctx.stop()
    # zero-initialised down projections: inserting experts leaves the model's function unchanged
    torch.testing.assert_close(out.logits, before, rtol=1e-5, atol=1e-5)
    assert [r.layer for r in records] == [1, 3] and records[0].logits.shape == (24, E)
    loss = out.loss + load_balancing_loss([r.logits for r in records], [r.indices for r in records], E, torch.ones(24, dtype=torch.bool))
    loss.backward()
    for b in blocks:
        assert b.router.weight.grad is not None and b.router.weight.grad.abs().sum() > 0
        assert b.experts.w_down.grad.abs().sum() > 0
    with torch.no_grad():
        for b in blocks:
            b.experts.w_down.normal_()
        assert not torch.allclose(model(ids).logits, before)


def test_recompute_under_checkpointing_does_not_duplicate_records_and_grads_match():
    torch.manual_seed(0)
    grads = []
    for checkpointing in (False, True):
        model = tiny_model("tiny-llama", seed=1)
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        ctx = RoutingContext()
        blocks = inject_moe(model, [0, 2], ctx, 128, 4, E, K, expert_dim=8)
        torch.manual_seed(5)
        for b in blocks:
            torch.nn.init.normal_(b.experts.w_down, std=0.01)
        ids = torch.randint(0, 1000, (2, 10))
        ctx.start()
        out = model(ids, labels=ids)
        records = ctx.stop()
        aux = load_balancing_loss([r.logits for r in records], [r.indices for r in records], E, torch.ones(20, dtype=torch.bool))
        (out.loss + 0.1 * aux).backward()
        assert len(ctx.records) == 2  # recomputation during backward appended nothing
        grads.append(torch.cat([b.router.weight.grad.flatten() for b in blocks]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_spread_layers_centres_moe_layers_in_equal_bands():
    from lightning_moe.config import spread_layers

    assert spread_layers(40, 4) == [5, 15, 25, 35]
    assert spread_layers(4, 2) == [1, 3]
    assert spread_layers(4, 4) == [0, 1, 2, 3]
    assert tiny_hf_config().num_hidden_layers == 4
