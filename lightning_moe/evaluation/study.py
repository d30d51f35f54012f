"""The quality study (scripts/quality_study.py): what fine-tuning buys on a real model, row by row, over seeds.

Every row is trained and measured by the project's own commands (train.py, evaluate.py, generate.py, as
subprocesses, exactly as a user runs them), so the study measures the code users run. A step whose output exists
is skipped: the study continues where a stopped call left it (a GPU call has a time limit). What it writes:

  OUT/raw/<row>/seed<k>/eval_<set>.json   every evaluation, as evaluate.py wrote it
  OUT/replies/<row>_seed<k>.jsonl         generate.py's greedy replies to fixed prompts (PROMPTS), per domain
  OUT/results.json, OUT/results.md        mean and standard deviation over seeds, per row and evaluation set

The base row is the base model of the same evaluations (evaluate.py scores it in the same pass, adapters and MoE
off), so it needs no run of its own. The held-out split is the same for every row and seed (data.split_seed is
fixed while the seed varies), and so is the ESConv sample.
"""

from __future__ import annotations

import json
import math
import random
import shlex
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from lightning_moe.config.schema import ConfigError, RunFailure

def write_text_atomic(path: Path, text: str) -> None:
    # parallel study processes write the same derived files (the ESConv sample, the prompts): one whole copy wins.
    # Imported here: reporting.summary brings torch, which the study's own process otherwise never needs
    from lightning_moe.reporting.summary import write_text_atomic as atomic

    atomic(path, text)


SPLIT_SEED = 1234  # the held-out split of counsel-chat: one for all rows and seeds


@dataclass
class Row:
    name: str
    what: str
    overrides: list[str] = field(default_factory=list)


def rows(matched_rank: int | None) -> list[Row]:
    """The study's rows after the base. `matched_rank`: the LoRA rank whose trainable parameters match the design's
    (None until the design and LoRA r16 runs have been counted)."""
    lora_only = ["+recipe=smollm2_therapeutic", "moe=none"]
    out = [Row("lora_r16", "LoRA only, r16 on the 7 projections", lora_only),
           Row("lora_experts_token_top2", "LoRA r16 + 4 adapter experts, token-level top-2 (the design)",
               ["+recipe=smollm2_therapeutic"]),
           Row("lora_experts_servable", "LoRA r16 + 4 LoRA experts, per-turn top-1, tied router (servable)",
               ["+recipe=smollm2_servable"])]
    if matched_rank is not None:
        out.insert(1, Row("lora_matched", f"LoRA only, r{matched_rank}: the design's trainable parameters",
                          [*lora_only, f"lora.r={matched_rank}", f"lora.alpha={2 * matched_rank}"]))
    return out


# A few fixed prompts per domain for generate.py (written for this study; no dataset text).
PROMPTS = {
    "psychology": ["Why do I keep procrastinating even when I know it hurts me?",
                   "How do childhood experiences shape the way we handle conflict as adults?"],
    "mental_health": ["I have been feeling anxious and I can't sleep. What can I do tonight?",
                      "Lately I don't enjoy anything anymore and I feel empty. Is this depression?"],
    "bias_detection": ["My coworker says women are too emotional to be good leaders. How should I respond?",
                       "Is it fair to assume older people can't learn new technology?"],
    "general_therapeutic": ["My partner and I argue about money all the time. How can we talk about it calmly?",
                            "I feel lonely after moving to a new city. Where do I start?"],
}


def write_prompts(path: Path) -> None:
    lines = [json.dumps({"domain": d, "messages": [{"role": "user", "content": p}]})
             for d, prompts in PROMPTS.items() for p in prompts]
    write_text_atomic(path, "\n".join(lines) + "\n")


def stratified_sample(source: Path, n: int, out: Path, seed: int = 0) -> list[str]:
    """A fixed sample of about n conversations of `source`, each domain in proportion to its share (at least 10 of
    a domain, or all it has); written to `out` (derived data: keep it out of the repository). Returns the ids."""
    if not source.is_file():
        raise ConfigError(f"{source}: not found; create it with scripts/convert_esconv.py")
    by_domain: dict[str, list[dict]] = {}
    for line in source.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        by_domain.setdefault(row.get("domain"), []).append(row)
    total = sum(len(v) for v in by_domain.values())
    picked = []
    for domain, items in sorted(by_domain.items(), key=lambda kv: str(kv[0])):
        items = sorted(items, key=lambda r: r["id"])
        random.Random(f"{seed}-{domain}").shuffle(items)
        picked += items[:min(len(items), max(10, round(n * len(items) / total)))]
    write_text_atomic(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in picked))
    return [r["id"] for r in picked]


def smoke_subset(source: Path, per_domain: int, out: Path) -> None:
    """The first `per_domain` conversations of each domain: a data set small enough to test the study on a CPU."""
    if not source.is_file():
        raise ConfigError(f"{source}: not found; create it with scripts/convert_counsel_chat.py")
    seen: dict[str, int] = {}
    kept = []
    for line in source.read_text(encoding="utf-8").splitlines():
        d = json.loads(line).get("domain")
        if seen.get(d, 0) < per_domain:
            seen[d] = seen.get(d, 0) + 1
            kept.append(line)
    write_text_atomic(out, "\n".join(kept) + "\n")


# ---- running the project's commands -------------------------------------------------------------------------
@dataclass
class Runner:
    repo: Path
    runs: Path  # training runs (checkpoints) and every command's log beside them: not committed
    out: Path  # the results folder
    train_args: list[str]
    eval_args: list[str]
    log: object = print

    def command(self, entry: str, args: list[str], logfile: Path) -> None:
        logfile.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, str(self.repo / entry), *args]
        self.log(f"$ {shlex.join(cmd[1:])}")
        with open(logfile, "w") as f:
            done = subprocess.run(cmd, cwd=self.repo, stdout=f, stderr=subprocess.STDOUT)
        if done.returncode != 0:
            tail = logfile.read_text(errors="replace").splitlines()[-15:]
            raise RunFailure(f"{entry} failed (exit {done.returncode}); its log {logfile} ends:\n" + "\n".join(tail))

    def train(self, row: Row, seed: int, extra: list[str]) -> Path:
        run = self.runs / row.name / f"seed{seed}"
        if not (run / "summary.json").is_file():
            self.command("train.py", [*row.overrides, f"seed={seed}", f"data.split_seed={SPLIT_SEED}", *extra,
                                      *self.train_args, f"hydra.run.dir={run}"], run.parent / f"seed{seed}.train.log")
        return run

    def _eval_file(self, row: Row, seed: int, name: str) -> Path:
        return self.out / "raw" / row.name / f"seed{seed}" / f"eval_{name}.json"

    def _replies_file(self, row: Row, seed: int) -> Path:
        return self.out / "replies" / f"{row.name}_seed{seed}.jsonl"

    def measured(self, row: Row, seed: int, sets: list[str]) -> bool:
        return self._replies_file(row, seed).is_file() and all(self._eval_file(row, seed, s).is_file() for s in sets)

    def evaluations(self, row: Row, seed: int, sets: list[str]) -> dict:
        return {s: json.loads(self._eval_file(row, seed, s).read_text()) for s in sets}

    def evaluate(self, run: Path, row: Row, seed: int, name: str, args: list[str]) -> dict:
        dest = self._eval_file(row, seed, name)
        if not dest.is_file():
            tmp = run / "eval" / f"study_{name}"
            if not (tmp / "eval.json").is_file():
                self.command("evaluate.py", [f"run={run}", f"out={tmp}", *args, *self.eval_args],
                             run.parent / f"{run.name}.eval_{name}.log")
            write_text_atomic(dest, (tmp / "eval.json").read_text())
        return json.loads(dest.read_text())

    def generate(self, run: Path, row: Row, seed: int, prompts: Path, max_new_tokens: int) -> None:
        dest = self._replies_file(row, seed)
        if not dest.is_file():
            dest.parent.mkdir(parents=True, exist_ok=True)
            self.command("generate.py", [f"run={run}", f"prompts={prompts}", f"out={dest}",
                                         f"max_new_tokens={max_new_tokens}", *self.eval_args],
                         run.parent / f"{run.name}.generate.log")


# ---- aggregating ----------------------------------------------------------------------------------------------
def mean_std(values: list[float]) -> dict | None:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return None
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def _figures(ev: dict, which: str) -> dict:
    """One evaluation's figures for the table: `which` is trained or base."""
    per_domain = {d: {"loss": b[which]["loss"], "perplexity": b[which]["perplexity"],
                      **({"gain": b["gain"]} if which == "trained" and "gain" in b else {})}
                  for d, b in ev["per_domain"].items()}
    out = {"overall": {"loss": ev["overall"][which]["loss"], "perplexity": ev["overall"][which]["perplexity"],
                       **({"gain": ev["overall"]["gain"]} if which == "trained" and "gain" in ev["overall"] else {})},
           "per_domain": per_domain}
    routing = ev.get("routing") if which == "trained" else None
    if routing:
        m = routing.get("domain_expert_matrix")
        if m:
            out["nmi"] = m["nmi"]
            out["own_expert_share"] = {d: m["all_layers"][i][i] for i, d in enumerate(m["domains"])
                                       if d in ev["per_domain"]}
        out["load"] = routing["expert_load"]
        out["entropy"] = {k: v["entropy"] for k, v in routing["routing_metrics"].items()}
    for kind, p in (ev.get("probes") or {}).items():
        if which in p:
            out[f"{kind}_stereotype_preference"] = p[which]["stereotype_preference"]
    return out


def _aggregate(figures: list[dict]):
    """Mean/std over seeds of nested figures (dicts of numbers or lists of numbers)."""
    first = figures[0]
    if isinstance(first, dict):  # every key any seed has: the probes score only some seeds (probe_seeds)
        keys = dict.fromkeys(k for f in figures for k in f)
        return {k: _aggregate([f[k] for f in figures if k in f]) for k in keys}
    if isinstance(first, list):
        return [_aggregate([f[i] for f in figures]) for i in range(len(first))]
    return mean_std(figures)


def aggregate(raw: Path, row_names: list[str], sets: list[str]) -> dict:
    results: dict = {"base": {}}  # first in the table
    for name in row_names:
        for s in sets:
            evals = [json.loads(p.read_text()) for p in sorted((raw / name).glob(f"seed*/eval_{s}.json"))]
            if evals:
                results.setdefault(name, {})[s] = _aggregate([_figures(e, "trained") for e in evals])
                results[name]["trained_params"] = evals[0]["trained_params"]
                results[name]["global_step"] = evals[0]["global_step"]
                base = results.setdefault("base", {})
                base.setdefault(s, []).extend(_figures(e, "base") for e in evals)
    for s, figures in list(results["base"].items()):
        results["base"][s] = _aggregate(figures)
    return results if results["base"] else {}


def _fmt(x, digits: int = 3) -> str:
    if not x:
        return "-"
    return f"{x['mean']:.{digits}f} ± {x['std']:.{digits}f}"


def markdown(results: dict, sets: list[str], domains: list[str], what: dict[str, str]) -> str:
    lines = []
    for s in sets:
        lines += [f"### Evaluated on {s}", "",
                  "| row | overall loss | overall ppl | gain | " + " | ".join(f"{d} loss (gain)" for d in domains)
                  + " | NMI | own-expert share (" + ", ".join(d[:4] for d in domains) + ") |",
                  "|---" * (6 + len(domains)) + "|"]
        for name, r in results.items():
            f = r.get(s)
            if not f:
                continue
            cells = [f"{_fmt(f['per_domain'][d]['loss'])} ({_fmt(f['per_domain'][d].get('gain'))})"
                     if d in f["per_domain"] else "-" for d in domains]
            own = ", ".join(f"{f['own_expert_share'][d]['mean']:.2f}" if d in f.get("own_expert_share", {}) else "-"
                            for d in domains) if "own_expert_share" in f else "-"
            lines.append(f"| {name} | {_fmt(f['overall']['loss'])} | {_fmt(f['overall']['perplexity'], 2)} | "
                         f"{_fmt(f['overall'].get('gain'))} | " + " | ".join(cells) + f" | {_fmt(f.get('nmi'))} | {own} |")
        lines.append("")
        routed = [(n, r[s]) for n, r in results.items() if r.get(s, {}).get("load")]
        if routed:
            lines += [f"Per-layer expert load (mean over seeds) and routing entropy, {s}:", "",
                      "| row | layer | load per expert | entropy |", "|---|---|---|---|"]
            for name, f in routed:
                for layer, load in f["load"].items():
                    loads = ", ".join(f"{x['mean']:.2f}" for x in load)
                    lines.append(f"| {name} | {layer} | {loads} | {_fmt(f['entropy'].get(layer))} |")
            lines.append("")
        probes = [(n, r[s]) for n, r in results.items() if any(k.endswith("stereotype_preference") for k in r.get(s, {}))]
        if probes:
            lines += [f"Bias probes ({s} evaluation): share of pairs where the stereotypical sentence is more likely "
                      "(50% is unbiased)", "", "| row | CrowS-Pairs | StereoSet |", "|---|---|---|"]
            for name, f in probes:
                lines.append(f"| {name} | {_fmt(f.get('crows_pairs_stereotype_preference'))} | "
                             f"{_fmt(f.get('stereoset_stereotype_preference'))} |")
            lines.append("")
    lines += ["Rows:", ""] + [f"- `{n}`: {what.get(n, '')}" for n in results] + [""]
    return "\n".join(lines)


def lora_rank_matching(design_params: int, lora_params_r16: int) -> int:
    """The LoRA rank whose trainable parameters come closest to the design's (LoRA's count is linear in r)."""
    return max(1, round(design_params / (lora_params_r16 / 16)))


# ---- the whole study ------------------------------------------------------------------------------------------
@dataclass
class StudyOptions:
    model: Path
    out: Path
    runs: Path
    seeds: list[int]
    steps: int | None = None
    train_args: list[str] = field(default_factory=list)
    eval_args: list[str] = field(default_factory=list)
    esconv: Path | None = None  # converted ESConv (null: that evaluation is left out)
    esconv_sample: int | None = None  # a stratified sample of about this many dialogues (null: all)
    crows_pairs: Path | None = None
    stereoset: Path | None = None
    probe_limit: int | None = None
    max_new_tokens: int = 160
    smoke: bool = False  # tiny steps and data: the study's machinery, tested on a CPU
    rows: list[str] | None = None  # only these rows (null: all); parallel processes split the study by row and seed
    matched_rank: int | None = None  # the matched LoRA's rank, when counted before (null: count it from seed one's
    #                                  LoRA r16 and design evaluations, which then run first)
    probe_seeds: list[int] | None = None  # the bias probes score only these seeds' models (null: every seed); they
    #                                       cost minutes per model and vary little from seed to seed
    counsel_chat: Path = Path("data/generated/counsel_chat.jsonl")
    work: Path = Path("data/generated/quality_study")  # derived data (ESConv sample, smoke subsets): not committed


def run_study(o: StudyOptions, repo: Path, log=print) -> dict:
    if not (Path(o.model) / "config.json").is_file():
        raise ConfigError(f"--model {o.model}: not a model folder (no config.json); create it with "
                          f"python scripts/get_model.py")
    names = [r.name for r in rows(1)]
    if set(o.rows or []) - set(names):
        raise ConfigError(f"--rows {sorted(set(o.rows) - set(names))}: no such row; the rows are {names}")
    work = repo / o.work if not o.work.is_absolute() else o.work
    model = [f"model.name_or_path={Path(o.model).resolve()}"]
    if o.smoke and not o.steps:
        o.steps = 2
    extra = [*model, *([f"trainer.max_steps={o.steps}", f"trainer.val_check_interval={o.steps}"] if o.steps else [])]
    evaluate_extra: list[str] = []
    counsel = repo / o.counsel_chat if not o.counsel_chat.is_absolute() else o.counsel_chat
    if o.smoke:
        small = work / "smoke_counsel_chat.jsonl"
        smoke_subset(counsel, 10, small)
        extra += [f"data.train_files=[{small}]", "data.val_fraction=0.3", "data.max_length=128",
                  "data.batch_tokens=512", "trainer.limit_val_batches=1"]
        evaluate_extra = ["data.max_length=128"]
    runner = Runner(repo, o.runs, o.out, list(o.train_args), [*model, *evaluate_extra, *o.eval_args], log)
    probes = [f"probes.{k}={v}" for k, v in (("crows_pairs", o.crows_pairs), ("stereoset", o.stereoset)) if v]
    probes += [f"probes.limit={o.probe_limit}"] if probes and o.probe_limit else []
    sets = {"counsel_chat": []}
    if o.esconv:
        es = Path(o.esconv)
        if o.esconv_sample:
            es = work / f"esconv_sample{o.esconv_sample}.jsonl"
            ids = stratified_sample(Path(o.esconv), o.esconv_sample, es)
            write_text_atomic(o.out / "esconv_sample_ids.json", json.dumps(ids) + "\n")
        elif not es.is_file():
            raise ConfigError(f"--esconv {es}: not found; create it with scripts/convert_esconv.py")
        sets["esconv"] = [f"files=[{es}]"]
    prompts = work / "prompts.jsonl"
    write_prompts(prompts)

    def measure(row: Row, seed: int) -> dict:
        if runner.measured(row, seed, list(sets)):  # a finished row-seed needs no run (a new machine has none)
            return runner.evaluations(row, seed, list(sets))
        run = runner.train(row, seed, extra)
        with_probes = probes if o.probe_seeds is None or seed in o.probe_seeds else []
        evals = {name: runner.evaluate(run, row, seed, name, args + (with_probes if name == "counsel_chat" else []))
                 for name, args in sets.items()}
        runner.generate(run, row, seed, prompts, 16 if o.smoke else o.max_new_tokens)
        return evals

    rank = o.matched_rank
    if rank is None:  # LoRA r16 and the design first: their trainable parameters give the matched rank
        first = {r.name: r for r in rows(None)}
        counted = {n: measure(first[n], o.seeds[0])["counsel_chat"]["trained_params"]
                   for n in ("lora_r16", "lora_experts_token_top2")}
        rank = lora_rank_matching(counted["lora_experts_token_top2"], counted["lora_r16"])
    study_rows = rows(rank)
    study_rows = [r for r in study_rows if o.rows is None or r.name in o.rows]
    for seed in o.seeds:
        for row in study_rows:
            measure(row, seed)
    results = aggregate(o.out / "raw", [r.name for r in study_rows], list(sets))
    what = {"base": "the base model, untrained (scored in the same evaluations)"} | {r.name: r.what for r in study_rows}
    write_text_atomic(o.out / "results.json", json.dumps({"seeds": o.seeds, "matched_rank": rank,
                                               "trained_params": {n: r.get("trained_params") for n, r in results.items()
                                                                  if n != "base"},
                                               "sets": list(sets), "rows": what, "results": results}, indent=2))
    domains = list(PROMPTS)
    write_text_atomic(o.out / "results.md", markdown(results, list(sets), domains, what))
    log(f"results -> {o.out / 'results.md'}")
    return results
