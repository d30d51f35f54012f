"""What a run was trained on, compared with a new command's config before any weights load.

- The base model: a short hash of the architecture-defining fields of its HF config, how it was made
  (`model.init`) and, for a random base (`model.init=random`), the seed that drew its weights: another seed is
  another base model. Resuming onto another base model is refused.
- The trained sections: LoRA rank/targets and MoE layers/experts/form shape the trained tensors; a rerun of a run
  directory with other values cannot load its checkpoints, so it is refused before anything is touched, naming
  the difference and the override that starts a new run directory instead.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

from lightning_moe.config.schema import ConfigError, Sections
from lightning_moe.models.layout import resolve_moe_layers

# config.json keys that do not change the architecture (and differ between a hub copy and a local one)
_NOT_ARCHITECTURE = {"transformers_version", "_name_or_path", "dtype", "torch_dtype", "use_cache", "architectures",
                     "_attn_implementation_autoset", "output_attentions", "output_hidden_states", "return_dict"}
# the keys of each section that shape the trained tensors (others, such as coefficients, may change on resume)
SHAPE_KEYS = {
    "lora": ("enabled", "r", "target_modules", "bias"),
    "moe": ("enabled", "num_experts", "router", "expert", "expert_dim", "lora_r",
            "lora_targets", "upcycled.train", "num_shared_experts", "shared_expert_dim", "shared_expert_gate"),
}


def fingerprint(config) -> str:
    """A short hash of a HF config's architecture-defining fields."""
    spec = {k: v for k, v in sorted(config.to_dict().items()) if k not in _NOT_ARCHITECTURE}
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]


def base_model_record(model_cfg, config, seed: int | None = None) -> dict:
    record = {"name_or_path": model_cfg.name_or_path, "init": model_cfg.init, "arch": model_cfg.arch,
              "fingerprint": fingerprint(config), "architecture": config.to_dict()}
    if model_cfg.init == "random":
        record["seed"] = seed  # the random base's weights are drawn from it
    return record


def check_base_model(saved: dict | None, where: Path, model_cfg, config, seed: int | None = None) -> None:
    """Refuse a checkpoint or export trained on another base model. `seed`: the command's, compared for a random
    base (None: not compared; the commands that load a trained run rebuild its base from the saved seed)."""
    if not saved:
        return
    ours = fingerprint(config)
    if saved.get("fingerprint") not in (None, ours):
        raise ConfigError(
            f"model: {where} was trained on base model '{saved.get('name_or_path') or saved.get('arch')}' "
            f"(architecture fingerprint {saved.get('fingerprint')}), but this run uses "
            f"'{model_cfg.name_or_path or model_cfg.arch}' ({ours}). Use the same model, or start a new "
            "run directory (hydra.run.dir=...)"
        )
    if saved.get("init") not in (None, model_cfg.init):
        raise ConfigError(
            f"model.init: {where} was trained on a base made with model.init={saved['init']}, but this run uses "
            f"model.init={model_cfg.init}: another base model. Use model.init={saved['init']} to continue it, or "
            "start a new run directory (hydra.run.dir=...)")
    if model_cfg.init == "random" and seed is not None and saved.get("seed") not in (None, seed):
        raise ConfigError(
            f"seed: {where} was trained on a random base (model.init=random) drawn with seed={saved['seed']}; "
            f"seed={seed} would draw another base model. Use seed={saved['seed']} to continue it, or start a new "
            "run directory (hydra.run.dir=...)")


_ABSENT = object()


def _dotted(record: dict, key: str):
    for part in key.split("."):
        if not isinstance(record, dict) or part not in record:
            return _ABSENT
        record = record[part]
    return record


def section_differences(saved: dict, sections: Sections, num_hidden_layers: int) -> list[str]:
    """'lora.r: 16 in the checkpoint, 8 now' for every shape-defining key that differs (MoE layers compared as
    resolved indices, so `moe.layers=[..]` and the same layers spread by `moe.num_layers` agree)."""
    diffs = []
    if sections.moe.enabled and "moe_layers" in saved:
        ours = resolve_moe_layers(sections.moe, num_hidden_layers)
        if saved["moe_layers"] and ours != saved["moe_layers"]:
            diffs.append(f"moe layers: {saved['moe_layers']} in the checkpoint, {ours} now (moe.layers / moe.num_layers)")
    for name, keys in SHAPE_KEYS.items():
        ours, theirs = asdict(getattr(sections, name)), saved.get(name) or {}
        if not ours["enabled"] and not theirs.get("enabled", ours["enabled"]):
            continue
        for key in keys:  # "upcycled.train": a key of a plug-in's own section
            a, b = _dotted(theirs, key), _dotted(ours, key)
            if a is not _ABSENT and a != b:
                diffs.append(f"{name}.{key}: {a} in the checkpoint, {b} now")
    return diffs


def check_resumable(checkpoint: dict, where: Path, sections: Sections, config, seed: int | None = None) -> None:
    """Everything a resume compares before the weights load: the base model and the trained sections."""
    base = checkpoint.get("base_model")
    if base and "seed" not in base:  # checkpoints written before the seed joined base_model kept it here
        base = dict(base, seed=(checkpoint.get("trained_sections") or {}).get("seed"))
    check_base_model(base, where, sections.model, config, seed)
    saved = checkpoint.get("trained_sections")
    diffs = section_differences(saved, sections, config.num_hidden_layers) if saved else []
    if diffs:
        raise ConfigError(
            f"{where} was trained with other settings, so this command cannot continue it:\n  - "
            + "\n  - ".join(diffs)
            + "\nUse the run's settings to continue it, or start a new run directory: hydra.run.dir=NEW_DIR "
            "(nothing in the run directory was changed)"
        )
