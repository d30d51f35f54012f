"""`run(cfg)`: validate -> find the model -> check what needs its shape -> data -> module -> Lightning objects
from config -> fit (resuming from the run directory) -> export -> summary.

Every cheap check comes before anything large: the config schema (before torch is imported, in train.py),
then the model's architecture (a missing download fails here in seconds), then what needs the model's
module names or the device (LoRA targets on a weightless meta-device copy, bf16 support), then the resume
checkpoint's base model, then data (bad rows fail in DataModule.setup, which Lightning calls before
configure_model loads the weights).
"""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from lightning_moe.config import validate_config
from lightning_moe.data.datamodule import ChatDataModule
from lightning_moe.export import export_trainable
from lightning_moe.modeling import load_tokenizer
from lightning_moe.prechecks import check_before_weights
from lightning_moe.module import MoELoRAModule
from lightning_moe.redact import redact
from lightning_moe.resume import AtomicCheckpointIO, check_base_model, find_resume_checkpoint
from lightning_moe.summary import build_summary, stop_reason, write_summary

log = logging.getLogger(__name__)

# Third-party deprecation notices a user of this repository cannot act on.
_NOISE = (".*set_vital.*", ".*LeafSpec.*", ".*is_gradient_checkpointing.*", ".*gradient_checkpointing_enable.*")


def _quiet_logging() -> None:
    """`import lightning` adds a console handler to the 'lightning' logger and also propagates to the root
    logger that Hydra configured, so every line printed twice: keep Hydra's."""
    if logging.getLogger().hasHandlers():
        for handler in list(logging.getLogger("lightning").handlers):
            logging.getLogger("lightning").removeHandler(handler)
    for pattern in _NOISE:
        warnings.filterwarnings("ignore", message=pattern)


def in_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _instantiate_all(section: DictConfig | None) -> list:
    """A dict of named `_target_` configs -> objects; a null entry switches that one off."""
    return [instantiate(c) for c in (section or {}).values() if c is not None]


def run(cfg: DictConfig, model_config=None) -> dict:
    """Train; `model_config` is the architecture config if train.py's pre-checks already resolved it."""
    started = time.monotonic()
    _quiet_logging()
    sections = validate_config(cfg)
    run_dir = Path(cfg.run_dir)
    pl.seed_everything(cfg.seed, workers=True)
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 leftovers (router, loss) on tensor cores

    model_config = model_config or check_before_weights(cfg, sections)
    resume = find_resume_checkpoint(run_dir / "checkpoints") if cfg.get("resume", True) else None
    if resume:
        check_base_model(resume, sections.model, model_config)
        log.info("resuming from %s", resume)
    tokenizer = load_tokenizer(sections.model, sections.data.chat_template)
    datamodule = ChatDataModule(sections.data, tokenizer, sections.domains)
    module = MoELoRAModule(sections, model_config, vocab_size=len(tokenizer))

    callbacks = _instantiate_all(cfg.get("callbacks"))
    loggers = _instantiate_all(cfg.get("logger"))
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False,
                                      plugins=[AtomicCheckpointIO()])
    if trainer.is_global_zero:
        run_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(OmegaConf.create(redact(OmegaConf.to_container(cfg, resolve=True))), run_dir / "config.yaml")

    error: BaseException | None = None
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=str(resume) if resume else None, weights_only=True)
    except SIGTERMException:
        pass  # the on-exception checkpoint is written; stop_reason says sigterm and train.py exits 143
    except Exception as e:  # recorded in summary.json, then re-raised (or kept, inside a sweep)
        error = e

    reason = stop_reason(trainer, module, error)
    extra = {"run_dir": str(run_dir), "resumed_from": str(resume) if resume else None}
    if error is not None:
        extra["error"] = f"{type(error).__name__}: {error}"
    if reason not in ("error", "sigterm") and module.model is not None and trainer.is_global_zero:
        extra["export"] = str(export_trainable(module, run_dir / "export"))
    summary = redact(build_summary(trainer, module, datamodule, reason, started, extra))
    if trainer.is_global_zero:
        path = write_summary(run_dir, summary)
        log.info("stop_reason=%s global_step=%s -> %s", reason, summary["global_step"], path)
    if error is not None and not in_multirun():
        raise error
    if error is not None:
        log.error("trial failed (%s); the sweep goes on", summary["error"])
    return summary
