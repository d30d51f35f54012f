"""`validate_config`: every check that needs only the config, before torch is imported.

Each owned section (model, data, lora, moe, optim) is merged into its dataclass schema, so a misspelt key or a
wrong type is reported with its full key; then the cross-field rules, including the trainer values this project
depends on. Every failure is a ConfigError naming the key (train.py exits with code 2). Checks that need the
model's architecture or the device are in models/prechecks.py; entry points call this once, then those.
"""

from __future__ import annotations

import re
from dataclasses import fields

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lightning_moe.config.registry import EXPERTS, ROUTERS, SECTIONS, expert_config, router_config
from lightning_moe.config.routers import MOVED, refuse_moved
from lightning_moe.config.schema import (
    DISPATCH,
    DTYPES,
    OPTIMIZERS,
    SCHEDULERS,
    ConfigError,
    MoEConfig,
    SCHEMAS,
    Sections,
)

_MAX_TIME = re.compile(r"^\d{2}:\d{2}:\d{2}:\d{2}$")
PRECISIONS = ("32-true", "32", "bf16-mixed", "bf16-true", "16-mixed", "16-true", "64-true", "transformer-engine")


def _typed(name: str, node) -> object:
    try:
        # resolve against the whole config first: sections interpolate top-level keys such as ${seed}
        plain = OmegaConf.to_container(node, resolve=True) if node is not None else {}
        if name == "moe":  # Hydra's schema keeps the keys that moved into a router's section, to name their new place
            refuse_moved(plain)
            plain = {k: v for k, v in plain.items() if k not in MOVED}
        merged = OmegaConf.merge(OmegaConf.structured(SCHEMAS[name]), plain)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:  # name the full key, e.g. "moe.top_k", not just "top_k"
        key = getattr(e, "full_key", None) or getattr(e, "key", None) or "?"
        key = key if str(key).startswith(name) else f"{name}.{key}"
        msg = str(e).splitlines()[0]
        raise ConfigError(f"{key}: {msg}") from None


def check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


COMPILE_SCOPES = ("none", "layers", "moe", "all")  # model.compile: lightning_moe/models/compilation.py


def one_of(value, allowed, key: str) -> None:
    check(value in allowed, key, f"'{value}' is not one of {', '.join(allowed)}")


# ---- plug-in sections: each router and expert form checks its own (config/routers.py, config/expert_forms.py) ----
def _sections(moe: MoEConfig, sec: Sections) -> None:
    """The chosen router's and expert form's own checks; a knob of one not chosen does nothing: say so."""
    router_config(moe).check(moe, sec)
    expert_config(moe).check(moe, sec)
    for name, (kind, cls) in SECTIONS.items():
        section = getattr(moe, name, None)
        if name == getattr(moe, kind) or section is None:
            continue
        for f in fields(section):
            if getattr(section, f.name) != getattr(cls(), f.name):
                what = "router" if kind == "router" else "expert form"
                raise ConfigError(f"moe.{name}.{f.name}: set to {getattr(section, f.name)}, but moe.{kind}="
                                  f"{getattr(moe, kind)}; moe.{name}.* configure the {name} {what} only "
                                  f"(moe.{kind}={name})")


# ---- sections ----------------------------------------------------------------------------------------------
def _model(sec: Sections) -> None:
    m, lo = sec.model, sec.lora
    one_of(m.init, ("pretrained", "random"), "model.init")
    if m.init == "pretrained":
        check(bool(m.name_or_path), "model.name_or_path", "required with model.init=pretrained")
    else:
        check(bool(m.arch or m.name_or_path), "model.arch", "model.init=random needs an architecture config")
    for key in ("dtype", "bnb_4bit_compute_dtype"):
        one_of(getattr(m, key), DTYPES, f"model.{key}")
    one_of(m.bnb_4bit_quant_type, ("nf4", "fp4"), "model.bnb_4bit_quant_type")
    one_of(m.compile, COMPILE_SCOPES, "model.compile")
    one_of(m.base_precision, ("bf16", "fp8"), "model.base_precision")
    one_of(m.fp8_grad_dtype, ("e5m2", "e4m3"), "model.fp8_grad_dtype")
    if m.base_precision == "fp8":  # models/fp8.py: FP8 matmuls for the frozen projections peft wraps
        check(lo.enabled, "model.base_precision", "fp8 runs the frozen base under LoRA's wrappers: enable lora")
        check(not m.load_in_4bit, "model.base_precision", "fp8 and model.load_in_4bit=true exclude each other")
        check(m.dtype == "bfloat16", "model.base_precision", f"fp8 needs model.dtype=bfloat16, got {m.dtype}")
        # measured on an H100 (torch 2.11): dynamo asserts (lift_tracked_freevar_to_input on the root tracer) at the
        # first compiled layer with the FP8 matmul inside; refused here rather than after the weights load
        check(m.compile == "none", "model.base_precision", f"fp8 with model.compile={m.compile} fails in dynamo "
              "(MOE_TRAINING_GUIDE.md section 8, 'One call'): use model.compile=none")
    if m.gradient_checkpointing_layers is not None:
        check(m.gradient_checkpointing, "model.gradient_checkpointing_layers",
              "set, but model.gradient_checkpointing is false")
        check(m.gradient_checkpointing_layers >= 1, "model.gradient_checkpointing_layers",
              f"must be >= 1 (or null: every layer), got {m.gradient_checkpointing_layers}")
    if m.load_in_4bit:
        check(lo.enabled, "lora.enabled", "QLoRA (model.load_in_4bit=true) trains LoRA adapters: enable lora")
        check(m.init == "pretrained", "model.load_in_4bit",
              "4-bit loading quantises pretrained weights; use model.init=pretrained (a local directory works: "
              "save a random model with save_pretrained first)")
    check(lo.enabled or sec.moe.enabled, "lora.enabled / moe.enabled", "nothing to train (both are off)")


def _data(sec: Sections) -> None:
    d = sec.data
    check(bool(d.train_files), "data.train_files", "at least one JSON/JSONL file is required")
    check(0.0 < d.val_fraction < 1.0 or bool(d.val_files), "data.val_fraction", "must be in (0, 1)")
    check(d.max_length >= 16, "data.max_length", f"{d.max_length} is too small (>= 16)")
    one_of(d.overlong, ("truncate", "drop"), "data.overlong")
    one_of(d.on_error, ("raise", "skip"), "data.on_error")
    check(d.batch_size >= 1, "data.batch_size", f"must be >= 1, got {d.batch_size}")
    check(d.row_length is None or d.row_length >= d.max_length, "data.row_length",
          f"{d.row_length} < data.max_length={d.max_length}: a conversation of max_length tokens must fit a row")
    check(d.batch_tokens is None or d.batch_tokens >= d.max_length, "data.batch_tokens",
          f"{d.batch_tokens} < data.max_length={d.max_length}: a conversation of max_length tokens must fit")
    check(d.num_workers >= 0, "data.num_workers", f"must be >= 0, got {d.num_workers}")


def _lora(sec: Sections) -> None:
    lo = sec.lora
    if not lo.enabled:
        return
    check(lo.r >= 1, "lora.r", f"must be >= 1, got {lo.r}")
    check(lo.alpha > 0, "lora.alpha", f"must be > 0, got {lo.alpha}")
    check(0.0 <= lo.dropout < 1.0, "lora.dropout", "must be in [0, 1)")
    check(bool(lo.target_modules), "lora.target_modules", "empty list: name modules or use [all-linear]")


def _moe(sec: Sections) -> None:
    moe = sec.moe
    if moe.enabled:
        one_of(moe.router, tuple(ROUTERS), "moe.router")
        one_of(moe.expert, tuple(EXPERTS), "moe.expert")
        check(moe.num_experts >= 1, "moe.num_experts", f"must be >= 1, got {moe.num_experts}")
        check(1 <= moe.top_k <= moe.num_experts, "moe.top_k",
              f"{moe.top_k} must be between 1 and moe.num_experts={moe.num_experts}")
        check(moe.expert_dim >= 1, "moe.expert_dim", f"must be >= 1, got {moe.expert_dim}")
        check(moe.layers is None or len(moe.layers) > 0, "moe.layers", "empty list: give indices or null")
        check(moe.layers is not None or moe.num_layers >= 1, "moe.num_layers", "must be >= 1")
        for key in ("aux_loss_coef", "z_loss_coef", "domain_loss_coef", "loramoe_coef", "entropy_coef"):
            check(getattr(moe, key) >= 0, f"moe.{key}", "must be >= 0 (0 turns the term off)")
        one_of(moe.routing_level, ("token", "sequence", "turn"), "moe.routing_level")
        one_of(moe.pooling, ("mean", "last_turn"), "moe.pooling")
        check(not moe.tied_router or moe.routing_level != "token", "moe.tied_router",
              "a tied decision is one per conversation or turn: needs moe.routing_level=sequence or turn")
        one_of(moe.dispatch, DISPATCH, "moe.dispatch")
        check(moe.lora_r >= 1, "moe.lora_r", "must be >= 1")
        check(bool(moe.lora_targets) or moe.expert != "lora", "moe.lora_targets", "empty: name MLP projections")
        _sections(moe, sec)
        if moe.domain_loss_coef > 0:
            check(
                len(sec.domains) == moe.num_experts,
                "domains",
                f"domain supervision (moe.domain_loss_coef={moe.domain_loss_coef}) maps domain i to expert i, so "
                f"the {len(sec.domains)} domains {sec.domains} need moe.num_experts={len(sec.domains)} "
                f"(got {moe.num_experts}); or set moe.domain_loss_coef=0",
            )
    check(len(set(sec.domains)) == len(sec.domains), "domains", f"duplicate names in {sec.domains}")


def _optim(sec: Sections) -> None:
    o = sec.optim
    check(o.lr > 0, "optim.lr", f"must be > 0, got {o.lr}")
    check(o.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
    check(len(o.betas) == 2, "optim.betas", "must be two numbers")
    one_of(o.name, OPTIMIZERS, "optim.name")
    one_of(o.scheduler, SCHEDULERS, "optim.scheduler")
    check(o.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
    check(0.0 <= o.min_lr_ratio <= 1.0, "optim.min_lr_ratio", "must be in [0, 1]")
    one_of(o.nonfinite, ("skip", "stop"), "optim.nonfinite")
    check(o.max_nonfinite_skips >= 0, "optim.max_nonfinite_skips", "must be >= 0")


def _trainer(cfg: DictConfig) -> None:
    """The Trainer values this project depends on (the rest is Lightning's to check)."""
    tr = cfg.get("trainer") or {}
    acc = tr.get("accumulate_grad_batches", 1)
    check(isinstance(acc, int) and acc >= 1, "trainer.accumulate_grad_batches", f"must be >= 1, got {acc}")
    max_time = tr.get("max_time")
    if isinstance(max_time, str):
        check(bool(_MAX_TIME.match(max_time)), "trainer.max_time",
              f"'{max_time}' is not DD:HH:MM:SS (e.g. 00:12:00:00 for 12 hours)")
    precision = str(tr.get("precision", "32-true"))
    one_of(precision, PRECISIONS, "trainer.precision")
    if str(tr.get("accelerator", "auto")) == "cpu":
        check_precision_on_cpu(precision)


def check_precision_on_cpu(precision: str) -> None:
    """fp16 autocast on a CPU: Lightning quietly trains in bf16 instead, so the run is not what was asked."""
    check(not precision.startswith("16"), "trainer.precision",
          f"{precision} needs a CUDA GPU (on a CPU Lightning would silently train in bf16): use 32-true or bf16-mixed")


def validate_config(cfg: DictConfig) -> Sections:
    """Check everything that can be checked without torch or weights; return the typed sections."""
    sec = Sections(**{n: _typed(n, cfg.get(n)) for n in SCHEMAS}, domains=list(cfg.get("domains") or []))
    for rules in (_model, _data, _lora, _moe, _optim):
        rules(sec)
    _trainer(cfg)
    return sec
