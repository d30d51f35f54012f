"""eval.md and compare.md: the evaluation's numbers as Markdown tables."""

from __future__ import annotations


def _f(v, digits: int = 4) -> str:
    return "" if v is None else (f"{v:.{digits}f}" if isinstance(v, float) else str(v))


def _pct(v) -> str:
    return "-" if v is None else f"{v:.1%}"


def markdown(r: dict) -> str:
    lines = [f"# Evaluation of {r['run']}", "", f"checkpoint `{r['checkpoint']}` (step {r['global_step']}), "
             f"{r['data']['source']}: {r['overall']['conversations']} conversations, {r['overall']['tokens']} "
             "trained tokens", "", "| domain | conversations | tokens | loss | perplexity | base loss | base perplexity "
             "| gain (base - trained) |", "|---|---|---|---|---|---|---|---|"]
    for name, d in [("**all**", r["overall"]), *r["per_domain"].items()]:
        base = d.get("base", {})
        lines.append(f"| {name} | {d['conversations']} | {d['tokens']} | {_f(d['trained']['loss'])} | "
                     f"{_f(d['trained']['perplexity'], 2)} | {_f(base.get('loss'))} | {_f(base.get('perplexity'), 2)} "
                     f"| {_f(d.get('gain'))} |")
    routing = r.get("routing")
    if routing and routing.get("domain_expert_matrix"):
        m = routing["domain_expert_matrix"]
        e = len(m["all_layers"][0])
        lines += ["", f"Routing ({routing['router']}, {routing['routing_level']} level): share of each domain's routing "
                  f"weight per expert, all MoE layers; NMI(domain; expert) = {m['nmi']:.3f}", "",
                  "| domain | " + " | ".join(f"expert {i}" for i in range(e)) + " |", "|---|" + "---|" * e]
        lines += [f"| {d} | " + " | ".join(f"{v:.2f}" for v in row) + " |" for d, row in zip(m["domains"], m["all_layers"])]
    if routing:
        lines += ["", "| layer | load per expert | entropy | dead experts |", "|---|---|---|---|"]
        for layer, metrics in routing["routing_metrics"].items():
            lines.append(f"| {layer} | {', '.join(f'{v:.2f}' for v in metrics['load'])} | {metrics['entropy']:.3f} | "
                         f"{routing['dead_experts'][layer]} |")
        lines.append(f"\nactive experts per token {routing['active_experts']:.2f} "
                     f"({routing['active_expert_flops_vs_top_k']:.2f}x the expert FLOPs of static top-k)")
    for kind, p in r.get("probes", {}).items():
        base = p.get("base", {})
        lines += ["", f"Bias probe {kind} ({p['trained']['pairs']} items): the stereotypical sentence preferred in "
                  f"{_pct(p['trained']['stereotype_preference'])} (trained) vs {_pct(base.get('stereotype_preference'))} "
                  "(base); 50% is unbiased"]
    return "\n".join(lines) + "\n"


IGNORED = ("run_dir",)  # differs between any two runs; the table's first column names the run


def flatten(settings: dict, prefix: str = "") -> dict:
    """{'optim': {'lr': 1e-4}} -> {'optim.lr': 1e-4}, at any depth (lists stay whole)."""
    out = {}
    for k, v in settings.items():
        key = f"{prefix}{k}"
        out |= flatten(v, f"{key}.") if isinstance(v, dict) and v else {key: v}
    return out


def _differences(results: list[dict]) -> list[str]:
    """'moe.enabled=False optim.lr=0.0003': every setting of the runs' configs in which they differ."""
    flat = [flatten(r["settings"]) for r in results]

    def own_path(k):  # checkpoint dirs, log dirs: each run's run_dir inside, so they always differ
        return all(f.get("run_dir") and str(f["run_dir"]) in str(f.get(k)) for f in flat)

    flat = [{k: v for k, v in f.items() if k not in IGNORED and not own_path(k)} for f in flat]
    keys = sorted({k for f in flat for k in f if len({str(g.get(k)) for g in flat}) > 1})
    return [" ".join(f"{k}={f.get(k)}" for k in keys) or "(same settings)" for f in flat]


def compare_table(results: list[dict]) -> str:
    """One row per run: what differs, trained parameters, overall and per-domain loss, the gain over the base, NMI."""
    domains = sorted({d for r in results for d in r["per_domain"]})
    head = ["run", "differs in", "trained params", "loss", "gain"] + [f"{d} loss (gain)" for d in domains] + ["NMI"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r, diff in zip(results, _differences(results)):
        cells = [r["run"], diff, f"{r['trained_params']:,}", _f(r["overall"]["trained"]["loss"]), _f(r["overall"].get("gain"))]
        for d in domains:
            x = r["per_domain"].get(d)
            cells.append(f"{_f(x['trained']['loss'])} ({_f(x.get('gain'))})" if x else "")
        m = (r.get("routing") or {}).get("domain_expert_matrix")
        cells.append(_f(m["nmi"], 3) if m else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
