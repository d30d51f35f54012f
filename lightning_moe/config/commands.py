"""Typed schemas of the commands that use a trained run: evaluate.py, generate.py, chat.py, export.py.

Each extends the training schema, so `model.*`, `data.*`, `moe.*` overrides are accepted on their command lines;
they apply to the run's saved config (lightning_moe.checkpointing.load.apply_overrides), not to defaults. The
command's own keys are typed here: a misspelt or mistyped one fails before anything loads.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from lightning_moe.config.schema import DTYPES, ConfigError, TrainConfig


@dataclass
class UseConfig(TrainConfig):
    run: Any = "???"  # a run directory, its export/ folder, or a .ckpt (evaluate.py: also a list, or a sweep dir)
    checkpoint: str = "last"  # last | best | <global step> | a path to a .ckpt
    device: str = "auto"  # auto (cuda if there is one) | cpu | cuda | cuda:N


@dataclass
class SamplingConfig(UseConfig):
    max_new_tokens: int = 256
    greedy: bool = True  # false: sample with temperature and top_p
    temperature: float = 0.7
    top_p: float = 0.9
    seed: int = 0
    system_prompt: Optional[str] = None  # added to conversations without a system turn (null: data.system_prompt)


@dataclass
class GenerateConfig(SamplingConfig):
    prompts: str = "???"  # JSONL of {"messages": [...]} rows, each ending with a user turn
    out: str = "???"  # JSONL: each row + reply, finish_reason, routing (written atomically)
    overwrite: bool = False  # true: replace an existing out= file (never the prompts file, never inside a run)
    batch_size: int = 8


@dataclass
class ChatConfig(SamplingConfig):
    show_routing: bool = True


@dataclass
class ProbesConfig:
    crows_pairs: Optional[str] = None  # crows_pairs_anonymized.csv
    stereoset: Optional[str] = None  # intrasentence_stereo_set.csv
    limit: Optional[int] = None  # the first N pairs of each (null: all)


@dataclass
class EvaluateConfig(UseConfig):
    files: List[str] = field(default_factory=list)  # labelled JSONL to evaluate on (empty: the run's validation split)
    base: bool = True  # also the base model (adapters and MoE off), with the gain
    out: Optional[str] = None  # null: <run>/eval/<time> (one run) or runs/eval/<time> (several)
    batch_size: Optional[int] = None  # null: the run's data.batch_size
    probes: ProbesConfig = field(default_factory=ProbesConfig)


@dataclass
class ExportConfig(UseConfig):
    format: str = "???"  # merged | peft | per_domain
    out: str = "???"  # a new folder (an existing one is refused)
    dtype: Optional[str] = None  # merged weights' dtype (null: the run's model.dtype)


for name, node in (("lightning_moe_generate", GenerateConfig), ("lightning_moe_chat", ChatConfig),
                   ("lightning_moe_evaluate", EvaluateConfig), ("lightning_moe_export", ExportConfig)):
    ConfigStore.instance().store(name=name, node=node)


def check_command(cfg: DictConfig) -> None:
    """The command's own values, before torch loads: a required key left out, or a value no run can use, is a
    ConfigError naming the key (exit 2), not a traceback after the weights loaded."""
    training_keys = {f.name for f in fields(TrainConfig)}  # run_dir & co.: the run's, not the command's
    missing = [k for k in cfg if k not in training_keys and OmegaConf.is_missing(cfg, k)]  # in the schema's order
    if missing:
        raise ConfigError(f"{missing[0]}: required; give it on the command line ({missing[0]}=...)"
                          + (f"; also missing: {', '.join(missing[1:])}" if missing[1:] else ""))

    def at_least_one(key: str) -> None:
        value = OmegaConf.select(cfg, key)
        if value is not None and value < 1:
            raise ConfigError(f"{key}: {value} must be at least 1")

    for key in ("max_new_tokens", "batch_size", "probes.limit"):
        at_least_one(key)
    if "temperature" in cfg and not cfg.greedy and not cfg.temperature > 0:
        raise ConfigError(f"temperature: {cfg.temperature} must be > 0 when sampling (greedy=false)")
    if "top_p" in cfg and not 0 < cfg.top_p <= 1:
        raise ConfigError(f"top_p: {cfg.top_p} must be in (0, 1]")
    if "format" in cfg and cfg.get("dtype") is not None and cfg.dtype not in DTYPES:
        raise ConfigError(f"dtype: '{cfg.dtype}' is not one of {', '.join(DTYPES)} (null: the run's model.dtype)")
