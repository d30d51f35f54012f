"""Hydra callback: after a multirun, one table of every trial's final metrics (sweep_summary.csv/.md); and the
sweep directory's multirun.yaml, which Hydra's sweeper writes with the command line in it, secrets masked as in
each trial's .hydra/ (lightning_moe.reporting.record) before the first trial starts."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from lightning_moe.reporting.redact import RedactingFilter, redact

log = logging.getLogger(__name__)

LAUNCHER_LOGGERS = ("hydra._internal.core_plugins.basic_launcher", "hydra_plugins.lightning_moe_optuna.sweeper")
COLUMNS = ["stop_reason", "global_step", "train_loss", "val_loss", "best_val_loss", "tokens_per_s", "elapsed_s"]


def collect(sweep_dir: Path) -> list[dict]:
    """One row per trial directory (those with a .hydra/ folder), in job order; a trial that died before
    writing summary.json still gets a row, with stop_reason 'no_summary'. `overrides` lists only what
    differs between trials (the swept parameters), not what every trial shares."""
    jobs = sorted((p for p in sweep_dir.iterdir() if (p / ".hydra").is_dir()), key=_job_order)
    per_job = [_overrides(job) for job in jobs]
    varying = {k for k in set().union(*per_job) if len({o.get(k) for o in per_job}) > 1} if per_job else set()
    rows = []
    for job, overrides in zip(jobs, per_job):
        summary_file = job / "summary.json"
        summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {"stop_reason": "no_summary"}
        swept = " ".join(f"{k}={v}" for k, v in overrides.items() if k in varying)
        row = {"job": job.name, "overrides": swept} | {c: summary.get(c) for c in COLUMNS}
        if summary.get("error"):
            row["error"] = summary["error"]
        rows.append(row)
    return rows


def _overrides(job: Path) -> dict[str, str]:
    file = job / ".hydra" / "overrides.yaml"
    items = yaml.safe_load(file.read_text()) if file.is_file() else []
    pairs = (o.split("=", 1) for o in items or [] if "=" in o and not o.startswith("hydra."))
    return {k: v for k, v in pairs}


def _job_order(p: Path):
    head = p.name.split("_", 1)[0]
    return (0, int(head), p.name) if head.isdigit() else (1, 0, p.name)


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v))


def markdown(rows: list[dict]) -> str:
    cols = ["job", "overrides", *COLUMNS]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def mask_multirun_yaml(sweep_dir: Path) -> None:
    """multirun.yaml with secrets masked (an override's token appears three times: its value, hydra.overrides
    and the job's override_dirname)."""
    path = sweep_dir / "multirun.yaml"
    if path.is_file():
        plain = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
        masked = redact(plain)
        if masked != plain:
            OmegaConf.save(OmegaConf.create(masked), path)


class SweepSummary(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        Path(config.hydra.sweep.dir).mkdir(parents=True, exist_ok=True)  # e.g. for the Optuna sqlite storage
        # the launcher logs each job's overrides ("#0 : ...") after configuring logging anew (handlers' filters are
        # gone by then), before the job masks its own logs: filter at the launchers' loggers themselves
        for name in LAUNCHER_LOGGERS:
            if not any(isinstance(f, RedactingFilter) for f in logging.getLogger(name).filters):
                logging.getLogger(name).addFilter(RedactingFilter())

    def on_job_start(self, config: DictConfig, **kwargs) -> None:
        # Hydra's BasicSweeper writes multirun.yaml after on_multirun_start, before the first job: mask it here
        sweep = OmegaConf.select(config, "hydra.sweep.dir")
        if sweep and OmegaConf.select(config, "hydra.mode") and str(config.hydra.mode).endswith("MULTIRUN"):
            mask_multirun_yaml(Path(sweep))

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        mask_multirun_yaml(sweep_dir)
        rows = collect(sweep_dir)
        cols = ["job", "overrides", *COLUMNS, "error"]
        with open(sweep_dir / "sweep_summary.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
        table = markdown(rows)
        (sweep_dir / "sweep_summary.md").write_text(table)
        log.info("Sweep of %d runs in %s (sweep_summary.csv, .md):\n%s", len(rows), sweep_dir, table)
