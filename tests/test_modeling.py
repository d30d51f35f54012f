"""Finding and building the model: weights that cannot be reached, random init of real shapes, LoRA, QLoRA."""

from __future__ import annotations

import contextlib

import pytest
import torch
from conftest import REPO, clean_env, run_guarded, tiny_model

from lightning_moe.config.schema import ConfigError, LoRAConfig, ModelConfig, MoEConfig
from lightning_moe.models.architecture import WeightsUnavailable, resolve_model_config
from lightning_moe.models.build import build_model
from lightning_moe.models.flops import count_flops
from lightning_moe.moe.layer import MoEBlock, RoutingContext
from lightning_moe.upstream import keep_lora_inputs_in_autocast_dtype

WAYFARER = "LatitudeGames/Wayfarer-2-12B"


@pytest.mark.parametrize(
    "env",
    [
        {"HF_HUB_OFFLINE": "1"},
        {"HF_ENDPOINT": "http://127.0.0.1:9"},  # nothing listens there: a machine without network, deterministically
    ],
    ids=["hf-offline", "no-network"],
)
def test_recipe_without_weights_stops_before_building_any_naming_model_and_fix(tmp_path, env):
    """Unreachable weights fail at the architecture stage: no model was built (tests/guarded.py), so no download
    was attempted and no retries waited (the Hub probe is a 3 s TCP connect, not huggingface_hub's backoff)."""
    out, report = run_guarded("+recipe=therapeutic_h100", f"hydra.run.dir={tmp_path}/run", cwd=tmp_path,
                              env=clean_env(HF_HOME=str(tmp_path / "hf"), **env))
    assert out.returncode == 2 and not report["weights_built"], out.stderr[-2000:]
    assert WAYFARER in out.stderr and "model.name_or_path=" in out.stderr and "model.init=random" in out.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_local_directory_without_weights_is_named(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(WeightsUnavailable, match="no \\*.safetensors"):
        resolve_model_config(ModelConfig(name_or_path=str(tmp_path)))


def test_random_init_builds_the_real_12b_architecture_without_download():
    from transformers import AutoModelForCausalLM

    cfg = resolve_model_config(ModelConfig(init="random", arch="mistral-nemo-12b", name_or_path=WAYFARER))
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size) == ("mistral", 40, 5120, 131072)
    with torch.device("meta"):  # the shape, without 24 GB of memory
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    n = sum(p.numel() for p in model.parameters())
    assert 12.0e9 < n < 12.5e9, n
    assert model.model.layers[0].self_attn.q_proj.weight.shape == (4096, 5120)


def _build(arch="tiny-mistral", lora=None, moe=None, **model_kw):
    cfg = resolve_model_config(ModelConfig(init="random", arch=arch))
    m = ModelConfig(init="random", arch=arch, **model_kw)
    return build_model(m, lora or LoRAConfig(r=4, alpha=8), moe or MoEConfig(expert_dim=8, num_layers=2), cfg,
                       RoutingContext(), vocab_size=2048)


def test_only_lora_and_moe_weights_train():
    model, blocks = _build()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(("lora_" in n) or (".router." in n) or (".experts." in n) for n in trainable)
    assert len(blocks) == 2 and [b.layer_idx for b in blocks] == [1, 3]
    assert any("q_proj.lora_A" in n for n in trainable) and any("down_proj.lora_B" in n for n in trainable)
    # the routers are not LoRA-adapted even with all-linear
    model, _ = _build(lora=LoRAConfig(r=4, alpha=8, target_modules=["all-linear"]))
    assert not any("router" in n and "lora_" in n for n, _ in model.named_parameters())


def test_lora_target_missing_from_model_is_named_with_alternatives():
    with pytest.raises(ConfigError, match=r"lora\.target_modules: \[.*'gate_proj'.*not found in Phi3ForCausalLM.*qkv_proj"):
        _build("tiny-phi3")  # Phi-3 fuses q/k/v and gate/up
    _build("tiny-phi3", lora=LoRAConfig(r=4, alpha=8, target_modules=["all-linear"]))


def _saved_bytes_and_grads(model, ctx):
    """Bytes autograd keeps for the backward pass of one forward, and the trainable gradients after it."""
    model.train()
    torch.manual_seed(0)
    ids = torch.randint(0, 2000, (2, 64))
    saved = []
    ctx.start()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel() * t.element_size()) or t,
                                                  lambda t: t):
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    ctx.stop()
    loss.backward()
    return sum(saved), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def test_selective_checkpointing_keeps_the_chosen_layers_and_the_same_gradients():
    """gradient_checkpointing_layers=N checkpoints N layers spread over the depth: memory between none and all,
    gradients identical (recomputation is exact)."""
    runs = {}
    for name, kw in {"none": {}, "all": {"gradient_checkpointing": True},
                     "two": {"gradient_checkpointing": True, "gradient_checkpointing_layers": 2}}.items():
        torch.manual_seed(0)
        cfg = resolve_model_config(ModelConfig(init="random", arch="tiny-mistral"))
        ctx = RoutingContext()
        model, _ = build_model(ModelConfig(init="random", arch="tiny-mistral", **kw), LoRAConfig(r=4, alpha=8),
                               MoEConfig(expert_dim=8, num_layers=2), cfg, ctx, vocab_size=2048)
        flags = [layer.gradient_checkpointing for layer in model.base_model.model.model.layers]
        runs[name] = (flags, *_saved_bytes_and_grads(model, ctx))
    assert runs["none"][0] == [False] * 4 and runs["all"][0] == [True] * 4
    assert runs["two"][0] == [False, True, False, True]  # spread: layers 1 and 3 of 4
    assert runs["all"][1] < runs["two"][1] < runs["none"][1]
    for grads in (runs["all"][2], runs["two"][2]):
        assert grads.keys() == runs["none"][2].keys()
        for k, g in grads.items():
            torch.testing.assert_close(g, runs["none"][2][k], msg=k)


def test_offloaded_activations_are_the_checkpointed_layer_inputs_and_give_the_same_gradients():
    """model.offload_activations packs what autograd saves into CPU memory: with checkpointing on every layer that
    is each decoder layer's input. The hooks run here with the CPU standing in for the GPU (device_type="cpu"):
    what gets offloaded, and exact gradients after the round trip. The GPU run is in tests/test_gpu.py."""
    from lightning_moe.training.offload import OffloadSavedActivations

    cfg = resolve_model_config(ModelConfig(init="random", arch="tiny-mistral"))
    runs = {}
    for offload in (False, True):
        torch.manual_seed(0)
        ctx = RoutingContext()
        model, _ = build_model(ModelConfig(init="random", arch="tiny-mistral", gradient_checkpointing=True),
                               LoRAConfig(r=4, alpha=8), MoEConfig(expert_dim=8, num_layers=2), cfg, ctx, 2048)
        hooks = OffloadSavedActivations(min_bytes=1024, device_type="cpu")
        torch.manual_seed(1)
        ids = torch.randint(0, 2000, (2, 64))
        ctx.start()
        with hooks if offload else contextlib.nullcontext():
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        ctx.stop()
        loss.backward()
        runs[offload] = hooks.offloaded_bytes, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    layer_input = 2 * 64 * cfg.hidden_size * 4  # (batch, seq, hidden) float32
    assert runs[False][0] == 0 and runs[True][0] >= cfg.num_hidden_layers * layer_input
    for k, g in runs[True][1].items():
        torch.testing.assert_close(g, runs[False][1][k], msg=k)
    weight = next(p for p in model.parameters() if p.numel() * 4 >= 1024)
    mask = torch.ones(64, 64, dtype=torch.bool)
    assert hooks._pack(weight) is weight and hooks._pack(mask) is mask  # never copied: parameters, masks


def test_qlora_nf4_trains_on_cpu(tmp_path):
    """bitsandbytes >= 0.46 quantises and runs nf4 on CPU: the whole QLoRA path, not only its config."""
    import bitsandbytes as bnb

    tiny_model("tiny-mistral").save_pretrained(tmp_path)
    cfg = resolve_model_config(ModelConfig(name_or_path=str(tmp_path)))
    m = ModelConfig(name_or_path=str(tmp_path), load_in_4bit=True, bnb_4bit_compute_dtype="float32",
                    gradient_checkpointing=True)
    ctx = RoutingContext()
    model, blocks = build_model(m, LoRAConfig(r=4, alpha=8), MoEConfig(expert_dim=8, num_layers=2), cfg, ctx, 2048)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    assert isinstance(layer, bnb.nn.Linear4bit) and layer.weight.quant_type == "nf4"
    model.train()
    ids = torch.randint(0, 2000, (2, 16))
    ctx.start()
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    assert len(ctx.stop()) == 2
    loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)
    flops = count_flops(model, cfg)
    assert flops.frozen_matmul_params == count_flops(_build()[0], cfg).frozen_matmul_params  # 4-bit counted unpacked


def test_pretrained_weights_train_in_training_mode_with_checkpointing(tmp_path):
    """from_pretrained hands back a model in eval mode and Lightning keeps submodule modes: without a .train()
    the decoder layers skip checkpointing (every activation kept) and dropout."""
    tiny_model("tiny-mistral").save_pretrained(tmp_path)
    cfg = resolve_model_config(ModelConfig(name_or_path=str(tmp_path)))
    saved = {}
    for ckpt in (False, True):
        ctx = RoutingContext()
        model, _ = build_model(ModelConfig(name_or_path=str(tmp_path), gradient_checkpointing=ckpt),
                               LoRAConfig(r=4, alpha=8), MoEConfig(expert_dim=8, num_layers=2), cfg, ctx, 2048)
        assert all(m.training for m in model.modules())
        ids = torch.randint(0, 2000, (2, 64))
        sizes = []
        ctx.start()
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel() * t.element_size()) or t,
                                                      lambda t: t):
            model(input_ids=ids, labels=ids, use_cache=False)  # no .train() here: as Lightning would run it
        ctx.stop()
        saved[ckpt] = sum(sizes)
    assert saved[True] < saved[False] / 2


@pytest.mark.parametrize("upcast", [True, False])
def test_qlora_upcast_of_the_unquantised_weights_is_a_choice(tmp_path, upcast):
    """peft's prepare_model_for_kbit_training casts embeddings, norms and lm_head to float32;
    model.upcast_non_quantized=false keeps them bf16. Either way the base is frozen and LoRA trains."""
    tiny_model("tiny-mistral").to(torch.bfloat16).save_pretrained(tmp_path)
    cfg = resolve_model_config(ModelConfig(name_or_path=str(tmp_path)))
    m = ModelConfig(name_or_path=str(tmp_path), dtype="bfloat16", load_in_4bit=True, gradient_checkpointing=True,
                    upcast_non_quantized=upcast)
    ctx = RoutingContext()
    model, _ = build_model(m, LoRAConfig(r=4, alpha=8), MoEConfig(expert_dim=8, num_layers=2), cfg, ctx, 2048)
    inner = model.base_model.model
    unquantised = [inner.model.embed_tokens.weight, inner.model.norm.weight, inner.lm_head.weight]
    assert {w.dtype for w in unquantised} == {torch.float32 if upcast else torch.bfloat16}
    assert not any(w.requires_grad for w in unquantised) and inner.model.layers[0].gradient_checkpointing
    saved, grads = _saved_bytes_and_grads(model, ctx)
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads.values())


def test_flop_count_matches_a_hand_count():
    model, blocks = _build(lora=LoRAConfig(r=4, alpha=8), moe=MoEConfig(expert_dim=8, num_layers=2, top_k=2))
    c = resolve_model_config(ModelConfig(init="random", arch="tiny-mistral"))
    h, i, L, nh, nkv, d, V = 128, 352, 4, 4, 2, 32, 2048
    per_layer = h * nh * d + 2 * h * nkv * d + nh * d * h + 3 * h * i
    n = L * per_layer + V * h  # lm_head counted, input embedding not
    lora = L * 4 * ((h + nh * d) + 2 * (h + nkv * d) + (nh * d + h) + 2 * (h + i) + (i + h))  # r * (in + out) each
    experts_active = 2 * (3 * h * 8)  # top-2 of 4 SwiGLU adapters with bottleneck 8
    router = 4 * h
    p = lora + 2 * (experts_active + router)
    flops = count_flops(model, c, active_experts=2)
    assert (flops.frozen_matmul_params, flops.trainable_params_per_token, flops.attn_lhd) == (n, p, L * nh * d)
    s = 100
    assert flops.per_batch(s, s * s) == s * (4 * n + 6 * p) + 6 * L * nh * d * s * s

    # upcycled experts through LoRA: each MoE layer's MLP becomes 4 frozen copies, a token runs 2 of them
    model, _ = _build(lora=LoRAConfig(r=4, alpha=8), moe=MoEConfig(expert="upcycled", num_layers=2, lora_r=2))
    flops = count_flops(model, c, active_experts=2)
    mlp = 3 * h * i
    n_up = n - 2 * mlp + 2 * (2 * mlp)  # the 2 MoE layers: their MLP gone, 2 active copies instead
    expert_lora = 2 * (h + i) * 2 + (i + h) * 2  # rank 2 on gate, up, down of one expert
    lora_up = lora - 2 * 4 * (2 * (h + i) + (i + h))  # the MoE layers' own MLP LoRA went with their MLP
    assert flops.frozen_matmul_params == n_up
    assert flops.trainable_params_per_token == lora_up + 2 * (2 * expert_lora + router)


def test_missing_architecture_is_named():
    with pytest.raises(ConfigError, match="model.arch: no architecture 'tiny-nothing'"):
        resolve_model_config(ModelConfig(init="random", arch="tiny-nothing"))
    assert (REPO / "lightning_moe" / "models" / "architectures" / "mistral-nemo-12b.json").is_file()


def test_moe_blocks_sit_in_the_peft_model():
    model, blocks = _build()
    assert all(isinstance(b, MoEBlock) for b in blocks)
    names = [n for n, m in model.named_modules() if isinstance(m, MoEBlock)]
    assert names == ["base_model.model.model.layers.1.mlp", "base_model.model.model.layers.3.mlp"]


def test_lora_inputs_stay_in_the_autocast_dtype_with_the_same_result():
    """Skipping peft's float32 cast of LoRA inputs under bf16 autocast changes speed, not numbers: the
    bf16 -> float32 -> bf16 round trip is exact, so loss and gradients are identical."""
    def loss_and_grads(keep: bool):
        torch.manual_seed(0)
        model, _ = _build(lora=LoRAConfig(r=4, alpha=8, dropout=0.0), moe=MoEConfig(enabled=False), dtype="bfloat16")
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.02)
        if keep:
            assert keep_lora_inputs_in_autocast_dtype(model) == 4 * 7
        ids = torch.randint(4, 2048, (2, 24), generator=torch.Generator().manual_seed(1))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    (ref, ref_grads), (loss, grads) = loss_and_grads(False), loss_and_grads(True)
    assert loss == ref
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=0, atol=0, msg=name)
