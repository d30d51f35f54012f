"""Loggers: Lightning's, extended where a resumed run or an offline machine needs more."""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from lightning_moe.reporting.redact import redact, redact_text
from lightning_moe.upstream import keep_csv_history

_AppendingWriter = keep_csv_history(ExperimentWriter)  # Lightning's writer deletes an existing metrics.csv


class AppendingCSVLogger(CSVLogger):
    """Lightning's CSVLogger, except that a resumed run appends to <save_dir>/<name>/metrics.csv instead of
    wiping the interrupted run's history. (After a hard kill, steps between the last checkpoint and the kill
    appear twice; the later rows are the resumed run's.)"""

    @property
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


def wandb_logger(save_dir: str, project: str = "lightning-moe", name: str | None = None, **kwargs):
    """WandbLogger that never waits for a login: offline unless WANDB_API_KEY is set (or WANDB_MODE says
    otherwise), and with a run id derived from the run directory, so a resumed run continues the same
    wandb run. Sync an offline run later with `wandb sync <save_dir>/wandb/offline-run-*`."""
    from lightning.pytorch.loggers import WandbLogger

    mode = os.environ.get("WANDB_MODE")
    offline = kwargs.pop("offline", None)
    if offline is None:
        offline = mode in ("offline", "dryrun") or (mode is None and not os.environ.get("WANDB_API_KEY"))
    run_dir = Path(save_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    run_id = kwargs.pop("id", None) or hashlib.sha1(str(run_dir).encode()).hexdigest()[:12]
    # the wandb run records these (name, notes, tags, group, config...) and `wandb sync` uploads them: Hydra resolved
    # any ${oc.env:...} in them, so mask secrets as config.yaml does
    kwargs = redact(kwargs)
    logger = WandbLogger(save_dir=str(run_dir), project=project, name=redact_text(name or run_dir.name), id=run_id,
                         resume="allow", offline=offline, **kwargs)
    # wandb records the command line (sys.argv) in the run it uploads: start the run with the secrets masked in it
    argv = sys.argv
    sys.argv = [redact_text(a) for a in argv]
    try:
        _ = logger.experiment  # rank 0 starts the wandb run here; other ranks get Lightning's dummy
    finally:
        sys.argv = argv
    return logger
