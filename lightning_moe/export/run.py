"""export.py's work: a trained run (any checkpoint) to a complete, self-describing folder that other tools serve.

merged      LoRA folded into the base weights (peft's merge_and_unload), saved by save_pretrained as safetensors
            shards: plain `AutoModelForCausalLM.from_pretrained(folder)`, no trust_remote_code.
peft        the LoRA as a standard PEFT adapter (`PeftModel.from_pretrained(base, folder)`).
per_domain  one PEFT adapter per domain (global LoRA + that domain's LoRA expert, one rank for all), `global/`
            (the global LoRA alone, what the router's input needs) and `router/` (weights, the pooling rule, route.py).
Every folder has the tokenizer, its chat template and a generation_config.json that stops at the end of a turn.
The format is checked against the run's form, and the output folder against what exists, before any weights load.
"""

from __future__ import annotations

import json
import shlex
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
from omegaconf import DictConfig
from safetensors.torch import save_file

from lightning_moe.checkpointing.load import LoadPlan, load_trained, plan_load
from lightning_moe.checkpointing.outputs import check_free_space, check_output
from lightning_moe.export import adapters
from lightning_moe.export.folder import ExportFolder, refuse_existing, write_manifest, write_tokenizer_and_stops
from lightning_moe.config.export_forms import check_format
from lightning_moe.models.build import torch_dtype

ROUTE = Path(__file__).with_name("route.py")
REBUILD = Path(__file__).with_name("rebuild_base.py")
SERVER_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's --max-lora-rank values


def export(cfg: DictConfig, overrides: list[str]) -> Path:
    out = check_output(cfg.out, folder=True)  # a new folder, outside every run, where we can write
    refuse_existing(out)
    plan = plan_load(cfg.run, cfg.checkpoint, overrides, cfg.device)
    check_format(cfg.format, plan.sections)  # before any weights
    check_free_space(out, _needed_bytes(cfg, plan))
    run = load_trained(plan, cfg.device)
    with ExportFolder(out) as folder:
        manifest = {"format": cfg.format, "run": str(plan.run_dir), "checkpoint": str(plan.checkpoint),
                    "global_step": plan.global_step, "base_model": plan.sections.model.name_or_path,
                    "base_init": plan.sections.model.init}
        manifest |= {"merged": _merged, "peft": _peft, "per_domain": _per_domain}[cfg.format](run, plan, folder, cfg)
        # after the format's files: save_pretrained writes a generation_config.json of its own (a scalar EOS)
        manifest["stop_token_ids"] = write_tokenizer_and_stops(run.tokenizer, folder)
        write_manifest(folder, manifest)
    print(f"{cfg.format} export of {plan.run_dir} (step {plan.global_step}) -> {out}")
    if cfg.format == "per_domain":
        print(serve_command(out, manifest))
    elif cfg.format == "merged":
        print(merged_serve_command(out))
    return out


def _needed_bytes(cfg: DictConfig, plan: LoadPlan) -> int:
    """About what the export writes: the whole model for merged (counted on the meta device: no memory), the
    trained tensors (one copy per domain adapter) otherwise."""
    trained = sum(v.numel() for v in plan.state.values()) * 4
    if cfg.format != "merged":
        return trained * (plan.sections.moe.num_experts + 1 if cfg.format == "per_domain" else 1)
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        params = sum(p.numel() for p in AutoModelForCausalLM.from_config(plan.hf_config).parameters())
    return params * torch_dtype(cfg.dtype or plan.sections.model.dtype).itemsize


def _merged(run, plan: LoadPlan, folder: Path, cfg: DictConfig) -> dict:
    model = run.model.merge_and_unload() if hasattr(run.model, "merge_and_unload") else run.model
    dtype = torch_dtype(cfg.dtype or plan.sections.model.dtype)
    model.to(dtype).save_pretrained(folder, max_shard_size="5GB")  # safetensors shards + index
    return {"dtype": str(dtype).removeprefix("torch."), "load": "AutoModelForCausalLM.from_pretrained(folder)"}


def _base_name(plan: LoadPlan) -> str | None:
    m = plan.sections.model
    return m.name_or_path if m.init == "pretrained" else None  # a random base has no name to download


def _peft(run, plan: LoadPlan, folder: Path, cfg: DictConfig) -> dict:
    run.model.save_pretrained(folder)
    return {"load": "PeftModel.from_pretrained(base, folder)", "base": _base_name(plan) or _random_base_note(plan)}


def _random_base_note(plan: LoadPlan) -> str:
    return (f"a random base (model.init=random, architecture {plan.sections.model.arch}, seed "
            f"{plan.record.get('seed')}): rebuild it with lightning_moe.models.build, or export format=merged")


def _per_domain(run, plan: LoadPlan, folder: Path, cfg: DictConfig) -> dict:
    s = plan.sections
    names = list(s.domains) if len(s.domains) == s.moe.num_experts else [f"expert{e}" for e in range(s.moe.num_experts)]
    global_pieces = adapters.global_lora(run.model)
    experts = [adapters.expert_lora(run.model, run.blocks, e) for e in range(s.moe.num_experts)]
    targets = {p.rsplit(".", 1)[-1] for p in (*global_pieces, *experts[0])}  # the projections either adapts
    shapes = adapters.module_shapes(run.model, targets)
    needed = max(sum(a.shape[0] for a, _ in pairs) for e in range(s.moe.num_experts)
                 for pairs in adapters.combine(global_pieces, experts[e]).values())
    rank = next(r for r in SERVER_RANKS if r >= needed)  # one rank for every adapter, one a server accepts
    base = _base_name(plan)
    for e, name in enumerate(names):
        adapters.write_adapter(adapters.combine(global_pieces, experts[e]), shapes, folder / name, base, rank)
    if global_pieces:
        adapters.write_adapter(global_pieces, adapters.module_shapes(run.model, {p.rsplit(".", 1)[-1]
                                                                                 for p in global_pieces}),
                               folder / "global", base)
    leader = run.blocks[0]
    router_dir = folder / "router"
    router_dir.mkdir()
    save_file({"weight": leader.router.weight.detach().float().cpu().contiguous()}, str(router_dir / "router.safetensors"))
    spec = {"layer": leader.layer_idx, "routing_level": s.moe.routing_level, "pooling": s.moe.pooling,
            "adapters": names, "input": f"the input of model.layers[{leader.layer_idx}].mlp (after its "
            "post-attention norm), computed by the base + the global adapter", "dtype": "float32",
            "rule": "argmax(weight @ mean of that input over the pooled prompt tokens"
            + (", RMS-normalised)" if s.moe.router_input_norm else ")"), "moe": asdict(s.moe)}
    (router_dir / "router.json").write_text(json.dumps(spec, indent=2) + "\n")
    shutil.copy(ROUTE, router_dir / "route.py")
    manifest = {"adapters": names, "rank": rank, "router": "router/ (route.py: Router(export, base).pick(messages))",
                "base": base or _random_base_note(plan)}
    if base is None:
        manifest["base_rebuild"] = _random_base(run, plan, folder / "base")
    return manifest


def _random_base(run, plan: LoadPlan, where: Path) -> str:
    """A random base has no name a server can load: write its config and how training drew it, and the script that
    rebuilds it as a transformers folder (`vllm serve` and route.py then point at that folder)."""
    where.mkdir()
    hf = run.model.get_base_model() if hasattr(run.model, "get_base_model") else run.model
    hf.config.save_pretrained(where)  # the vocabulary as training padded it
    spec = {"seed": plan.record.get("seed", plan.cfg.get("seed", 0)), "dtype": plan.sections.model.dtype,
            "init_device": plan.record.get("init_device", "cpu"), "arch": plan.sections.model.arch}
    (where / "rebuild.json").write_text(json.dumps(spec, indent=2) + "\n")
    shutil.copy(REBUILD, where / "rebuild_base.py")
    return "python base/rebuild_base.py BASE_DIR (in this folder): writes the random base for vllm serve / route.py"


def serve_command(out: Path, manifest: dict) -> str:
    q = shlex.quote  # paths survive copy and paste, spaces included
    lines = ["serve every domain over one copy of the base with vLLM (not run here: no GPU vLLM install):"]
    if manifest["base_init"] == "pretrained":
        base = q(manifest["base"])
    else:
        base = q(str(out.parent / f"{out.name}-base"))
        lines.append(f"  python {q(str(out / 'base' / 'rebuild_base.py'))} {base}    # the random base, rebuilt once")
    modules = " ".join(q(f"{n}={out / n}") for n in manifest["adapters"])
    lines += [f"  vllm serve {base} --enable-lora --max-lora-rank {manifest['rank']} "
              f"--max-loras {len(manifest['adapters'])} --lora-modules {modules}",
              f"  python {q(str(out / 'router' / 'route.py'))} --base {base} --messages M.json    # the adapter "
              "for a conversation"]
    return "\n".join(lines)


def merged_serve_command(out: Path) -> str:
    """A merged folder is a plain transformers model: existing OpenAI-compatible servers load it as it is. Clients
    name the model by the path as given here (GET /v1/models lists it)."""
    folder = shlex.quote(str(out))
    return "\n".join([
        "serve it as an OpenAI-compatible API (http://localhost:8000/v1):",
        f"  vllm serve {folder}    # GPU (not run here: no GPU vLLM install)",
        f"  transformers serve {folder} --device cpu    # CPU: pip install 'transformers[serving]'"])


def export_run(cfg: DictConfig, overrides: list[str]) -> Path:
    with torch.no_grad():
        return export(cfg, overrides)
