"""Router losses against transformers' reference implementations, and MoE blocks inside real tiny HF models."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_ARCHS, tiny_hf_config, tiny_model
from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter, load_balancing_loss_func
from transformers.models.switch_transformers.modeling_switch_transformers import router_z_loss_func

from lightning_moe.config import registry
from lightning_moe.config.expert_forms import UpcycledConfig
from lightning_moe.config.schema import MoEConfig
from lightning_moe.models.inject import inject_moe
from lightning_moe.models.layout import decoder_layers, spread_layers
from lightning_moe.moe.layer import MoEBlock, RouterRecord, RoutingContext
from lightning_moe.moe.losses import domain_routing_loss, load_balancing_loss, loramoe_loss, router_z_loss
from lightning_moe.moe.metrics import routing_counts, routing_metrics
from lightning_moe.moe.routers.topk import TopKRouter

E, K, H = 4, 2, 32


def record(router, x, mask=None, domain=None, segments=None, num_segments=1, layer=0) -> RouterRecord:
    t = x.shape[0]
    mask = torch.ones(t, dtype=torch.bool) if mask is None else mask
    out = router(x, mask)
    domain = torch.full((t,), -1) if domain is None else domain
    segments = torch.zeros(t, dtype=torch.long) if segments is None else segments
    return RouterRecord(layer, out, mask, domain, segments, num_segments, router)


def _routers(num_layers=3, seed=0):
    torch.manual_seed(seed)
    return [TopKRouter(H, E, K, init_std=1.0) for _ in range(num_layers)]


def test_load_balancing_equals_mixtral_without_mask():
    x = torch.randn(40, H)
    records = [record(r, x, layer=i) for i, r in enumerate(_routers())]
    ref = load_balancing_loss_func(tuple(r.out.logits for r in records), num_experts=E, top_k=K)
    torch.testing.assert_close(load_balancing_loss(records, E), ref)


def test_load_balancing_equals_mixtral_with_padding_mask():
    attention = torch.ones(5, 8, dtype=torch.long)
    attention[0, 5:] = 0
    attention[3, 2:] = 0
    mask = attention.reshape(-1).bool()
    x = torch.randn(40, H)
    records = [record(r, x, mask) for r in _routers()]
    ref = load_balancing_loss_func(tuple(r.out.logits for r in records), num_experts=E, top_k=K, attention_mask=attention)
    ours = load_balancing_loss(records, E)
    torch.testing.assert_close(ours, ref)
    x2 = x.clone()
    x2[~mask] = 100.0  # padding really is excluded
    torch.testing.assert_close(load_balancing_loss([record(r, x2, mask) for r in _routers()], E), ours)


def test_uniform_routing_gives_k():
    router = TopKRouter(H, E, K)
    torch.nn.init.zeros_(router.weight)
    r = record(router, torch.randn(E * 10, H))
    r.out.selected = torch.stack([torch.arange(E * 10) % E, (torch.arange(E * 10) + 1) % E], -1)
    r.out.selected = torch.zeros(E * 10, E, dtype=torch.bool).scatter(1, r.out.selected, True)
    assert load_balancing_loss([r], E).item() == pytest.approx(K)


def test_topk_router_matches_mixtral_top_k_router():
    from transformers import MixtralConfig

    ref = MixtralTopKRouter(MixtralConfig(hidden_size=H, num_local_experts=E, num_experts_per_tok=K))
    torch.nn.init.normal_(ref.weight)
    ours = TopKRouter(H, E, K)
    ours.weight.data.copy_(ref.weight.data)
    x = torch.randn(3, 7, H)
    ref_logits, ref_w, ref_idx = ref(x)
    out = ours(x.reshape(-1, H), torch.ones(21, dtype=torch.bool))
    torch.testing.assert_close(out.logits, ref_logits)
    torch.testing.assert_close(out.gates.gather(1, ref_idx), ref_w)  # same experts, same weights
    assert out.selected.sum(-1).eq(K).all() and torch.equal(out.selected, out.gates > 0)


def test_z_loss_equals_switch_transformers():
    router = TopKRouter(H, E, K, init_std=1.0)
    r = record(router, torch.randn(24, H))
    torch.testing.assert_close(router_z_loss([r]), torch.as_tensor(router_z_loss_func(r.out.logits.view(3, 8, E))))


def test_domain_loss_is_cross_entropy_on_labelled_real_rows_only():
    routers = _routers(2)
    x = torch.randn(6, H)
    domain = torch.tensor([2, 2, -1, 0, -1, 3])
    mask = torch.tensor([1, 1, 1, 1, 1, 0], dtype=torch.bool)
    records = [record(r, x, mask, domain) for r in routers]
    keep = (domain >= 0) & mask
    expected = sum(torch.nn.functional.cross_entropy(r.out.logits[keep], domain[keep], reduction="sum") for r in records)
    torch.testing.assert_close(domain_routing_loss(records), expected / (keep.sum() * 2))
    assert domain_routing_loss([record(routers[0], x)]).item() == 0.0


def test_domain_loss_gradient_moves_routing_toward_domain_expert():
    torch.manual_seed(0)
    router = TopKRouter(H, E, K, init_std=0.1)
    x = torch.randn(64, H) + 1.0  # hidden states share a mean direction, as real ones do
    domain = torch.full((64,), 3)
    opt = torch.optim.SGD(router.parameters(), lr=0.5)
    assert record(router, x).out.probs[:, 3].mean() < 0.5
    for _ in range(50):
        opt.zero_grad()
        domain_routing_loss([record(router, x, domain=domain)]).backward()
        opt.step()
    out = record(router, x).out
    assert out.probs[:, 3].mean() > 0.9 and out.selected[:, 3].float().mean() == 1.0


def test_loramoe_loss_matches_its_formula():
    torch.manual_seed(0)
    router = TopKRouter(H, E, K, init_std=1.0)
    x = torch.randn(10, H)
    segments = torch.tensor([0, 0, 0, 1, 1, 1, 1, 2, 2, 2])
    domain = torch.tensor([1, 1, 1, -1, -1, -1, -1, 3, 3, 3])
    r = record(router, x, domain=domain, segments=segments, num_segments=3)
    q = torch.stack([r.out.probs[segments == n].sum(0) for n in range(3)])
    importance = torch.ones(3, E)
    importance[0] = 0.9
    importance[0, 1] = 1.1
    importance[2] = 0.9
    importance[2, 3] = 1.1
    iq = importance * q
    torch.testing.assert_close(loramoe_loss([r], E, 0.1), iq.var() / iq.mean() ** 2)


def test_routing_metrics():
    router = TopKRouter(H, E, K)
    r = record(router, torch.randn(6, H), mask=torch.tensor([1, 1, 1, 1, 0, 0], dtype=torch.bool))
    r.out.gates = torch.zeros(6, E)
    r.out.gates[:4, 0] = 1.0  # four real rows all on expert 0, one also on expert 1
    r.out.gates[0, 1] = 0.5
    m = routing_metrics(routing_counts(r, E), E)
    torch.testing.assert_close(m["load"], torch.tensor([0.8, 0.2, 0.0, 0.0]))
    assert m["dead_fraction"].item() == 0.5 and m["active_experts"].item() == pytest.approx(1.25)
    assert m["maxvio"].item() == pytest.approx((0.8 - 0.25) / 0.25)
    assert m["cv"].item() == pytest.approx(torch.tensor([0.8, 0.2, 0.0, 0.0]).std(unbiased=False).item() / 0.25)
    assert 0 < m["effective_expert_fraction"].item() <= 1.0


def _inject(model, layers, ctx, **moe):
    cfg = model.config
    return inject_moe(model, layers, ctx, MoEConfig(expert_dim=8, **moe), cfg.hidden_size, cfg.num_hidden_layers)


@pytest.mark.parametrize("arch", TINY_ARCHS)
@pytest.mark.parametrize("form", sorted(registry.EXPERTS))
def test_each_expert_form_in_each_family_starts_as_identity_and_trains(arch, form):
    model = tiny_model(arch)
    ids = torch.randint(0, 1000, (2, 12))
    with torch.no_grad():
        before = model(ids).logits
    ctx = RoutingContext()
    targets = ["gate_up_proj", "down_proj"] if arch == "tiny-phi3" else ["gate_proj", "up_proj", "down_proj"]
    blocks = _inject(model, [1, 3], ctx, expert=form, lora_targets=targets, upcycled=UpcycledConfig(train="full"))
    layers = decoder_layers(model, model.config.num_hidden_layers)
    assert [isinstance(layers[i].mlp, MoEBlock) for i in range(4)] == [False, True, False, True]
    ctx.start()
    out = model(ids, labels=ids)
    records = ctx.stop()
    # zero-initialised deltas (adapter down, LoRA B) or exact copies with top-k weights summing to 1 (upcycled):
    # inserting experts leaves the model's function unchanged
    torch.testing.assert_close(out.logits, before, rtol=1e-4, atol=1e-4)
    assert [r.layer for r in records] == [1, 3] and records[0].out.logits.shape == (24, E)
    (out.loss + load_balancing_loss(records, E)).backward()
    for b in blocks:
        assert b.router.weight.grad is not None and b.router.weight.grad.abs().sum() > 0
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in b.experts.parameters() if p.requires_grad)


def test_an_expert_form_added_as_contributing_says_is_built_trained_counted_and_refused_export(monkeypatch):
    """CONTRIBUTING.md's "Adding an expert form": the module and builder in their own file
    (tests/contributed_expert_form.py), one ExpertForm in the registry; MoEBlock builds and calls it, the FLOP count
    sees it, and the export check refuses it every standard format, naming it (it declares none)."""
    from conftest import compose

    from lightning_moe.config import ConfigError, validate_config
    from lightning_moe.config.export_forms import check_format, export_formats

    monkeypatch.setitem(registry.EXPERTS, "linear_delta",
                        registry.ExpertForm("contributed_expert_form:linear_delta_experts", replaces_mlp=False))
    test_each_expert_form_in_each_family_starts_as_identity_and_trains(TINY_ARCHS[0], "linear_delta")
    block = _inject(tiny_model(TINY_ARCHS[0]), [1], RoutingContext(), expert="linear_delta")[0]
    hidden = block.experts.weight.shape[-1]
    assert block.base_mlp() is block.mlp
    assert block.flop_params(2) == (0, 2 * hidden * hidden + block.router.weight.numel())
    s = validate_config(compose(["+recipe=servable_tiny", "moe.expert=linear_delta"]))
    assert export_formats(s) == []
    with pytest.raises(ConfigError, match=r"moe\.expert=linear_delta \(needs lora\)"):
        check_format("per_domain", s)


def test_recompute_under_checkpointing_does_not_duplicate_records_and_grads_match():
    grads = []
    for checkpointing in (False, True):
        model = tiny_model("tiny-llama", seed=1)
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        ctx = RoutingContext()
        torch.manual_seed(5)
        blocks = _inject(model, [0, 2], ctx, router="deepseek", num_shared_experts=1)
        for b in blocks:
            torch.nn.init.normal_(b.experts.down, std=0.01)
        ids = torch.randint(0, 1000, (2, 10))
        ctx.start()
        out = model(ids, labels=ids)
        records = ctx.stop()
        (out.loss + 0.1 * load_balancing_loss(records, E)).backward()
        assert len(records) == 2
        assert [len(b.pending) for b in blocks] == [1, 1]  # recomputation during backward appended nothing
        grads.append(torch.cat([b.router.weight.grad.flatten() for b in blocks]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_spread_layers_centres_moe_layers_in_equal_bands():
    assert spread_layers(40, 4) == [5, 15, 25, 35]
    assert spread_layers(4, 2) == [1, 3]
    assert spread_layers(4, 4) == [0, 1, 2, 3]
    assert tiny_hf_config().num_hidden_layers == 4


def test_routing_metrics_are_computed_once_per_logged_optimizer_step():
    """global_step stays the same over the micro-batches of an accumulation window: the metrics (and their host
    syncs) are due once per logged step, not once per micro-batch of it."""
    from lightning_moe.training.callbacks.expert_usage import ExpertUsageMonitor

    monitor = ExpertUsageMonitor("unused", log_every_n_steps=5)
    micro_batches = [step for step in range(12) for _ in range(4)]  # accumulation 4
    assert [s for s in micro_batches if monitor.due(s)] == [0, 5, 10]
