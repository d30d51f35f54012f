"""Loading a trained run for evaluation, generation and export: the one place that turns a run directory, its
export/ folder or one of its checkpoints into the tokenizer and the trained model (base + LoRA + MoE + trained
tensors), on CPU or GPU, in the run's dtype or another (`model.dtype=...`), or with a 4-bit base
(`model.load_in_4bit=true`).

Two steps, so that commands check their inputs between them: `plan_load` reads the run's config (composed under
the command's overrides), validates it, finds the checkpoint and compares what it was trained on (base model,
trained shapes) with the config, all before any weights exist; `load_trained` builds the model and loads the
tensors. A `model.init=random` run comes back with the same random base: the build is seeded by the run's seed,
and the device type the base was drawn on is recorded (CPU and CUDA generators differ), so loading it on another
device type is refused with a message that says so.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from lightning_moe.checkpointing.fingerprint import check_resumable
from lightning_moe.checkpointing.io import load_checkpoint_file
from lightning_moe.config import validate_config
from lightning_moe.config.routers import migrate_saved
from lightning_moe.config.schema import ConfigError, Sections
from lightning_moe.models.build import build_model
from lightning_moe.models.prechecks import check_before_weights
from lightning_moe.models.tokenizer import load_tokenizer
from lightning_moe.moe.layer import MoEBlock, RoutingContext

log = logging.getLogger(__name__)
RUN_KEYS = ("model", "data", "lora", "moe", "optim", "trainer", "domains")  # what overrides may change (not seed:
# it rebuilds a random base)


@dataclass
class LoadPlan:
    """Everything known before the weights: the run, its config and sections, the checkpoint and its record."""

    run_dir: Path
    cfg: DictConfig
    sections: Sections
    hf_config: object
    checkpoint: Path | None  # None: the run's export/trainable.safetensors
    state: dict = field(repr=False)  # the trained tensors, names as in the LightningModule ("model." prefix)
    record: dict = field(default_factory=dict)  # the checkpoint's trained_sections (seed, init device, ...)
    global_step: int | None = None


@dataclass
class TrainedRun:
    plan: LoadPlan
    tokenizer: object
    model: torch.nn.Module
    blocks: list[MoEBlock]
    routing: RoutingContext
    device: torch.device


def apply_overrides(cfg: DictConfig, overrides: list[str]) -> DictConfig:
    """The run's config with `key=value` overrides (Hydra's grammar) on the run's own sections applied."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    for o in OverridesParser.create().parse_overrides(list(overrides)):
        key = o.key_or_group.lstrip("+~")
        if key.split(".")[0] in RUN_KEYS:
            OmegaConf.update(cfg, key, o.value(), force_add=True)
    return cfg


def read_checkpoint(path: Path) -> dict:
    """A checkpoint file, or a ConfigError naming it: a truncated file, a foreign pickle (never run: weights_only)
    or something that is no checkpoint at all (checkpoint=/etc/passwd) is said in one line, not a traceback."""
    try:
        saved = load_checkpoint_file(path)
    except Exception as e:  # torch raises RuntimeError, UnpicklingError, IndexError, ... depending on the damage
        reason = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        raise ConfigError(f"checkpoint: {path} cannot be read as a checkpoint ({type(e).__name__}: {reason}); it is "
                          "damaged (cut short by a kill or a full disk) or not one of train.py's: choose another "
                          "with checkpoint=best|<step>|PATH, or use the run's export/ folder (run=RUN/export)") from None
    if not isinstance(saved, dict) or not isinstance(saved.get("state_dict"), dict):
        raise ConfigError(f"checkpoint: {path} is not a checkpoint of train.py (no state_dict in it); choose "
                          "another with checkpoint=best|<step>|PATH")
    return saved


def _checkpoint_path(run_dir: Path, checkpoint) -> Path:
    ckpts = run_dir / "checkpoints"
    name = str(checkpoint)
    if name in ("last", "best"):
        found = sorted(ckpts.glob("last.ckpt" if name == "last" else "best-*.ckpt"), key=lambda p: p.stat().st_mtime)
        if not found:
            have = ", ".join(sorted(p.name for p in ckpts.glob("*.ckpt"))) or "none"
            raise ConfigError(f"checkpoint: {run_dir} has no {name} checkpoint in checkpoints/ (found: {have}); "
                              "train first, or choose checkpoint=last|best|<step>")
        return found[-1]
    if name.isdigit():
        for path in sorted(ckpts.glob("*.ckpt")):
            try:
                if read_checkpoint(path).get("global_step") == int(name):
                    return path
            except ConfigError as e:  # another damaged file does not hide the step asked for
                log.warning("%s", e)
        raise ConfigError(f"checkpoint: no checkpoint of step {name} in {ckpts} "
                          f"(have: {', '.join(sorted(p.name for p in ckpts.glob('*.ckpt'))) or 'none'})")
    path = Path(name)
    if not path.is_file():
        raise ConfigError(f"checkpoint: '{name}' is not last, best, a step number or a checkpoint file")
    return path


def plan_load(source: str | Path, checkpoint="last", overrides: list[str] = (), device: str | None = None) -> LoadPlan:
    """Find and check what `source` (a run directory, its export/ folder, or a .ckpt file) holds, before weights."""
    source = Path(source)
    use_export = (source / "export_config.json").is_file()
    if source.is_file():
        run_dir, ckpt = source.resolve().parent.parent, source
    else:
        run_dir, ckpt = (source.resolve().parent if use_export else source), None
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"run: {source} is not a training run (no config.yaml in {run_dir}); give the run "
                          "directory that train.py wrote (hydra.run.dir), its export/ folder or a .ckpt in it")
    saved_cfg = OmegaConf.load(run_dir / "config.yaml")
    migrate_saved(saved_cfg)  # a run trained before the per-router sections (moe.deepseek.*, ...) loads as it was
    cfg = apply_overrides(saved_cfg, list(overrides))
    sections = validate_config(cfg)
    hf_config = check_before_weights(cfg, sections, training=False)
    if use_export:
        from safetensors.torch import load_file

        export = json.loads((source / "export_config.json").read_text())
        try:
            state = {f"model.{k}": v for k, v in load_file(str(source / "trainable.safetensors")).items()}
        except Exception as e:  # a truncated or foreign file: name it, as for checkpoints
            raise ConfigError(f"run: {source / 'trainable.safetensors'} cannot be read ({type(e).__name__}: "
                              f"{str(e)[:120]}); use the run directory's checkpoints (run={run_dir})") from None
        saved = {"base_model": {"fingerprint": export["base_fingerprint"], "name_or_path": export["model"]["name_or_path"],
                                "arch": export["model"]["arch"]},
                 "trained_sections": export.get("trained_sections")}
        where, step = source, export.get("global_step")
    else:
        ckpt = ckpt or _checkpoint_path(run_dir, checkpoint)
        saved = read_checkpoint(ckpt)
        state, where, step = saved["state_dict"], ckpt, saved.get("global_step")
    check_resumable(saved, where, sections, hf_config)  # the same base model and trained shapes as the config
    record = saved.get("trained_sections") or {}
    _check_random_base(sections, record, device)
    return LoadPlan(run_dir, cfg, sections, hf_config, None if use_export else ckpt, state, record, step)


def pick_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _check_random_base(sections: Sections, record: dict, device: str | None) -> None:
    if sections.model.init != "random" or not record.get("init_device"):
        return
    wanted = pick_device(device).type
    if record["init_device"] != wanted:
        raise ConfigError(
            f"device: this run's base is random (model.init=random), drawn on {record['init_device']}; the same "
            f"random weights come back only on {record['init_device']} (the CPU's and CUDA's generators differ), "
            f"not on {wanted}: use device={record['init_device']}")


def plan_tokenizer(plan: LoadPlan):
    """The run's tokenizer and chat template (no weights): commands check prompts with it before loading."""
    return load_tokenizer(plan.sections.model, plan.sections.data.chat_template)


def load_trained(plan: LoadPlan, device: str | None = None, tokenizer=None) -> TrainedRun:
    """Build the model for inference (eval mode, KV cache on) and load the trained tensors into it."""
    dev = pick_device(device)
    s = plan.sections
    tokenizer = tokenizer or plan_tokenizer(plan)
    routing = RoutingContext()
    seed = plan.record.get("seed", plan.cfg.get("seed", 0))
    model, blocks = build_model(s.model, s.lora, s.moe, plan.hf_config, routing, len(tokenizer), dev, seed=seed,
                                training=False)
    tensors = {k.removeprefix("model."): v for k, v in plan.state.items()}
    own = dict(model.named_parameters()) | dict(model.named_buffers())
    unknown = [k for k in tensors if k not in own]
    missing = [n for n, p in model.named_parameters() if p.requires_grad and n not in tensors]
    if unknown or missing:
        raise ConfigError(f"checkpoint: {plan.checkpoint or plan.run_dir / 'export'} does not fit the model this "
                          f"config builds ({len(unknown)} unknown tensors, first {unknown[:1]}; {len(missing)} "
                          f"missing, first {missing[:1]})")
    with torch.no_grad():
        for name, value in tensors.items():
            own[name].copy_(value.to(own[name].device, own[name].dtype))
    model.requires_grad_(False)
    return TrainedRun(plan, tokenizer, model.eval(), blocks, routing, dev)
