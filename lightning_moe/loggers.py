"""Logger factories for the cases Lightning's constructors leave to the user."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


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
    return WandbLogger(
        save_dir=str(run_dir),
        project=project,
        name=name or run_dir.name,
        id=run_id,
        resume="allow",
        offline=offline,
        **kwargs,
    )
