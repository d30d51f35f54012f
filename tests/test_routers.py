"""Each router, expert form and dispatch path: reference equality, gradients, invariants, compile, balancing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP

from lightning_moe.config import ConfigError, registry, validate_config
from lightning_moe.config.routers import DeepSeekConfig, SwitchConfig
from lightning_moe.config.schema import MoEConfig
from lightning_moe.moe.experts import LoRAExpertMLP, SharedExpert, SwiGLUExperts
from lightning_moe.moe.layer import RoutingContext, build_block, span_mean
from lightning_moe.moe.routers import build_router
from lightning_moe.moe.routers.deepseek import DeepSeekRouter
from lightning_moe.moe.routers.dynamic import DynamicRouter
from lightning_moe.moe.routers.expert_choice import ExpertChoiceRouter
from lightning_moe.moe.routers.switch import SwitchRouter
from lightning_moe.moe.routers.topk import TopKRouter

H, E = 16, 4
ALL = torch.ones(64, dtype=torch.bool)


def _mlp(hidden=H, inter=24, seed=0):
    torch.manual_seed(seed)
    return LlamaMLP(LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_attention_heads=4, num_key_value_heads=4))


def test_deepseek_router_equals_transformers_with_bias_and_grouped_selection():
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    for n_group, topk_group, k in [(1, 1, 2), (4, 2, 3)]:
        cfg = DeepseekV3Config(hidden_size=H, n_routed_experts=16, num_experts_per_tok=k, n_group=n_group,
                               topk_group=topk_group, norm_topk_prob=True, routed_scaling_factor=2.5)
        ref = DeepseekV3TopkRouter(cfg)
        torch.nn.init.normal_(ref.weight)
        ref.e_score_correction_bias.copy_(torch.randn(16) * 0.3)
        ours = DeepSeekRouter(H, 16, k, n_group, topk_group, True, 2.5)
        ours.weight.data.copy_(ref.weight.data)
        ours.e_score_correction_bias.copy_(ref.e_score_correction_bias)
        x = torch.randn(50, H)
        logits, w, idx = ref(x)
        out = ours(x, torch.ones(50, dtype=torch.bool))
        torch.testing.assert_close(out.logits, logits)
        assert torch.equal(out.selected, torch.zeros(50, 16, dtype=torch.bool).scatter(1, idx, True))
        torch.testing.assert_close(out.gates.gather(1, idx), w)


# Every registered router gets the gradient check, built from the config as training builds it; these settings only
# add variants (or keep a capacity from dropping most of 8 tokens). A router registered without any is checked with
# MoEConfig's defaults: nothing here needs editing for it.
ROUTER_SETTINGS = {  # router -> variants of its own section (moe.<router>.*, config/routers.py)
    "switch": [{"capacity_factor": 4.0}],
    "expert_choice": [{"capacity_factor": 2.0}],
    "dynamic": [{"mode": "top_p", "p": 0.6}, {"mode": "threshold", "threshold": 0.2}],
    "deepseek": [{"n_group": 2, "topk_group": 1}],
}
ROUTER_CASES = [(name, extra) for name in registry.ROUTERS for extra in ROUTER_SETTINGS.get(name, [{}])]


def _router(name: str, **extra):
    torch.manual_seed(0)
    own = {name: registry.ROUTER_CONFIGS[name](**extra)} if extra else {}
    return build_router(H, MoEConfig(router=name, num_experts=E, top_k=2, router_init_std=1.0, **own))


@pytest.mark.parametrize("name, extra", ROUTER_CASES,
                         ids=[n + "".join(f"-{v}" for v in x.values()) for n, x in ROUTER_CASES])
def test_router_gates_pass_gradcheck_in_float64(name, extra):
    assert_gates_pass_gradcheck(_router(name, **extra))


def assert_gates_pass_gradcheck(router) -> None:
    router = router.double()
    x = torch.randn(8, H, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(8, dtype=torch.bool)
    # gradcheck perturbs its inputs in place, router.weight included
    assert torch.autograd.gradcheck(lambda x_, w_: router(x_, mask, 4).gates, (x, router.weight))


def start(ctx, segments: torch.Tensor, domain=None, packed=False) -> None:
    """Routing metadata with one unit per conversation, pooling the whole conversation (segments -1: padding)."""
    rows = 1 if packed else int(segments.max()) + 1
    seq = segments.numel() // rows
    per_row = segments.view(rows, seq)
    spans = []
    for n in range(int(segments.max()) + 1):
        row = int((per_row == n).any(1).nonzero()[0])
        where = (per_row[row] == n).nonzero().flatten()
        spans.append((row, int(where[0]), int(where[-1]) + 1))
    ctx.start(token_mask=segments >= 0, token_domain=torch.full(segments.shape, -1) if domain is None else domain,
              segments=segments, num_segments=len(spans), unit_ids=segments, unit_spans=torch.tensor(spans),
              unit_domain=torch.full((len(spans),), -1), unit_example=torch.arange(len(spans)), packed=packed)


def test_sequence_level_routing_passes_gradcheck_in_float64():
    router = TopKRouter(H, E, 1, init_std=1.0).double()
    spans = torch.tensor([[0, 0, 3], [0, 3, 5]])  # two conversations in one row, a padding token after them
    x = torch.randn(1, 6, H, dtype=torch.float64, requires_grad=True)
    fn = lambda x_: router(span_mean(x_, spans), torch.ones(2, dtype=torch.bool)).gates  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,))


def test_switch_capacity_drops_overflow_tokens_which_keep_only_the_mlp():
    router = SwitchRouter(H, E, capacity_factor=1.0)
    torch.nn.init.zeros_(router.weight)
    router.weight.data[0] = 1.0
    x = torch.randn(2, 8, H).abs() + 0.1  # every token prefers expert 0
    mask = torch.ones(16, dtype=torch.bool)
    mask[12:] = False  # padding takes no capacity
    out = router(x.reshape(-1, H), mask)
    capacity = 3  # ceil(1.0 * 12 real tokens / 4 experts)
    assert out.gates[:, 0].gt(0).sum() == capacity and out.gates[:, 1:].eq(0).all()
    assert out.dropped.sum() == 12 - capacity and not out.dropped[12:].any()
    assert out.selected[:, 0].all()  # the choice before capacity: what the balancing loss sees

    moe = MoEConfig(router="switch", switch=SwitchConfig(capacity_factor=1.0), expert_dim=4)
    ctx = RoutingContext()
    mlp = _mlp()
    block = build_block(mlp, router, 0, ctx, moe, H)
    torch.nn.init.normal_(block.experts.down)
    start(ctx, torch.where(mask, torch.arange(2).repeat_interleave(8), -1))
    y = block(x).reshape(-1, H)
    base = mlp(x).reshape(-1, H)
    dropped = out.dropped
    torch.testing.assert_close(y[dropped], base[dropped])  # dropped: residual path only (here the frozen MLP)
    assert not torch.allclose(y[~dropped & mask], base[~dropped & mask])


def test_expert_choice_picks_within_each_sequence_and_never_padding():
    router = ExpertChoiceRouter(H, E, capacity_factor=2.0, init_std=1.0)
    x = torch.randn(3, 8, H)
    mask = torch.ones(3, 8, dtype=torch.bool)
    mask[1, 5:] = False
    out = router(x.reshape(-1, H), mask.reshape(-1), 8)
    per_seq = out.selected.view(3, 8, E)
    assert per_seq[0].sum(0).eq(4).all()  # c = 2.0 * 8 real tokens / 4 experts, per expert and sequence
    assert not per_seq[1][~mask[1]].any()  # padding never chosen
    assert per_seq[1].sum(0).eq(3).all()  # 5 real tokens: c = ceil(2.0 * 5 / 4)
    assert per_seq.sum(-1)[mask].float().mean() == pytest.approx(2.0, abs=0.3)  # ~capacity_factor experts per token
    # sequences do not influence each other (causal-safety across the batch)
    x2 = x.clone()
    x2[2] = torch.randn(8, H) * 5
    out2 = router(x2.reshape(-1, H), mask.reshape(-1), 8)
    torch.testing.assert_close(out2.gates.view(3, 8, E)[:2], out.gates.view(3, 8, E)[:2])


def test_dynamic_router_keeps_the_shortest_prefix_reaching_p_and_respects_bounds():
    router = DynamicRouter(H, E, "top_p", p=0.5)
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.05, 0.05], [0.3, 0.3, 0.2, 0.2], [0.25, 0.25, 0.25, 0.25]]))
    router.scores = lambda x: logits  # route fixed distributions
    out = router(torch.zeros(3, H), torch.ones(3, dtype=torch.bool))
    assert out.selected.sum(-1).tolist() == [1, 2, 2]  # 0.6 >= 0.5; 0.3 + 0.3; 0.25 + 0.25
    torch.testing.assert_close(out.gates, out.probs * out.selected)  # no renormalisation
    router.p = 0.92  # prefix masses before each expert: 0, .6, .9, .95 -> keep 3
    assert router(torch.zeros(3, H), torch.ones(3, dtype=torch.bool)).selected.sum(-1).tolist() == [3, 4, 4]
    router.max_experts = 2
    assert router(torch.zeros(3, H), torch.ones(3, dtype=torch.bool)).selected.sum(-1).tolist() == [2, 2, 2]
    thresh = DynamicRouter(H, E, "threshold", threshold=0.28, min_experts=1)
    thresh.scores = lambda x: logits
    assert thresh(torch.zeros(3, H), torch.ones(3, dtype=torch.bool)).selected.sum(-1).tolist() == [2, 2, 1]


def _block(router_name="topk", form="adapter", level="token", **kw):
    moe = MoEConfig(router=router_name, expert=form, routing_level=level, expert_dim=8, **kw)
    ctx = RoutingContext()
    mlp = _mlp()
    return build_block(mlp, build_router(H, moe), 0, ctx, moe, H), ctx, mlp


def test_sequence_level_routing_gives_every_token_its_conversations_decision():
    block, ctx, _ = _block(level="sequence", top_k=1)
    torch.nn.init.normal_(block.router.weight, std=1.0)
    x = torch.randn(1, 10, H)
    segments = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2, 2, 2])  # three packed conversations
    start(ctx, segments, packed=True)
    block(x)
    (rec,) = ctx.stop()
    pooled = torch.stack([x[0, segments == n].mean(0) for n in range(3)])
    torch.testing.assert_close(rec.out.logits, F.linear(pooled, block.router.weight))
    assert rec.out.gates.shape == (3, E) and rec.mask.all()


def test_shared_expert_is_always_on_and_optionally_gated():
    torch.manual_seed(0)
    shared = SharedExpert(H, 8, gated=True)
    torch.nn.init.normal_(shared.expert.down)
    x = torch.randn(5, H)
    e = shared.expert
    plain = (F.silu(x @ e.gate[0]) * (x @ e.up[0])) @ e.down[0]
    torch.testing.assert_close(shared(x), plain * torch.sigmoid(shared.gate(x)))


def test_lora_experts_equal_a_per_expert_loop():
    torch.manual_seed(0)
    mlp = _mlp()
    experts = LoRAExpertMLP(mlp, E, r=3, alpha=6, targets=["gate_proj", "up_proj", "down_proj"])
    for p in experts.B.values():
        torch.nn.init.normal_(p)
    x = torch.randn(7, H)
    gates = TopKRouter(H, E, 2, init_std=1.0)(x, torch.ones(7, dtype=torch.bool)).gates

    def delta(name, inp, t, e):
        a = experts.A[name][e * 3:(e + 1) * 3]
        b = experts.B[name][e * 3:(e + 1) * 3]
        return (inp @ a.T) @ b * 2.0

    rows = []
    for t in range(7):
        g = mlp.gate_proj(x[t]) + sum(gates[t, e] * delta("gate_proj", x[t], t, e) for e in range(E))
        u = mlp.up_proj(x[t]) + sum(gates[t, e] * delta("up_proj", x[t], t, e) for e in range(E))
        h = F.silu(g) * u
        rows.append(mlp.down_proj(h) + sum(gates[t, e] * delta("down_proj", h, t, e) for e in range(E)))
    torch.testing.assert_close(experts(x, gates), torch.stack(rows), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("train", ["full", "lora"])
def test_grouped_loop_and_dense_dispatch_agree_with_empty_experts(train):
    torch.manual_seed(0)
    experts = SwiGLUExperts.from_mlp(_mlp(inter=32), E, noise=0.1, train=train, lora_r=4, lora_alpha=8)
    if experts.lora is not None:
        for k, p in experts.lora.items():
            if k.endswith("_B"):
                torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(20, H)
    gates = TopKRouter(H, E, 2, init_std=1.0)(x, torch.ones(20, dtype=torch.bool)).gates.detach()
    gates[:, 2] = 0.0  # expert 2 gets no token
    gates[:3] = 0.0  # and three tokens get no expert
    outs, grads = {}, {}
    for dispatch in ("grouped", "loop", "dense"):
        if dispatch == "dense" and experts.lora is not None:
            continue
        xi = x.clone().requires_grad_(True)
        y = experts(xi, gates, 2, dispatch)
        y.square().sum().backward()
        outs[dispatch], grads[dispatch] = y.detach(), xi.grad
        experts.zero_grad()
    for dispatch in outs:
        torch.testing.assert_close(outs[dispatch], outs["grouped"], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(grads[dispatch], grads["grouped"], rtol=1e-4, atol=1e-5)
    assert outs["grouped"][:3].abs().max() == 0 and torch.isfinite(outs["grouped"]).all()


COMPILE_CASES = [("topk", "adapter"), ("switch", "adapter"), ("expert_choice", "adapter"), ("dynamic", "adapter"),
                 ("deepseek", "adapter"), ("topk", "lora"), ("topk", "upcycled")]


@pytest.mark.parametrize("router_name, form", COMPILE_CASES)
def test_one_block_captures_as_a_single_graph(router_name, form):
    """fullgraph=True fails on any graph break: .item(), a data-dependent Python branch, a host sync."""
    deepseek = {"num_shared_experts": 1, "deepseek": DeepSeekConfig(bias_update_rate=1e-3)}
    kw = deepseek if router_name == "deepseek" else {}
    block, ctx, _ = _block(router_name, form, **kw)
    dtype = torch.bfloat16 if form == "upcycled" else torch.float32  # grouped_mm's compile check wants bf16 on CPU
    block = block.to(dtype)
    x = torch.randn(2, 8, H, dtype=dtype, requires_grad=True)
    start(ctx, torch.arange(2).repeat_interleave(8), domain=torch.zeros(16, dtype=torch.long))
    torch._dynamo.reset()
    y = torch.compile(block, fullgraph=True, backend="aot_eager")(x)
    y.float().sum().backward()
    torch.testing.assert_close(y, block(x))
    assert len(ctx.stop()) == 2 and block.router.weight.grad is not None  # the compiled call and the eager one


@pytest.mark.slow
def test_default_block_compiles_with_inductor():
    block, ctx, _ = _block()
    x = torch.randn(2, 8, H)
    torch._dynamo.reset()
    y = torch.compile(block, fullgraph=True)(x)
    torch.testing.assert_close(y, block(x), rtol=1e-5, atol=1e-5)


def test_bias_updates_move_a_skewed_stream_toward_balance():
    torch.manual_seed(0)
    router = DeepSeekRouter(H, E, 1)
    torch.nn.init.normal_(router.weight, std=0.1)
    router.weight.data[0] += 0.3  # expert 0 wins most tokens
    stream = [torch.randn(256, H) + 1.0 for _ in range(200)]

    def load(x):
        return router(x, torch.ones(256, dtype=torch.bool)).selected.float().sum(0)

    cv = lambda c: (c.std(unbiased=False) / c.mean()).item()  # noqa: E731
    before = cv(sum(load(x) for x in stream[:10]))
    for step in range(0, 200, 2):  # two micro-batches per optimizer step
        for x in stream[step:step + 2]:
            router.record_load(load(x))
        router.update_bias(router.pending_load, rate=0.01)
        assert router.pending_load.sum() == 0
    after = cv(sum(load(x) for x in stream[:10]))
    assert before > 1.0 and after < 0.25 * before, (before, after)
    assert router.e_score_correction_bias[0] < 0 and abs(router.e_score_correction_bias.mean()) < 1e-6


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["moe.router=deepseek", "moe.deepseek.n_group=3"], "moe.deepseek.n_group"),
        (["moe.router=expert_choice", "data.packing=true"], "data.packing"),
        (["moe.deepseek.bias_update_rate=0.001"], "moe.deepseek.bias_update_rate"),  # a knob of a router not chosen
        (["moe.router=dynamic", "moe.dynamic.min_experts=3", "moe.dynamic.max_experts=2"], "moe.dynamic.min_experts"),
        (["moe.router=switch", "moe.switch.capacity_factor=0"], "moe.switch.capacity_factor"),
        (["moe.expert=mixlora"], "moe.expert"),
        (["moe.routing_level=document"], "moe.routing_level"),
    ],
)
def test_moe_config_combinations_are_validated(overrides, key):
    from conftest import compose

    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate_config(compose(overrides))


@pytest.mark.slow  # trains and generates: ~25 s on a busy 2-core machine
def test_a_router_added_as_contributing_says_trains_and_passes_the_router_tests(monkeypatch, tokenizer):
    """CONTRIBUTING.md's "Adding a router", step by step: the class in its own file, written from Router
    (tests/contributed_router.py); one registry line; no config class (step 3: it has no knobs); then what step 5
    promises every registered router: validation accepts it, the model builds and trains with it, losses, metrics
    and the FLOP count see it, its gates pass the float64 gradcheck and generation with the KV cache equals
    recompute."""
    from conftest import compose
    from contributed_router import SigmoidTop1Router
    from test_generation import assert_cache_equals_recompute

    from lightning_moe.models.architecture import resolve_model_config
    from lightning_moe.models.build import build_model
    from lightning_moe.models.flops import count_flops, nominal_active_experts
    from lightning_moe.moe.metrics import RoutingTally

    with pytest.raises(ConfigError, match="moe.router"):
        validate_config(compose(["moe.router=sigmoid_top1"]))
    monkeypatch.setitem(registry.ROUTERS, "sigmoid_top1", "contributed_router:SigmoidTop1Router")  # step 2
    s = validate_config(compose(["moe.router=sigmoid_top1", "moe.expert_dim=8"]))
    ctx = RoutingContext()
    model, blocks = build_model(s.model, s.lora, s.moe, resolve_model_config(s.model), ctx, len(tokenizer))
    assert all(type(b.router) is SigmoidTop1Router for b in blocks)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, len(tokenizer), (2, 16))
    losses = []
    for _ in range(3):  # trains: the loss moves, the router's weights get finite gradients
        ctx.start()
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        records = ctx.stop()
        loss.backward()
        assert all(torch.isfinite(b.router.weight.grad).all() for b in blocks)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    tally = RoutingTally(4, s.domains, s.moe.top_k)
    tally.add(records)
    assert tally.per_layer()["layer0"]["active_experts"] == 1  # one expert a token, as the rule says
    assert nominal_active_experts(s.moe) == 1 and count_flops(model, resolve_model_config(s.model), 1)

    assert_gates_pass_gradcheck(build_router(H, MoEConfig(router="sigmoid_top1", num_experts=E, router_init_std=1.0)))
    assert_cache_equals_recompute(["moe.router=sigmoid_top1"], tokenizer)


def test_tied_router_blocks_are_built_leading_and_following(tokenizer):
    """moe.tied_router: the first block decides for every layer; the others are built following it, with their
    own routers frozen (unused), and route each conversation to the leader's expert."""
    from conftest import compose

    from lightning_moe.models.architecture import resolve_model_config
    from lightning_moe.models.build import build_model

    s = validate_config(compose(["moe=sequence", "moe.tied_router=true", "moe.expert_dim=8"]))
    ctx = RoutingContext()
    model, blocks = build_model(s.model, s.lora, s.moe, resolve_model_config(s.model), ctx, len(tokenizer))
    assert [b.tied for b in blocks] == ["leads"] + ["follows"] * (len(blocks) - 1)
    assert [b.router.weight.requires_grad for b in blocks] == [True] + [False] * (len(blocks) - 1)
    ids = torch.randint(0, len(tokenizer), (2, 12))
    ctx.start()
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    ctx.stop()
    assert ctx.tied_gates is not None and ctx.tied_gates.shape == (2, s.moe.num_experts)
