"""moe.router_input_norm: on a pretrained model's MLP input (small, with a few outlier dimensions shared by every
token: SmolLM2's is RMS 0.1-0.4 with 5 dimensions holding a third to two thirds of its energy) a router trained
with AdamW stays at uniform gates (entropy ln 4) for the few dozen steps a CPU recipe takes; RMS-normalised, it
learns the domains. The same knob reaches the router through the MoE block."""

from __future__ import annotations

import math

import torch
from conftest import tiny_model
from test_moe import record

from lightning_moe.config.schema import MoEConfig
from lightning_moe.models.inject import inject_moe
from lightning_moe.moe.layer import RoutingContext, rms_normalise
from lightning_moe.moe.losses import domain_routing_loss
from lightning_moe.moe.routers.topk import TopKRouter

H, E = 576, 4


def _real_model_like(seed: int, rows: int = 256):
    """Hidden states as SmolLM2's MLP sees them: a shared vector with 5 outlier dimensions, a weak domain direction,
    noise, all at the small scale of its post-attention norm's gains."""
    g = torch.Generator().manual_seed(seed)
    domain = torch.arange(rows) % E
    shared = torch.zeros(H)
    shared[[17, 260, 507, 14, 243]] = torch.tensor([40.0, -35.0, 30.0, 25.0, -20.0])
    x = shared + 0.3 * torch.randn(E, H, generator=g)[domain] + torch.randn(rows, H, generator=g)
    return 0.02 * x, domain


def _train_router(x, domain, steps=30, lr=1e-3):
    torch.manual_seed(0)
    router = TopKRouter(H, E, top_k=2)
    opt = torch.optim.AdamW(router.parameters(), lr=lr, weight_decay=0.0)
    for _ in range(steps):
        opt.zero_grad()
        domain_routing_loss([record(router, x, domain=domain)]).backward()
        opt.step()
    with torch.no_grad():
        probs = record(router, x).out.probs
    return -(probs * probs.log()).sum(-1).mean().item(), probs[torch.arange(len(x)), domain].mean().item()


def test_a_normalised_router_input_learns_domains_where_the_raw_one_stays_uniform():
    x, domain = _real_model_like(0)
    assert x.pow(2).mean().sqrt() < 0.5  # as small as the real model's
    raw_entropy, raw_own = _train_router(x, domain)
    norm_entropy, norm_own = _train_router(rms_normalise(x), domain)
    assert raw_entropy > 0.98 * math.log(E) and raw_own < 0.35  # still near-uniform: the ln 4 everywhere
    assert norm_entropy < 1.0 and norm_own > 0.6


def test_the_block_hands_its_router_unit_rms_rows_only_with_the_knob():
    ids = torch.randint(0, 1000, (2, 12))
    for norm in (False, True):
        model, ctx, seen = tiny_model("tiny-llama"), RoutingContext(), []
        model.model.layers[1].post_attention_layernorm.weight.data.fill_(0.1)  # a pretrained model's small gains
        cfg = model.config
        blocks = inject_moe(model, [1], ctx, MoEConfig(expert_dim=8, router_input_norm=norm), cfg.hidden_size,
                            cfg.num_hidden_layers)
        blocks[0].router.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
        ctx.start()
        with torch.no_grad():
            model(ids)
        ctx.stop()
        rms = seen[0].pow(2).mean(-1).sqrt()
        assert torch.allclose(rms, torch.ones_like(rms), atol=1e-3) == norm
