"""Speed and memory of this project's training path against a plain transformers + PEFT loop, on one GPU.

    python scripts/benchmark.py --out /tmp/b     # both baselines, recipes on synthetic + real rows: ~15 min, one H200
    python scripts/benchmark.py --out /tmp/b --only all        # every variant: ~1 min each, longest/qlora more
    python scripts/benchmark.py --out /tmp/b --only plain,moe,nomoe
    python scripts/benchmark.py --out /tmp/b --recipe none --arch tiny-mistral --seq 128 --only plain,moe   # CPU

Variants, each in its own process (so each peak memory is its own), no download (random weights built from
lightning_moe/architectures/, the bundled tokenizer):
  plain_liger  (a') the strongest hand-written loop: transformers + PEFT + Liger, micro-batch 2, no checkpointing
  multiseg     (b) synthetic conversations of ~140-1000 tokens packed several a row (rows of seq, micro-batches of
               4 x seq tokens), the recipe's varlen attention; multiseg_sdpa: SDPA's block-diagonal mask instead;
               multiseg_varlen: varlen named; multiseg_flex: one row of 4 x seq with flex_attention's document mask
  real_h100    (b) +recipe=therapeutic_h100 as committed on converted counsel-chat + ESConv; real_h100_sdpa /
               _varlen / _flex: with that attention (_flex: one packed row a micro-batch); real_h100_nomoe:
               moe=none; real_h100_fast, real_h200 (and real_h200_sdpa, _varlen): those recipes on the same data
  VARIANT_compile[_layers|_moe]  that variant with model.compile=all (or layers / moe; lightning_moe/models/
               compilation.py), 8 untimed micro-batches first (compilation); the JSON counts compiled frames and
               graph breaks: real_h100_compile, _compile_layers, _compile_moe, real_h100_nomoe_compile, moe_compile,
               h200_compile, real_h200_compile
  qlora_24gb_a/_b/_c  therapeutic_qlora on the real data: 20 checkpointed layers and micro-batches of 2 x seq
               tokens (therapeutic_qlora_24gb) / every layer and 4 x seq / none and 1 x seq: for a 24 GB GPU
  plain        (a) a plain loop written here: transformers + PEFT, LoRA r16/alpha32/dropout 0 on all 7 projections,
                   SDPA, bf16 weights, activation checkpointing, fused AdamW, batch 4 x seq random tokens
  moe          (b) train.py +recipe=RECIPE model.init=random on synthetic conversations of >= seq tokens
                   (truncated to seq, so every token is real), MoE on: the Trainer, callbacks and all
  nomoe        (c) the same with moe=none
  moe_ckpt_b4  (b) with activation checkpointing on every layer and micro-batch 4; moe_ckpt_b4_offload: and
               the saved activations in CPU memory (model.offload_activations); moe_ckpt_b4_floor: and
               8-bit AdamW moments (optim.name=adamw_8bit)
  h100         (b) with +recipe=therapeutic_h100 as committed
  h100_drop05  therapeutic_h100 with LoRA dropout 0.05 (peft keeps a dropped-out copy of each adapted input)
               and every other layer checkpointed; h100_nockpt: therapeutic_h100 without checkpointing
  h200         (b) with +recipe=therapeutic_h200 (micro-batch 8, no checkpointing); h200_nomoe: MoE off
  longest      (b) at batch 1 with checkpointing, for each --longest length until one does not fit
  qlora        (b) with +recipe=therapeutic_qlora (nf4) at batch 1: the random model is saved once, then
                   loaded in 4 bits the way pretrained weights are; qlora_upcast: with peft's float32
                   upcast of the unquantised weights (model.upcast_non_quantized=true)
  real_padded  (b) on converted counsel-chat + ESConv (data/generated/, scripts/convert_*.py), padded
  real_packed  (b) the same with padding-free packing (the recipes' default), 4 conversations a micro-batch;
               real_packed_h200: therapeutic_h200's 8; real_packed_h100: therapeutic_h100 as committed
Tokens/s counts real (non-padding) tokens; MFU is model FLOPs (lightning_moe/models/flops.py, MOE_TRAINING_GUIDE.md)
over the dense bf16 peak; peak memory is torch.cuda.max_memory_allocated. Writes OUT/results.json (+ one JSON
and one log per variant) and prints a table with each variant's ratio to (a). --memory adds, per variant,
OUT/VARIANT.memory.txt: the allocations alive at one micro-batch's peak, by the code that made them.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

VARIANTS = ["plain", "plain_liger", "moe", "nomoe", "multiseg", "multiseg_sdpa", "multiseg_varlen", "multiseg_flex",
            "real_h100", "real_h100_sdpa", "real_h100_varlen", "real_h100_flex", "real_h100_nomoe", "real_h100_fast",
            "real_h200", "real_h200_sdpa", "real_h200_varlen", "qlora_24gb_a", "qlora_24gb_b", "qlora_24gb_c",
            "moe_ckpt_b4", "moe_ckpt_b4_offload", "moe_ckpt_b4_floor", "h100",
            "h100_drop05", "h100_nockpt", "h200", "h200_nomoe", "longest", "qlora", "qlora_upcast",
            "real_padded", "real_packed", "real_packed_h100", "real_packed_h200",
            "real_h100_compile", "real_h100_compile_layers", "real_h100_compile_moe", "real_h100_nomoe_compile",
            "moe_compile", "h200_compile", "real_h200_compile"]
# the side-by-side of the speed work's targets: both baselines, synthetic full rows, several conversations a row, and
# every recipe on real conversations (counsel-chat + ESConv)
DEFAULT = ["plain", "plain_liger", "moe", "h100", "h200", "multiseg", "multiseg_sdpa", "real_h100", "real_h100_sdpa",
           "real_h100_fast", "real_h100_nomoe", "real_h200"]
REAL_DATA = ["data/generated/counsel_chat.jsonl", "data/generated/esconv.jsonl"]


def architecture_config(arch: str):
    from lightning_moe.config.architecture import resolve_model_config
    from lightning_moe.config.schema import ModelConfig

    return resolve_model_config(ModelConfig(init="random", arch=arch))


# ---- (a) the plain transformers + PEFT loop ------------------------------------------------------------
def plain_loop(arch: str, seq: int, batch: int, warmup: int, steps: int, device: str, out: Path,
               liger: bool = False, checkpointing: bool = True) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from lightning_moe.models.flops import count_flops, dense_peak_flops

    config = architecture_config(arch)
    dev = torch.device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    with dev:
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    model.config.use_cache = False
    if liger:  # the strongest hand-written loop measured: Liger's kernels, no checkpointing, micro-batch 2
        from liger_kernel.transformers import apply_liger_kernel_to_mistral

        apply_liger_kernel_to_mistral(model=model)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(
        r=16, lora_alpha=32, lora_dropout=0.0,  # the recipes' LoRA: r16, alpha 32, no dropout
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=dev.type == "cuda")
    flops = count_flops(model, config).per_batch(batch * seq, batch * seq * seq)
    gen = torch.Generator(device=dev).manual_seed(0)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)  # as StepTimer: the training peak

    def step() -> None:
        ids = torch.randint(0, config.vocab_size, (batch, seq), device=dev, generator=gen)
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    seconds = time.perf_counter() - t0
    peak = dense_peak_flops(dev, "bf16-true")
    out.write_text(json.dumps({
        "tokens_per_s": batch * seq * steps / seconds,
        "mfu": flops * steps / seconds / peak if peak else None,
        "peak_memory_gib": torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None,
        "micro_batches": steps, "real_tokens": batch * seq * steps, "model_flops": flops * steps, "seconds": seconds,
        "micro_batch_size": batch, "trainable_params": sum(p.numel() for p in params),
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
    }, indent=2))


def save_random(arch: str, path: Path) -> None:
    """A random bf16 model saved like a downloaded one, so 4-bit loading quantises it the usual way."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(architecture_config(arch), dtype=torch.bfloat16)
    model.save_pretrained(path)


# ---- (b), (c): the real path ------------------------------------------------------------------------------
def synthetic_conversations(path: Path, rows: int, tokens: int, seed: int = 0, shortest: int | None = None) -> Path:
    """Chat rows of random lowercase words, long enough that every row is truncated to `tokens` (the
    bundled tokenizer splits a random word into ~3 tokens): all tokens of every micro-batch are real.
    `shortest`: each row's size is drawn between it and `tokens` instead (conversations of varied lengths)."""
    rng = random.Random(seed)
    words = lambda n: " ".join("".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(3, 8)))  # noqa: E731
                               for _ in range(n))
    domains = ["psychology", "mental_health", "bias_detection", "general_therapeutic"]
    with open(path, "w") as f:
        for i in range(rows):
            size = tokens if shortest is None else rng.randint(shortest, tokens)
            f.write(json.dumps({"domain": domains[i % 4], "messages": [
                {"role": "user", "content": words(max(1, size // 12))},
                {"role": "assistant", "content": words(size // 2)}]}) + "\n")
    return path


def train_args(name: str, a, out: Path, label: str | None = None) -> list[str] | None:
    """train.py's command for variant `name`; `label` (default: name) names its run directory and JSON."""
    if "_compile" in name:  # VARIANT_compile[_SCOPE]: that variant with model.compile=SCOPE (all when none given)
        base, scope = name.split("_compile")
        cmd = train_args(base, a, out, label=name)
        return None if cmd is None else cmd + [f"model.compile={scope.lstrip('_') or 'all'}"]
    label = label or name
    recipe = [] if a.recipe == "none" else [f"+recipe={a.recipe}", "model.init=random"]
    seq, warmup, micro = a.seq, a.warmup, a.micro_batches
    if "_compile" in label:  # the first micro-batches compile: not timed
        warmup = max(warmup, 8)
    extra: list[str] = []
    data = None
    if name == "nomoe":
        extra = ["moe=none"]
    elif name.startswith("moe_ckpt_b4"):
        extra = ["model.gradient_checkpointing=true", "model.gradient_checkpointing_layers=null", "data.batch_size=4"]
        extra += ["model.offload_activations=true"] if name != "moe_ckpt_b4" else []
        extra += ["optim.name=adamw_8bit"] if name == "moe_ckpt_b4_floor" else []
    elif name.startswith("h100"):
        recipe = ["+recipe=therapeutic_h100", "model.init=random"]
        if name == "h100_drop05":
            extra = ["lora.dropout=0.05", "model.gradient_checkpointing=true", "model.gradient_checkpointing_layers=20"]
        elif name == "h100_nockpt":
            extra = ["model.gradient_checkpointing=false", "model.gradient_checkpointing_layers=null"]
    elif name in ("h200", "h200_nomoe"):
        recipe = ["+recipe=therapeutic_h200", "model.init=random"] + (["moe=none"] if name == "h200_nomoe" else [])
    elif name.startswith("longest_"):
        seq = int(name.split("_")[1])
        extra, warmup, micro = ["model.gradient_checkpointing=true", "data.batch_size=1"], 1, 1  # ~1 min/step
        data = synthetic_conversations(out / f"synthetic_{seq}.jsonl", 8, seq)
    elif name in ("qlora", "qlora_upcast"):
        model_dir = a.scratch / f"random-{a.arch}"  # 24 GB for the 12B: not beside the results
        if not (model_dir / "config.json").exists():
            subprocess.run([sys.executable, __file__, "--_save-random", str(model_dir), "--arch", a.arch], check=True)
        recipe = ["+recipe=therapeutic_qlora", f"model.name_or_path={model_dir}", "model.tokenizer=data/tokenizer",
                  "model.gradient_checkpointing=true", "data.batch_size=1"]
        extra = ["model.upcast_non_quantized=true"] if name == "qlora_upcast" else []
    elif name.startswith("multiseg"):  # synthetic conversations of ~140-1000 tokens (~560), packed several a row
        data = synthetic_conversations(out / "synthetic_short.jsonl", 4000, max(8, seq // 6),
                                       shortest=max(4, seq // 40))
        extra = ["data.packing=true", f"data.batch_tokens={4 * seq}", *attention(name, seq)]
    elif name.startswith("qlora_24gb"):
        model_dir = a.scratch / f"random-{a.arch}"
        if not (model_dir / "config.json").exists():
            subprocess.run([sys.executable, __file__, "--_save-random", str(model_dir), "--arch", a.arch], check=True)
        recipe = ["+recipe=therapeutic_qlora", f"model.name_or_path={model_dir}", "model.tokenizer=bundled"]
        extra = {"qlora_24gb_a": ["model.gradient_checkpointing_layers=20", f"data.batch_tokens={2 * seq}"],
                 "qlora_24gb_b": ["model.gradient_checkpointing_layers=null", f"data.batch_tokens={4 * seq}"],
                 "qlora_24gb_c": ["model.gradient_checkpointing=false", "model.gradient_checkpointing_layers=null",
                                  f"data.batch_tokens={seq}"]}[name]
        extra = [f"data.train_files=[{','.join(REAL_DATA)}]", "data.packing=true", *extra]
    elif name in ("real_h100", "real_h100_flex", "real_h100_sdpa", "real_h100_varlen", "real_h100_nomoe",
                  "real_h100_fast", "real_h200", "real_h200_sdpa", "real_h200_varlen"):
        missing = [f for f in REAL_DATA if not (REPO / f).exists()]
        if missing:
            print(f"skipping {name}: {missing} missing (scripts/convert_counsel_chat.py, convert_esconv.py)")
            return None
        recipe = [f"+recipe=therapeutic_{name.split('_')[1] + ('_fast' if name.endswith('_fast') else '')}",
                  "model.init=random"]
        extra = [f"data.train_files=[{','.join(REAL_DATA)}]"]
        extra += ["moe=none"] if name.endswith("_nomoe") else []
        extra += attention(name, seq)
    elif name.startswith("real_"):
        if name in ("real_packed_h200", "real_packed_h100"):
            recipe = [f"+recipe=therapeutic_{name.rsplit('_', 1)[1]}", "model.init=random"]
        missing = [f for f in REAL_DATA if not (REPO / f).exists()]
        if missing:
            print(f"skipping {name}: {missing} missing (scripts/convert_counsel_chat.py, convert_esconv.py)")
            return None
        extra = [f"data.train_files=[{','.join(REAL_DATA)}]", f"data.packing={name != 'real_padded'}"]
    if data is None and not name.startswith(("real_", "qlora_24gb")):
        # enough rows that the timed window never reaches the end of an epoch (a dataloader restart and a short
        # last batch would be timed): micro-batches of up to 8, 90% of the rows in the training split
        rows = max(64, -(-(warmup + micro) * 8 * 10 // 9) + 8)
        data = synthetic_conversations(out / f"synthetic_{seq}_{rows}.jsonl", rows, seq)
    if data is not None:
        extra = [f"data.train_files=[{data}]", "data.val_files=[]", "data.val_fraction=0.1", *extra]
    return [sys.executable, str(REPO / "train.py"), *recipe, "logger=csv", f"data.max_length={seq}",
            "data.num_workers=2", "trainer.limit_val_batches=0", "trainer.num_sanity_val_steps=0",
            "trainer.max_steps=100000", "resume=false", f"hydra.run.dir={out / label}",
            f"+callbacks.bench={{_target_: step_timer.StepTimer, out: {out / label}.json, "
            f"warmup: {warmup}, steps: {micro}, profile: {a.profile}, memory_trace: {a.memory}}}",
            *extra, *a.override]


def attention(name: str, seq: int) -> list[str]:
    """A variant's attention suffix: _flex (flex_attention's document mask, one row of 4 x seq a micro-batch),
    _varlen (FlashAttention spans), _sdpa (SDPA's block-diagonal mask); none: the recipe's own."""
    if name.endswith("_flex"):
        return ["model.attn_implementation=flex_attention", f"data.row_length={4 * seq}"]
    return [f"model.attn_implementation={name.rsplit('_', 1)[1]}"] if name.endswith(("_varlen", "_sdpa")) else []


def _with_scripts() -> str:
    """train.py subprocesses import the StepTimer callback (scripts/step_timer.py) by its `_target_`."""
    return os.pathsep.join(p for p in (str(Path(__file__).resolve().parent), os.environ.get("PYTHONPATH")) if p)


# ---- driver -----------------------------------------------------------------------------------------------
def run_variant(name: str, a, out: Path) -> dict:
    if name in ("plain", "plain_liger"):
        cmd = [sys.executable, __file__, "--_plain", "--arch", a.arch, "--seq", str(a.seq), "--device", a.device,
               "--warmup", str(a.warmup), "--micro-batches", str(a.plain_steps), "--out", str(out)]
        cmd += ["--_liger"] if name == "plain_liger" else []
    else:
        cmd = train_args(name, a, out)
        if cmd is None:
            return {"status": "skipped"}
    (out / f"{name}.json").unlink(missing_ok=True)
    t0 = time.monotonic()
    returncode = None
    with open(out / f"{name}.log", "w") as log:
        try:
            returncode = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, timeout=a.timeout,
                                        env=os.environ | {"PYTHONUNBUFFERED": "1", "PYTHONPATH": _with_scripts()}
                                        ).returncode
        except subprocess.TimeoutExpired:  # recorded, and the next variants still run
            pass
    text = (out / f"{name}.log").read_text(errors="replace")
    result = {"command": " ".join(cmd[1:]), "wall_s": round(time.monotonic() - t0, 1)}
    if (out / f"{name}.json").exists():
        return result | {"status": "ok"} | json.loads((out / f"{name}.json").read_text())
    if returncode is None:
        return result | {"status": f"timeout ({a.timeout} s)"}
    oom = "OutOfMemoryError" in text or "out of memory" in text
    result["status"] = "out_of_memory" if oom else f"failed (exit {returncode})"
    if not oom:
        print(f"--- {name} failed; the end of {out / name}.log:\n" + "\n".join(text.splitlines()[-25:]))
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, help="results directory (required)")
    p.add_argument("--only", default=",".join(DEFAULT), help="comma-separated variants, or 'all'")
    p.add_argument("--recipe", default="therapeutic_h100_fast", help="'none': the tiny default (CPU smoke test)")
    p.add_argument("--arch", default="mistral-nemo-12b")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--device", default="cuda")
    p.add_argument("--warmup", type=int, default=3, help="micro-batches before timing")
    p.add_argument("--micro-batches", type=int, default=16, help="timed micro-batches per variant")
    p.add_argument("--plain-steps", type=int, default=6, help="timed steps of the plain loop")
    p.add_argument("--longest", default="65536,131072", help="batch-1 lengths to try, in increasing order")
    p.add_argument("--timeout", type=int, default=420, help="seconds per variant")
    p.add_argument("--scratch", type=Path, default=Path("/tmp/lightning_moe_benchmark"),
                   help="where qlora saves the random model it loads in 4 bits")
    p.add_argument("--profile", action="store_true", help="also write OUT/VARIANT.profile.txt (torch.profiler)")
    p.add_argument("--memory", action="store_true", help="also write OUT/VARIANT.memory.txt (allocator trace)")
    p.add_argument("--override", nargs="*", default=[], help="extra train.py overrides for every variant")
    p.add_argument("--_plain", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--_liger", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--_save-random", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a._plain:
        if a._liger:  # (a'): HF + PEFT + Liger, micro-batch 2, no checkpointing
            return plain_loop(a.arch, a.seq, 2, a.warmup, a.micro_batches, a.device, a.out / "plain_liger.json",
                              liger=True, checkpointing=False)
        return plain_loop(a.arch, a.seq, 4, a.warmup, a.micro_batches, a.device, a.out / "plain.json")
    if a._save_random:
        return save_random(a.arch, a._save_random)
    if a.out is None:
        p.error("--out is required")
    if a.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():  # every variant would fail after minutes of setup, and exit 0
            p.error(f"--device {a.device}: this machine has no CUDA GPU, and the benchmark measures GPU throughput; "
                    "on a CPU, --device cpu --recipe none is the smoke test")

    a.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {}
    names = VARIANTS if a.only == "all" else a.only.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        p.error(f"--only: unknown variant(s) {unknown}; known: {', '.join(VARIANTS)}")
    for name in names:
        if name == "longest":
            for length in (int(x) for x in a.longest.split(",")):
                results[f"longest_{length}"] = r = run_variant(f"longest_{length}", a, a.out)
                print(f"longest_{length}: {r['status']} ({r.get('wall_s', 0)} s)", flush=True)
                (a.out / "results.json").write_text(json.dumps(results, indent=2))
                if r["status"] != "ok":
                    break
            continue
        results[name] = run_variant(name, a, a.out)
        print(f"{name}: {results[name]['status']} ({results[name].get('wall_s', 0)} s)", flush=True)
        (a.out / "results.json").write_text(json.dumps(results, indent=2))  # after each: a timeout keeps the rest
    print_table(results)
    if results and not any(r["status"] == "ok" for r in results.values()):
        sys.exit(f"every variant failed (see {a.out}/*.log)")


def print_table(results: dict[str, dict]) -> None:
    base = results.get("plain", {}).get("tokens_per_s")
    print(f"\n{'variant':16} {'status':14} {'batch':>5} {'tokens/s':>9} {'vs (a)':>7} {'MFU':>6} {'peak GiB':>8}")
    for name, r in results.items():
        tps = r.get("tokens_per_s")
        ratio = f"{tps / base:.2f}x" if tps and base else ""
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") else ""
        mem = f"{r['peak_memory_gib']:.1f}" if r.get("peak_memory_gib") else ""
        print(f"{name:16} {r['status'][:14]:14} {r.get('micro_batch_size', ''):>5} "
              f"{f'{tps:,.0f}' if tps else '':>9} {ratio:>7} {mfu:>6} {mem:>8}")


if __name__ == "__main__":
    main()
