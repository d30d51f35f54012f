"""`run(cfg, sections, hf_config)`: one training run, after train.py's config and architecture checks.

lock the run directory -> compare a resumable checkpoint with the config (base model, trained shapes), or refuse
a run's record without checkpoints -> tokenizer and data (bad rows fail here) -> module -> Lightning objects from
config -> fit (resuming from the run directory) -> export -> summary.json. Nothing in the run directory changes
before the checks pass; config.yaml is written when the first step starts, an attempt that fails never replaces a
finished run's summary.json, and a finished run's command run again (a scheduler's retry) trains no step and
leaves the run byte-identical, unless its stop condition moved (a larger trainer.max_steps): then it continues.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback, EarlyStopping
from lightning.pytorch.callbacks.early_stopping import EarlyStoppingReason
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig

from lightning_moe.checkpointing.fingerprint import check_resumable
from lightning_moe.checkpointing.io import AtomicCheckpointIO, load_checkpoint_file, remove_leftover_temporaries
from lightning_moe.checkpointing.resume import find_resume_checkpoint, refuse_lost_checkpoints, set_aside_record
from lightning_moe.config.schema import Sections
from lightning_moe.data.datamodule import ChatDataModule
from lightning_moe.checkpointing.trained import export_trainable
from lightning_moe.models.compilation import persist_compile_caches
from lightning_moe.models.tokenizer import load_tokenizer
from lightning_moe.reporting.console import run_report
from lightning_moe.reporting.record import write_command_record
from lightning_moe.reporting.redact import redact
from lightning_moe.reporting.summary import FINISHED, build_summary, stop_reason, write_record
from lightning_moe.training.callbacks.sigterm import SigtermSync
from lightning_moe.training.lock import RunLock
from lightning_moe.training.module import MoELoRAModule

log = logging.getLogger(__name__)

def _quiet_logging() -> None:
    """`import lightning` adds a console handler to the 'lightning' logger and also propagates to the root
    logger that Hydra configured, so every line printed twice: keep Hydra's."""
    if logging.getLogger().hasHandlers():
        for handler in list(logging.getLogger("lightning").handlers):
            logging.getLogger("lightning").removeHandler(handler)


def in_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def instantiate_all(section: DictConfig | None) -> list:
    """A dict of named `_target_` configs -> objects; a null entry switches that one off."""
    return [instantiate(c) for c in (section or {}).values() if c is not None]


class _RecordConfig(Callback):
    """config.yaml and .hydra/ (secrets masked) are written when the first step of this attempt starts: an attempt
    that fails before (bad data, a model that does not build) or trains nothing (a finished run's command run
    again, stopped at once by its budget or early stopping) leaves a finished run's record as it was."""

    def __init__(self, cfg: DictConfig, run_dir: Path):
        self.cfg, self.run_dir, self.written = cfg, run_dir, False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.is_global_zero and not self.written:
            write_command_record(self.run_dir, self.cfg)
        self.written = True


class _StayStopped(Callback):
    """A run that early stopping ended stays ended when its command runs again: Lightning restores the early
    stopping state but not the decision, so it would train on until the next validation stopped it again.
    (callbacks.early_stopping=null continues it.)"""

    def on_train_start(self, trainer, pl_module) -> None:
        if any(c.stopping_reason != EarlyStoppingReason.NOT_STOPPED
               for c in trainer.callbacks if isinstance(c, EarlyStopping)):
            trainer.should_stop = True


def _finished_summary(run_dir: Path) -> dict | None:
    """summary.json when it records a finished run (not an error or a SIGTERM)."""
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) and summary.get("stop_reason") in FINISHED else None


def _already_finished(summary: dict, run_dir: Path) -> None:
    print(f"{run_dir} already finished (stop_reason={summary['stop_reason']} at step {summary.get('global_step')}) "
          "and this command trains no further step, so nothing of it changed. To train on, move its stopping "
          "point (a larger trainer.max_steps or trainer.max_time); to start over, resume=false or a new "
          "hydra.run.dir.", flush=True)


def _warn_if_validation_never_runs(cfg: DictConfig) -> None:
    """No validation means no best checkpoint and an early stopping that never fires: say so at the start."""
    tr = cfg.get("trainer") or {}
    interval, steps = tr.get("val_check_interval"), tr.get("max_steps", -1)
    if tr.get("limit_val_batches") == 0:
        log.info("validation is off (trainer.limit_val_batches=0)")
    elif isinstance(interval, int) and steps and steps > 0 and interval > steps * tr.get("accumulate_grad_batches", 1):
        log.warning("trainer.val_check_interval=%d micro-batches > the run's %d: validation never runs, so there is no "
                    "best checkpoint and early stopping does nothing", interval, steps * tr.get("accumulate_grad_batches", 1))


def run(cfg: DictConfig, sections: Sections, hf_config) -> dict:
    """Train; `sections` and `hf_config` come from validate_config and check_before_weights (train.py)."""
    started = time.monotonic()
    _quiet_logging()
    run_dir = Path(cfg.run_dir)
    with RunLock(run_dir):
        return _run_locked(cfg, sections, hf_config, run_dir, started)


def _run_locked(cfg: DictConfig, sections: Sections, hf_config, run_dir: Path, started: float) -> dict:
    pl.seed_everything(cfg.seed, workers=True)
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 leftovers (router, loss) on tensor cores
    resume, resumed_step, finished = None, None, None
    if cfg.get("resume", True):
        resume = find_resume_checkpoint(run_dir / "checkpoints")
        if resume is None:
            refuse_lost_checkpoints(run_dir)
    if resume:
        checkpoint = load_checkpoint_file(resume)
        check_resumable(checkpoint, resume, sections, hf_config, seed=cfg.seed)
        resumed_step, finished = checkpoint.get("global_step"), _finished_summary(run_dir)
        del checkpoint
        log.info("resuming from %s", resume)
    for folder in (run_dir, run_dir / "checkpoints"):
        for leftover in remove_leftover_temporaries(folder):
            log.info("removed %s, left behind by a killed run", leftover)
    tokenizer = load_tokenizer(sections.model, sections.data.chat_template)
    datamodule = ChatDataModule(sections.data, tokenizer, sections.domains, sections.moe.routing_level,
                                sections.moe.pooling)
    datamodule.setup("fit")  # bad rows fail here, before the model or the run's record is touched
    if not cfg.get("resume", True) and (old := set_aside_record(run_dir)):
        log.info("resume=false: starting over; the earlier run's files are in %s", old)
    _warn_if_validation_never_runs(cfg)
    module = MoELoRAModule(sections, hf_config, vocab_size=len(tokenizer), seed=cfg.seed)
    if sections.model.compile != "none":  # compiled code outlives the process: a resume or rerun starts warm
        persist_compile_caches(sections.model.compile_cache_dir or run_dir / "compile_cache")

    # SigtermSync is not a config choice: without it a SIGTERM can hang a DDP run (sigterm.py says how)
    callbacks = [*instantiate_all(cfg.get("callbacks")), _RecordConfig(cfg, run_dir), _StayStopped(),
                 SigtermSync()]
    loggers = instantiate_all(cfg.get("logger"))
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False,
                                      plugins=[AtomicCheckpointIO()])
    error: BaseException | None = None
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=str(resume) if resume else None, weights_only=True)
    except SIGTERMException:
        pass  # the on-exception checkpoint is written; stop_reason says sigterm and train.py exits 143
    except Exception as e:  # recorded in summary.json, then re-raised (or kept, inside a sweep)
        error = e

    if finished and error is None and not trainer.received_sigterm and trainer.global_step == resumed_step:
        if trainer.is_global_zero:
            _already_finished(finished, run_dir)
        return finished

    reason = stop_reason(trainer, module, error)
    extra = {"run_dir": str(run_dir), "resumed_from": str(resume) if resume else None}
    if error is not None:
        extra["error"] = f"{type(error).__name__}: {error}"
    if reason not in ("error", "sigterm") and module.model is not None and trainer.is_global_zero:
        extra["export"] = str(export_trainable(module, run_dir / "export"))
    summary = redact(build_summary(trainer, module, datamodule, reason, started, extra))
    if trainer.is_global_zero:
        try:
            path = write_record(run_dir, summary)
            log.info("stop_reason=%s global_step=%s -> %s", reason, summary["global_step"], path)
        except OSError as e:  # e.g. the disk that filled up mid-run: say so, and report the run's own error below
            log.error("could not write %s/summary.json: %s", run_dir, e)
        print(run_report(summary, run_dir), flush=True)
    if error is not None and not in_multirun():
        raise error
    if error is not None:
        log.error("trial failed (%s); the sweep goes on", summary["error"])
    return summary
