"""`run(cfg)`: validate -> find the model -> data -> module -> Lightning objects from config -> fit -> summary.

The order puts every cheap check before anything large: config schema, then the model's architecture
(a missing download fails here in seconds), then data (bad rows fail in DataModule.setup, which Lightning
calls before configure_model loads the weights).
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

from lightning_moe.config import resolve_moe_layers, validate_config
from lightning_moe.data.datamodule import ChatDataModule
from lightning_moe.modeling import load_tokenizer, resolve_model_config
from lightning_moe.module import MoELoRAModule
from lightning_moe.summary import build_summary, stop_reason, write_summary

log = logging.getLogger(__name__)


# Third-party deprecation notices a user of this repository cannot act on.
_NOISE = (".*set_vital.*", ".*LeafSpec.*", ".*is_gradient_checkpointing.*", ".*litlogger.*")


def _quiet_logging() -> None:
    """`import lightning` adds a console handler to the 'lightning' logger and also propagates to the root
    logger that Hydra configured, so every line printed twice: keep Hydra's."""
    if logging.getLogger().hasHandlers():
        for handler in list(logging.getLogger("lightning").handlers):
            logging.getLogger("lightning").removeHandler(handler)
    for pattern in _NOISE:
        warnings.filterwarnings("ignore", message=pattern)


def _in_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _instantiate_all(section: DictConfig | None) -> list:
    """A dict of named `_target_` configs -> objects; a null entry switches that one off."""
    return [instantiate(c) for c in (section or {}).values() if c is not None]


def _resume_path(run_dir: Path) -> str | None:
    """'last' when the run directory has a checkpoint to continue from, for Lightning to pick the newest."""
    ckpts = run_dir / "checkpoints"
    return "last" if ckpts.is_dir() and any(ckpts.glob("*.ckpt")) else None


def run(cfg: DictConfig) -> dict:
    started = time.monotonic()
    _quiet_logging()
    sections = validate_config(cfg)
    run_dir = Path(cfg.run_dir)
    pl.seed_everything(cfg.seed, workers=True)
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 leftovers (router, loss) on tensor cores

    model_config = resolve_model_config(sections.model)
    if sections.moe.enabled:
        resolve_moe_layers(sections.moe, model_config.num_hidden_layers)
    tokenizer = load_tokenizer(sections.model, sections.data.chat_template)
    datamodule = ChatDataModule(sections.data, tokenizer, sections.domains)
    module = MoELoRAModule(sections, model_config, vocab_size=len(tokenizer))

    callbacks = _instantiate_all(cfg.get("callbacks"))
    loggers = _instantiate_all(cfg.get("logger"))
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    if trainer.is_global_zero:
        run_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)

    resume = _resume_path(run_dir) if cfg.get("resume", True) else None
    if resume:
        log.info("resuming from the newest checkpoint in %s", run_dir / "checkpoints")
    error: BaseException | None = None
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume)
    except SIGTERMException:
        pass  # the on-exception checkpoint is written; stop_reason says sigterm and train.py exits 143
    except Exception as e:  # recorded in summary.json, then re-raised (or kept, inside a sweep)
        error = e

    reason = stop_reason(trainer, error)
    extra = {"run_dir": str(run_dir), "resumed": resume is not None}
    if error is not None:
        extra["error"] = f"{type(error).__name__}: {error}"
    summary = build_summary(trainer, module, datamodule, reason, started, extra)
    if trainer.is_global_zero:
        path = write_summary(run_dir, summary)
        log.info("stop_reason=%s global_step=%s -> %s", reason, summary["global_step"], path)
    if error is not None and not _in_multirun():
        raise error
    if error is not None:
        log.error("trial failed (%s); the sweep goes on", summary["error"])
    return summary
