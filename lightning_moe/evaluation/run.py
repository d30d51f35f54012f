"""evaluate.py's work: one run, or several side by side.

For each run: plan the load (config, checkpoint, base model: before weights), the evaluation set (the run's own
validation split, or `files`), the probes, then one `Trainer.validate` over all of them; eval.json, eval.md and
the routing heatmap go to the run's own evaluation folder, never over anything the training wrote. Several runs
(a list, or a sweep directory) give one comparison table of the same figures.
"""

from __future__ import annotations

import gc
import logging
import math
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import CSVLogger
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch.utils.data import DataLoader

from lightning_moe.checkpointing.load import LoadPlan, load_trained, plan_load, plan_tokenizer
from lightning_moe.checkpointing.outputs import check_output
from lightning_moe.config.schema import ConfigError
from lightning_moe.data.chat import ChatRenderer
from lightning_moe.data.datamodule import ChatDataModule
from lightning_moe.evaluation import probes as probe_sets
from lightning_moe.evaluation.evaluator import EvalModule
from lightning_moe.evaluation.report import compare_table, markdown
from lightning_moe.reporting.console import progress_bar
from lightning_moe.reporting.heatmap import heatmap
from lightning_moe.reporting.redact import redact
from lightning_moe.reporting.summary import write_json_atomic

log = logging.getLogger(__name__)


def runs_of(run) -> list[Path]:
    """run=DIR, run=[A,B], or a sweep directory (its trial folders, in order)."""
    paths = [Path(p) for p in (run if isinstance(run, (list, ListConfig)) else [run])]
    out = []
    for p in paths:
        if not (p / "config.yaml").is_file() and not (p / "export_config.json").is_file() and p.is_dir():
            trials = sorted((t for t in p.iterdir() if (t / "config.yaml").is_file()), key=lambda t: t.name)
            if not trials:
                raise ConfigError(f"run: {p} is neither a training run (no config.yaml) nor a sweep of runs")
            out += trials
        else:
            out.append(p)
    return out


def _stats(rows: list[dict], key: str) -> dict:
    tokens = sum(r["tokens"] for r in rows)
    loss = sum(r[key] for r in rows) / tokens if tokens else float("nan")
    return {"loss": loss, "perplexity": math.exp(loss) if tokens and loss < 50 else None}


def _losses(rows: list[dict], domains: list[str], base: bool) -> dict:
    def block(subset):
        out = {"conversations": len(subset), "tokens": int(sum(r["tokens"] for r in subset)),
               "trained": _stats(subset, "trained")}
        if base:
            out["base"] = _stats(subset, "base")
            out["gain"] = out["base"]["loss"] - out["trained"]["loss"]  # > 0: training lowered the loss
        return out

    names = {i: d for i, d in enumerate(domains)} | {-1: "unlabelled"}
    per_domain = {}
    for i, name in names.items():
        subset = [r for r in rows if r["domain"] == i]
        if subset:
            per_domain[name] = block(subset)
    return {"overall": block(rows), "per_domain": per_domain}


def evaluate_one(plan: LoadPlan, source: Path, cfg: DictConfig, out: Path) -> dict:
    s = plan.sections
    tokenizer = plan_tokenizer(plan)
    groups = {}
    if cfg.probes.crows_pairs:
        groups["crows_pairs"] = probe_sets.crows_pairs(cfg.probes.crows_pairs, cfg.probes.limit)
    if cfg.probes.stereoset:
        groups["stereoset"] = probe_sets.stereoset(cfg.probes.stereoset, cfg.probes.limit)
    dm = ChatDataModule(s.data, tokenizer, s.domains, s.moe.routing_level, s.moe.pooling)
    loaders = [dm.evaluation_dataloader(list(cfg.files) or None, cfg.batch_size)]  # bad rows fail here
    renderer = ChatRenderer(tokenizer, s.data.max_length, "truncate")
    for kind, sets in groups.items():
        features = [renderer(m) | {"domain_id": -1} for m in probe_sets.conversations(sets)]
        loaders.append(DataLoader(features, batch_size=cfg.batch_size or s.data.batch_size, collate_fn=dm.collator))

    run = load_trained(plan, cfg.device, tokenizer)
    module = EvalModule(run, cfg.base, s.moe.top_k)
    trainer_cfg = plan.cfg.get("trainer") or {}
    accelerator = "gpu" if run.device.type == "cuda" else "cpu"
    trainer = pl.Trainer(accelerator=accelerator, devices=1, precision=trainer_cfg.get("precision", "32-true"),
                         logger=CSVLogger(str(out), name="logs", version=""), enable_checkpointing=False,
                         enable_model_summary=False, callbacks=[progress_bar("evaluating")])
    t0 = time.monotonic()
    trainer.validate(module, dataloaders=loaders, verbose=False)
    seconds = time.monotonic() - t0

    result = {
        "run": str(plan.run_dir), "checkpoint": str(plan.checkpoint or Path(source) / "trainable.safetensors"),
        "global_step": plan.global_step, "trained_params": sum(v.numel() for v in plan.state.values()),
        "settings": redact(OmegaConf.to_container(plan.cfg, resolve=True)),  # compare tables show what differs
        "data": {"source": list(cfg.files) or "the run's validation split", **dm.stats.get("val", {})},
        **_losses(module.rows[0], s.domains, cfg.base),
        "seconds": round(seconds, 2),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if run.device.type == "cuda" else None,
    }
    if module.tally is not None and module.tally.counts:
        result["routing"] = {"router": s.moe.router, "routing_level": s.moe.routing_level,
                             **module.tally.report(module.tally.per_layer())}
    for i, (kind, sets) in enumerate(groups.items(), 1):
        rows = module.rows[i]
        result.setdefault("probes", {})[kind] = {
            "trained": probe_sets.score(kind, sets, [-r["trained"] for r in rows]),
            **({"base": probe_sets.score(kind, sets, [-r["base"] for r in rows])} if cfg.base else {})}
    _write(result, out)
    del module, run, trainer
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


def _write(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "eval.json", result)
    (out / "eval.md").write_text(markdown(result))
    matrix = result.get("routing", {}).get("domain_expert_matrix")
    if matrix:
        heatmap(matrix, out / "domain_expert_matrix.png", f"domain x expert routing, step {result['global_step']}")


def evaluate(cfg: DictConfig, overrides: list[str]) -> Path:
    """Every run is planned (config, checkpoint, base model) and the output checked before anything is written or
    any weights load: a damaged checkpoint in the third run of a list leaves no half comparison behind."""
    runs = runs_of(cfg.run)
    plans = [plan_load(source, cfg.checkpoint, overrides, cfg.device) for source in runs]
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    # the run's own eval/ (also for run=R/export or a .ckpt), the one place in a run that evaluate.py writes
    default = plans[0].run_dir / "eval" / stamp if len(runs) == 1 else Path("runs") / "eval" / stamp
    out = check_output(cfg.out or default, folder=True, inputs=[*cfg.files])
    if len(runs) == 1:
        result = evaluate_one(plans[0], runs[0], cfg, out)
        print(markdown(result))
        print(f"evaluation -> {out}")
        return out
    results = []
    for i, (source, plan) in enumerate(zip(runs, plans)):
        log.info("evaluating %s (%d of %d)", source, i + 1, len(runs))
        results.append(evaluate_one(plan, source, cfg, out / f"{i:02d}_{source.name}"))
        plans[i] = None  # its trained tensors are not needed any more
    table = compare_table(results)
    write_json_atomic(out / "compare.json", {"runs": results})
    (out / "compare.md").write_text(table)
    print(table)
    print(f"evaluation of {len(runs)} runs -> {out}")
    return out
