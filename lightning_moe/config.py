"""Typed schemas for the config sections this project owns, and the checks that run before any weights load.

Hydra composes `conf/`; `validate_config` merges each owned section (model, data, lora, moe, optim) into its
dataclass schema, so a misspelt key or a wrong type is reported with its full key, then checks the
cross-field rules. Trainer, callbacks and loggers are Lightning objects built with `hydra.utils.instantiate`;
only the values we depend on are checked here. This module imports no torch, so it runs in about a second.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

ROUTERS = ("topk", "switch", "expert_choice", "dynamic", "deepseek")
EXPERTS = ("adapter", "lora", "upcycled")
DISPATCH = ("auto", "dense", "grouped", "loop")
DTYPES = ("float32", "bfloat16", "float16")
SCHEDULERS = ("cosine", "linear", "constant")
OPTIMIZERS = ("adamw", "adamw_8bit")
DEFAULT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key and what is allowed."""


@dataclass
class ModelConfig:
    name_or_path: Optional[str] = None  # HF Hub id or local directory with config.json + weights
    init: str = "pretrained"  # pretrained: load weights; random: same architecture, random weights, no download
    arch: Optional[str] = None  # architecture json (lightning_moe/architectures/NAME.json) used by init=random
    tokenizer: Optional[str] = None  # null: the model's own; falls back to data/tokenizer for init=random
    dtype: str = "float32"  # dtype of the frozen base weights; trainable weights stay float32
    attn_implementation: str = "sdpa"
    gradient_checkpointing: bool = False
    # with gradient_checkpointing: checkpoint this many decoder layers, spread over the depth (null: all); the
    # others keep their activations: faster, more memory (MOE_TRAINING_GUIDE.md section 8 has the measured sizes)
    gradient_checkpointing_layers: Optional[int] = None
    # keep the activations saved for the backward pass (with checkpointing: each layer's input) in pinned CPU
    # memory, copied on a side stream: the memory floor for long rows or small GPUs, at a measured speed cost; CUDA
    offload_activations: bool = False
    load_in_4bit: bool = False  # QLoRA: bitsandbytes 4-bit base weights (CUDA only)
    liger_kernel: bool = False  # Liger's Triton kernels (RMSNorm, RoPE, SwiGLU, fused linear cross-entropy); CUDA
    bnb_4bit_quant_type: str = "nf4"
    bnb_4bit_compute_dtype: str = "bfloat16"
    bnb_4bit_use_double_quant: bool = True
    # QLoRA: peft's prepare_model_for_kbit_training casts the weights left unquantised (embeddings, lm_head, norms)
    # to float32, 2.5 GiB more on NeMo-12B; false keeps them in model.dtype (frozen either way)
    upcast_non_quantized: bool = True
    trust_remote_code: bool = False
    revision: Optional[str] = None


@dataclass
class DataConfig:
    train_files: List[str] = field(default_factory=list)
    val_files: List[str] = field(default_factory=list)  # empty: hold out val_fraction of train_files
    val_fraction: float = 0.1
    split_seed: int = 42
    max_length: int = 2048
    overlong: str = "truncate"  # truncate: keep the first max_length tokens; drop: skip the conversation
    on_error: str = "raise"  # a bad row: raise (name file, line, problem) | skip (count per reason, report)
    packing: bool = False  # padding-free: conversations share rows of max_length, attention kept inside each
    batch_size: int = 4
    num_workers: int = 0
    pin_memory: bool = False
    chat_template: Optional[str] = None  # path to a .jinja file that replaces the tokenizer's template
    system_prompt: Optional[str] = None  # added to conversations that have no system turn
    map_num_proc: Optional[int] = None  # processes for tokenisation (datasets.map)


@dataclass
class LoRAConfig:
    enabled: bool = True
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: List[str] = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))  # or [all-linear]
    bias: str = "none"


@dataclass
class MoEConfig:
    enabled: bool = True
    num_experts: int = 4
    top_k: int = 2  # experts per token (topk, deepseek); the static reference for dynamic routing
    layers: Optional[List[int]] = None  # decoder-layer indices (negative counts from the end); null: spread
    num_layers: int = 4  # with layers=null: this many layers evenly spread over the depth
    # routing
    router: str = "topk"  # topk | switch | expert_choice | dynamic | deepseek
    routing_level: str = "token"  # token | sequence (one decision per conversation, from its mean hidden state)
    router_init_std: float = 0.02
    capacity_factor: float = 1.25  # switch: tokens per expert = factor * tokens / E; expert_choice: experts per token
    dynamic_mode: str = "top_p"  # top_p | threshold
    dynamic_p: float = 0.5  # top_p: keep experts until their probability mass reaches p
    dynamic_threshold: float = 0.25  # threshold: keep experts with probability >= threshold
    min_experts: int = 1
    max_experts: Optional[int] = None  # null: num_experts
    n_group: int = 1  # deepseek grouped selection: experts in n_group groups...
    topk_group: int = 1  # ...of which the best topk_group are eligible
    norm_topk_prob: bool = True  # deepseek: renormalise the chosen weights
    routed_scaling_factor: float = 1.0  # deepseek: scale of the routed output
    # experts
    expert: str = "adapter"  # adapter | lora | upcycled
    expert_dim: int = 64  # adapter bottleneck width
    lora_r: int = 8  # lora experts / upcycled-through-LoRA: rank per expert
    lora_alpha: float = 16.0
    lora_targets: List[str] = field(default_factory=lambda: ["gate_proj", "up_proj", "down_proj"])
    upcycle_train: str = "lora"  # upcycled copies: lora (frozen copies + per-expert LoRA) | full
    upcycle_noise: float = 0.0  # Gaussian noise on the copies, as a fraction of each weight's std
    num_shared_experts: int = 0  # always-on experts beside the routed ones
    shared_expert_dim: Optional[int] = None  # null: expert_dim
    shared_expert_gate: bool = False  # Qwen2-MoE's sigmoid gate on the shared expert
    dispatch: str = "auto"  # auto (dense for adapter, grouped for upcycled) | dense | grouped | loop
    # balancing: every coefficient 0 turns its term off
    aux_loss_coef: float = 0.01  # Switch/Mixtral load balancing over all MoE layers
    z_loss_coef: float = 0.001  # ST-MoE router z-loss
    domain_loss_coef: float = 0.1  # pulls a labelled conversation's rows toward expert[domain]
    domain_loss_balance: bool = False  # weight domains by the inverse of their share of the training data
    loramoe_coef: float = 0.0  # LoRAMoE localized balancing...
    loramoe_delta: float = 0.1  # ...with importance 1 +/- delta
    entropy_coef: float = 0.0  # routing-entropy penalty (dynamic routing)
    bias_update_rate: float = 0.0  # deepseek aux-loss-free balancing: bias step per optimizer step
    bias_update_center: bool = True  # subtract the mean of each bias update (torchtitan)


@dataclass
class OptimConfig:
    # adamw: torch's (fused on CUDA); adamw_8bit: bitsandbytes' AdamW8bit, moments in 8 bits (0.9 -> 0.22 GiB for the
    # recipe's 120M trainable parameters): the memory floor, with QLoRA or offloading
    name: str = "adamw"
    lr: float = 3e-4
    weight_decay: float = 0.01
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    fused: Optional[bool] = None  # null: fused AdamW on CUDA, foreach elsewhere
    scheduler: str = "cosine"
    warmup_steps: int = 100
    min_lr_ratio: float = 0.0  # floor of the cosine schedule as a fraction of lr
    budget_aware_schedule: bool = False  # size the schedule from the wall-clock budget (callbacks.budget)
    nonfinite: str = "skip"  # a NaN/Inf gradient: skip the step (up to max_nonfinite_skips, then stop) | stop
    max_nonfinite_skips: int = 3


@dataclass
class TrainConfig:
    """The primary config's schema (first in conf/train.yaml's defaults): every owned key exists in every
    composition, so `model.load_in_4bit=true` needs no `+`, and a wrong type fails at composition."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    domains: List[str] = field(default_factory=list)
    seed: int = 42
    run_name: str = "run"
    run_dir: str = "???"
    resume: bool = True
    trainer: Any = None  # Lightning objects: `_target_` dicts for hydra.utils.instantiate
    callbacks: Any = None
    logger: Any = None


ConfigStore.instance().store(name="lightning_moe_schema", node=TrainConfig)

SCHEMAS = {"model": ModelConfig, "data": DataConfig, "lora": LoRAConfig, "moe": MoEConfig, "optim": OptimConfig}


@dataclass
class Sections:
    model: ModelConfig
    data: DataConfig
    lora: LoRAConfig
    moe: MoEConfig
    optim: OptimConfig
    domains: List[str]


_MAX_TIME = re.compile(r"^\d{2}:\d{2}:\d{2}:\d{2}$")


def _typed(name: str, node) -> object:
    try:
        # resolve against the whole config first: sections interpolate top-level keys such as ${seed}
        plain = OmegaConf.to_container(node, resolve=True) if node is not None else {}
        merged = OmegaConf.merge(OmegaConf.structured(SCHEMAS[name]), plain)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:  # name the full key, e.g. "moe.top_k", not just "top_k"
        key = getattr(e, "full_key", None) or getattr(e, "key", None) or "?"
        key = key if str(key).startswith(name) else f"{name}.{key}"
        msg = str(e).splitlines()[0]
        raise ConfigError(f"{key}: {msg}") from None


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


def validate_config(cfg: DictConfig) -> Sections:
    """Check everything that can be checked without torch or weights; return the typed sections."""
    sec = Sections(**{n: _typed(n, cfg.get(n)) for n in SCHEMAS}, domains=list(cfg.get("domains") or []))
    m, d, lo, moe, o = sec.model, sec.data, sec.lora, sec.moe, sec.optim

    _check(m.init in ("pretrained", "random"), "model.init", f"'{m.init}' is not one of pretrained, random")
    if m.init == "pretrained":
        _check(bool(m.name_or_path), "model.name_or_path", "required with model.init=pretrained")
    else:
        _check(bool(m.arch or m.name_or_path), "model.arch", "model.init=random needs an architecture config")
    for key in ("dtype", "bnb_4bit_compute_dtype"):
        _check(getattr(m, key) in DTYPES, f"model.{key}", f"'{getattr(m, key)}' is not one of {', '.join(DTYPES)}")
    _check(m.bnb_4bit_quant_type in ("nf4", "fp4"), "model.bnb_4bit_quant_type", "must be nf4 or fp4")
    if m.gradient_checkpointing_layers is not None:
        _check(m.gradient_checkpointing, "model.gradient_checkpointing_layers",
               "set, but model.gradient_checkpointing is false")
        _check(m.gradient_checkpointing_layers >= 1, "model.gradient_checkpointing_layers",
               f"must be >= 1 (or null: every layer), got {m.gradient_checkpointing_layers}")
    if m.load_in_4bit:
        _check(lo.enabled, "lora.enabled", "QLoRA (model.load_in_4bit=true) trains LoRA adapters: enable lora")

    _check(bool(d.train_files), "data.train_files", "at least one JSON/JSONL file is required")
    _check(0.0 < d.val_fraction < 1.0 or bool(d.val_files), "data.val_fraction", "must be in (0, 1)")
    _check(d.max_length >= 16, "data.max_length", f"{d.max_length} is too small (>= 16)")
    _check(d.overlong in ("truncate", "drop"), "data.overlong", f"'{d.overlong}' is not one of truncate, drop")
    _check(d.on_error in ("raise", "skip"), "data.on_error", f"'{d.on_error}' is not one of raise, skip")
    _check(d.batch_size >= 1, "data.batch_size", f"must be >= 1, got {d.batch_size}")
    _check(d.num_workers >= 0, "data.num_workers", f"must be >= 0, got {d.num_workers}")

    if lo.enabled:
        _check(lo.r >= 1, "lora.r", f"must be >= 1, got {lo.r}")
        _check(lo.alpha > 0, "lora.alpha", f"must be > 0, got {lo.alpha}")
        _check(0.0 <= lo.dropout < 1.0, "lora.dropout", "must be in [0, 1)")
        _check(bool(lo.target_modules), "lora.target_modules", "empty list: name modules or use [all-linear]")

    if moe.enabled:
        _check(moe.router in ROUTERS, "moe.router", f"'{moe.router}' is not one of {', '.join(ROUTERS)}")
        _check(moe.expert in EXPERTS, "moe.expert", f"'{moe.expert}' is not one of {', '.join(EXPERTS)}")
        _check(moe.num_experts >= 1, "moe.num_experts", f"must be >= 1, got {moe.num_experts}")
        _check(
            1 <= moe.top_k <= moe.num_experts,
            "moe.top_k",
            f"{moe.top_k} must be between 1 and moe.num_experts={moe.num_experts}",
        )
        _check(moe.expert_dim >= 1, "moe.expert_dim", f"must be >= 1, got {moe.expert_dim}")
        _check(moe.layers is None or len(moe.layers) > 0, "moe.layers", "empty list: give indices or null")
        _check(moe.layers is not None or moe.num_layers >= 1, "moe.num_layers", "must be >= 1")
        for key in ("aux_loss_coef", "z_loss_coef", "domain_loss_coef", "loramoe_coef", "entropy_coef",
                    "bias_update_rate", "upcycle_noise"):
            _check(getattr(moe, key) >= 0, f"moe.{key}", "must be >= 0 (0 turns the term off)")
        _check(moe.routing_level in ("token", "sequence"), "moe.routing_level", "must be token or sequence")
        _check(moe.dispatch in DISPATCH, "moe.dispatch", f"'{moe.dispatch}' is not one of {', '.join(DISPATCH)}")
        _check(moe.upcycle_train in ("lora", "full"), "moe.upcycle_train", "must be lora or full")
        _check(moe.capacity_factor > 0, "moe.capacity_factor", "must be > 0")
        _check(moe.lora_r >= 1, "moe.lora_r", "must be >= 1")
        if moe.router == "dynamic":
            _check(moe.dynamic_mode in ("top_p", "threshold"), "moe.dynamic_mode", "must be top_p or threshold")
            _check(0 < moe.dynamic_p <= 1, "moe.dynamic_p", "must be in (0, 1]")
            _check(0 < moe.dynamic_threshold <= 1, "moe.dynamic_threshold", "must be in (0, 1]")
            top = moe.max_experts or moe.num_experts
            _check(1 <= moe.min_experts <= top <= moe.num_experts, "moe.min_experts",
                   f"need 1 <= min_experts ({moe.min_experts}) <= max_experts ({top}) <= num_experts")
        if moe.router == "deepseek":
            _check(moe.num_experts % moe.n_group == 0, "moe.n_group",
                   f"{moe.n_group} groups must divide moe.num_experts={moe.num_experts}")
            _check(1 <= moe.topk_group <= moe.n_group, "moe.topk_group", f"must be in 1..moe.n_group={moe.n_group}")
            per_group = moe.num_experts // moe.n_group
            _check(moe.n_group == 1 or per_group >= 2, "moe.n_group", "grouped selection needs >= 2 experts per group")
            _check(moe.top_k <= moe.topk_group * per_group, "moe.top_k",
                   f"{moe.top_k} > experts in the {moe.topk_group} eligible groups ({moe.topk_group * per_group})")
        if moe.bias_update_rate > 0:
            _check(moe.router == "deepseek", "moe.bias_update_rate", "aux-loss-free bias updates need moe.router=deepseek")
        if moe.router == "expert_choice":
            _check(moe.routing_level == "token", "moe.routing_level", "expert choice routes tokens within a sequence")
            _check(not d.packing, "data.packing", "expert choice routes within a sequence: it needs padded batches "
                   "(data.packing=false)")
        if moe.domain_loss_coef > 0:
            _check(
                len(sec.domains) == moe.num_experts,
                "domains",
                f"domain supervision (moe.domain_loss_coef={moe.domain_loss_coef}) maps domain i to expert i, so "
                f"the {len(sec.domains)} domains {sec.domains} need moe.num_experts={len(sec.domains)} "
                f"(got {moe.num_experts}); or set moe.domain_loss_coef=0",
            )
    _check(len(set(sec.domains)) == len(sec.domains), "domains", f"duplicate names in {sec.domains}")

    _check(o.lr > 0, "optim.lr", f"must be > 0, got {o.lr}")
    _check(o.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
    _check(len(o.betas) == 2, "optim.betas", "must be two numbers")
    _check(o.name in OPTIMIZERS, "optim.name", f"'{o.name}' is not one of {', '.join(OPTIMIZERS)}")
    _check(o.scheduler in SCHEDULERS, "optim.scheduler", f"'{o.scheduler}' is not one of {', '.join(SCHEDULERS)}")
    _check(o.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
    _check(0.0 <= o.min_lr_ratio <= 1.0, "optim.min_lr_ratio", "must be in [0, 1]")
    _check(o.nonfinite in ("skip", "stop"), "optim.nonfinite", f"'{o.nonfinite}' is not one of skip, stop")
    _check(o.max_nonfinite_skips >= 0, "optim.max_nonfinite_skips", "must be >= 0")

    tr = cfg.get("trainer") or {}
    acc = tr.get("accumulate_grad_batches", 1)
    _check(isinstance(acc, int) and acc >= 1, "trainer.accumulate_grad_batches", f"must be >= 1, got {acc}")
    max_time = tr.get("max_time")
    if max_time is not None and isinstance(max_time, str):
        _check(
            bool(_MAX_TIME.match(max_time)),
            "trainer.max_time",
            f"'{max_time}' is not DD:HH:MM:SS (e.g. 00:12:00:00 for 12 hours)",
        )
    return sec


def spread_layers(num_hidden_layers: int, count: int) -> list[int]:
    """`count` layer indices evenly spread over the depth, centred in equal bands (40, 4 -> 5, 15, 25, 35)."""
    count = min(count, num_hidden_layers)
    return [int((i + 0.5) * num_hidden_layers / count) for i in range(count)]


def resolve_moe_layers(moe: MoEConfig, num_hidden_layers: int) -> list[int]:
    """The decoder-layer indices that get MoE blocks; raises ConfigError naming moe.layers when out of range."""
    if moe.layers is None:
        return spread_layers(num_hidden_layers, moe.num_layers)
    out = []
    for i in moe.layers:
        _check(
            -num_hidden_layers <= i < num_hidden_layers,
            "moe.layers",
            f"index {i} is out of range for a model with {num_hidden_layers} decoder layers "
            f"(allowed: {-num_hidden_layers}..{num_hidden_layers - 1})",
        )
        out.append(i % num_hidden_layers)
    _check(len(set(out)) == len(out), "moe.layers", f"{moe.layers} names a layer twice")
    return sorted(out)
