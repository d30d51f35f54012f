"""Speed and memory of this project's training path against a plain transformers + PEFT loop, on one GPU.

    python scripts/benchmark.py --out /tmp/b     # both baselines, recipes on synthetic + real rows: ~15 min, one H200
    python scripts/benchmark.py --out /tmp/b --only all        # every variant: ~1 min each, longest/qlora more
    python scripts/benchmark.py --out /tmp/b --only plain,moe,nomoe
    python scripts/benchmark.py --out /tmp/b --recipe none --arch tiny-mistral --seq 128 --only plain,moe   # CPU

Variants, each in its own process (so each peak memory is its own), no download (random weights built from
lightning_moe/models/architectures/, the bundled tokenizer):
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
  trl_sft      the peer: TRL's SFTTrainer as its docs recommend for speed (packing with padding-free position_ids,
               Liger, checkpointing, the recipes' LoRA, 4 x seq tokens a micro-batch) on the same real data and
               random 12B model (scripts/trl_peer.py); needs trl + accelerate
  real_h100_compile_cold / _warm  real_h100_compile with its compile caches in SCRATCH/compile_cache, emptied
               before _cold and kept for _warm (run them in that order): wall_s is the whole start-to-stop time;
               the JSON's compile_cache counts the graphs taken from the cache and generated
  real_h100_fp8  real_h100 with model.base_precision=fp8 (the frozen base's matmuls in FP8, lightning_moe/models/
               fp8.py); _fp8_cached: the frozen weights cast to FP8 once (model.fp8_weight_cache); real_h100_fast_fp8
  VARIANT_ckptall  that variant with every decoder layer checkpointed (the recipe checkpoints 4 of 40): the peer's
               memory, for the comparison at matched memory; real_h100_ckptall, real_h100_compile_ckptall
  --loss-parity  instead of variants: therapeutic_h100 on the real data with the first --parity-layers layers of
               --arch, one micro-batch an optimizer step, --parity-steps steps in bf16 and in fp8 (same seed, same
               data order): OUT/loss_parity.json holds both curves and their largest relative gap
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
Exits 1 at once with --device cuda on a machine without CUDA, and after the table when no variant produced a result.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # --loss-parity reads the architecture through lightning_moe, installed or not

VARIANTS = ["plain", "plain_liger", "moe", "nomoe", "multiseg", "multiseg_sdpa", "multiseg_varlen", "multiseg_flex",
            "real_h100", "real_h100_sdpa", "real_h100_varlen", "real_h100_flex", "real_h100_nomoe", "real_h100_fast",
            "real_h200", "real_h200_sdpa", "real_h200_varlen", "qlora_24gb_a", "qlora_24gb_b", "qlora_24gb_c",
            "moe_ckpt_b4", "moe_ckpt_b4_offload", "moe_ckpt_b4_floor", "h100",
            "h100_drop05", "h100_nockpt", "h200", "h200_nomoe", "longest", "qlora", "qlora_upcast",
            "real_padded", "real_packed", "real_packed_h100", "real_packed_h200",
            "real_h100_compile", "real_h100_compile_layers", "real_h100_compile_moe", "real_h100_nomoe_compile",
            "moe_compile", "h200_compile", "real_h200_compile", "real_h100_fp8", "real_h100_fp8_cached",
            "real_h100_fast_fp8", "trl_sft", "real_h100_compile_cold", "real_h100_compile_warm", "real_h100_ckptall",
            "real_h100_compile_ckptall"]
# the side-by-side of the speed work's targets: both baselines, synthetic full rows, several conversations a row, and
# every recipe on real conversations (counsel-chat + ESConv)
DEFAULT = ["plain", "plain_liger", "moe", "h100", "h200", "multiseg", "multiseg_sdpa", "real_h100", "real_h100_sdpa",
           "real_h100_fast", "real_h100_nomoe", "real_h200"]
PLAIN_LOOPS = ("plain", "plain_liger")  # written here, not train.py
PEERS = ("trl_sft",)  # another trainer on the same data and shape: scripts/trl_peer.py
REAL_DATA = ["data/generated/counsel_chat.jsonl", "data/generated/esconv.jsonl"]


def architecture_config(arch: str):
    from lightning_moe.models.architecture import resolve_model_config
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


def train_args(name: str, a, out: Path, label: str | None = None) -> list[str]:
    """train.py's command for variant `name`; `label` (default: name) names its run directory and JSON."""
    if name.endswith(("_cold", "_warm")):  # VARIANT_cold / _warm: compile caches emptied first / left from _cold
        return train_args(name.rsplit("_", 1)[0], a, out, label=label or name) + [
            f"model.compile_cache_dir={compile_cache(a)}"]
    if name.endswith("_ckptall"):  # VARIANT_ckptall: every decoder layer checkpointed, the peer's memory (trl_sft)
        return train_args(name.removesuffix("_ckptall"), a, out, label=label or name) + [
            "model.gradient_checkpointing=true", "model.gradient_checkpointing_layers=null"]
    if name.endswith(("_fp8", "_fp8_cached")):  # VARIANT_fp8: that variant with the frozen base in FP8
        base = name.rsplit("_fp8", 1)[0]
        return train_args(base, a, out, label=label or name) + [
            "model.base_precision=fp8", f"model.fp8_weight_cache={name.endswith('_cached')}"]
    if "_compile" in name:  # VARIANT_compile[_SCOPE]: that variant with model.compile=SCOPE (all when none given)
        base, scope = name.split("_compile")
        return train_args(base, a, out, label=label or name) + [f"model.compile={scope.lstrip('_') or 'all'}"]
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
        # one conversation a micro-batch (the recipes count micro-batches in tokens, fewer than seq); ~1 min/step
        extra = ["model.gradient_checkpointing=true", "data.batch_size=1", "data.batch_tokens=null"]
        warmup, micro = 1, 1
        data = synthetic_conversations(out / f"synthetic_{seq}.jsonl", 8, seq)
    elif name in ("qlora", "qlora_upcast"):
        recipe = ["+recipe=therapeutic_qlora", f"model.name_or_path={random_model_dir(a)}", "model.tokenizer=bundled",
                  "model.gradient_checkpointing=true", "data.batch_size=1"]
        extra = ["model.upcast_non_quantized=true"] if name == "qlora_upcast" else []
    elif name.startswith("multiseg"):  # synthetic conversations of ~140-1000 tokens (~560), packed several a row
        data = synthetic_conversations(out / "synthetic_short.jsonl", 4000, max(8, seq // 6),
                                       shortest=max(4, seq // 40))
        extra = ["data.packing=true", f"data.batch_tokens={4 * seq}", *attention(name, seq)]
    elif name.startswith("qlora_24gb"):
        recipe = ["+recipe=therapeutic_qlora", f"model.name_or_path={random_model_dir(a)}", "model.tokenizer=bundled"]
        extra = {"qlora_24gb_a": ["model.gradient_checkpointing_layers=20", f"data.batch_tokens={2 * seq}"],
                 "qlora_24gb_b": ["model.gradient_checkpointing_layers=null", f"data.batch_tokens={4 * seq}"],
                 "qlora_24gb_c": ["model.gradient_checkpointing=false", "model.gradient_checkpointing_layers=null",
                                  f"data.batch_tokens={seq}"]}[name]
        extra = [f"data.train_files=[{','.join(REAL_DATA)}]", "data.packing=true", *extra]
    elif name in ("real_h100", "real_h100_flex", "real_h100_sdpa", "real_h100_varlen", "real_h100_nomoe",
                  "real_h100_fast", "real_h200", "real_h200_sdpa", "real_h200_varlen"):
        recipe = [f"+recipe=therapeutic_{name.split('_')[1] + ('_fast' if name.endswith('_fast') else '')}",
                  "model.init=random"]
        extra = [f"data.train_files=[{','.join(REAL_DATA)}]"]
        extra += ["moe=none"] if name.endswith("_nomoe") else []
        extra += attention(name, seq)
    elif name.startswith("real_"):
        if name in ("real_packed_h200", "real_packed_h100"):
            recipe = [f"+recipe=therapeutic_{name.rsplit('_', 1)[1]}", "model.init=random"]
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


# ---- loss parity: bf16 against fp8 (or any two override sets) over the same first optimizer steps ------------
def cut_architecture(arch: str, layers: int, out: Path) -> Path:
    """The architecture `arch` with its first `layers` decoder layers only: the same shapes a layer, a fraction of
    the time, so hundreds of optimizer steps fit one GPU call (model.arch takes a folder with a config.json)."""
    config = architecture_config(arch)
    config.num_hidden_layers = layers
    folder = out / f"{arch}-{layers}-layers"
    config.save_pretrained(folder)
    return folder


def parity_commands(a, out: Path) -> dict[str, list[str]]:
    """therapeutic_h100 on the real data, one micro-batch an optimizer step, `a.parity_steps` steps logged each,
    once per precision with the same seed and data order."""
    arch = cut_architecture(a.arch, a.parity_layers, out)
    moe_layers = sorted({round(i * (a.parity_layers - 1) / 3) for i in range(4)})
    common = [sys.executable, str(REPO / "train.py"), "+recipe=therapeutic_h100", "model.init=random",
              f"model.arch={arch}", f"moe.layers=[{','.join(map(str, moe_layers))}]",
              f"model.gradient_checkpointing_layers={min(4, a.parity_layers)}",
              f"data.train_files=[{','.join(REAL_DATA)}]",
              "logger=csv", "trainer.accumulate_grad_batches=1", f"trainer.max_steps={a.parity_steps}",
              "trainer.log_every_n_steps=1", "trainer.limit_val_batches=0", "trainer.num_sanity_val_steps=0",
              # the recipe warms up over 1000 steps: a short warm-up, so the compared curve actually moves
              "optim.warmup_steps=10", "resume=false", *a.override]
    extra = {"bf16": [], "fp8": a.parity_fp8_override}
    return {p: common + [f"model.base_precision={p}", *extra[p], f"hydra.run.dir={out / f'parity_{p}'}"]
            for p in ("bf16", "fp8")}


def loss_parity(a, out: Path) -> dict:
    """The per-step training losses of parity_commands' two runs and their relative gaps."""
    curves: dict[str, list[float]] = {}
    result: dict = {"steps": a.parity_steps, "layers": a.parity_layers, "arch": a.arch}
    for label, cmd in parity_commands(a, out).items():
        t0 = time.monotonic()
        with open(out / f"parity_{label}.log", "w") as log:
            code = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, timeout=a.timeout,
                                  env=os.environ | {"PYTHONUNBUFFERED": "1"}).returncode
        result[f"{label}_wall_s"] = round(time.monotonic() - t0, 1)
        result[f"{label}_command"] = " ".join(cmd[1:])
        run_dir = out / f"parity_{label}"
        if code != 0:
            result["status"] = f"{label} failed (exit {code})"
            return result
        curves[label] = train_losses(run_dir / "logs" / "metrics.csv")
    n = min(len(c) for c in curves.values())
    gaps = [abs(f - b) / abs(b) for b, f in zip(curves["bf16"][:n], curves["fp8"][:n])]
    return result | {"status": "ok", "bf16": curves["bf16"], "fp8": curves["fp8"], "compared_steps": n,
                     "max_rel_gap": max(gaps), "mean_rel_gap": sum(gaps) / n,
                     "steps_within_1pct": sum(g <= 0.01 for g in gaps)}


def train_losses(metrics_csv: Path) -> list[float]:
    """train/loss of each logged optimizer step, in step order (Lightning's CSV: one row per logged step)."""
    import csv

    rows = [r for r in csv.DictReader(open(metrics_csv)) if r.get("train/loss")]
    return [float(r["train/loss"]) for r in sorted(rows, key=lambda r: int(r["step"]))]


def uses_real_data(name: str) -> bool:
    """The variants that train on converted counsel-chat + ESConv (REAL_DATA), skipped where it is missing."""
    return name.startswith(("real_", "qlora_24gb")) or name in PEERS


def compile_cache(a) -> Path:
    """The _cold / _warm variants' model.compile_cache_dir: outside OUT (a GPU call brings OUT back)."""
    return a.scratch / "compile_cache"


def random_model_dir(a) -> Path:
    """Where the qlora variants find the random model they load in 4 bits (24 GB for the 12B: not beside the
    results); run_variant saves it once."""
    return a.scratch / f"random-{a.arch}"


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
    if name in PLAIN_LOOPS:
        cmd = [sys.executable, __file__, "--_plain", "--arch", a.arch, "--seq", str(a.seq), "--device", a.device,
               "--warmup", str(a.warmup), "--micro-batches", str(a.plain_steps), "--out", str(out)]
        cmd += ["--_liger"] if name == "plain_liger" else []
    elif name in PEERS:
        cmd = [sys.executable, str(REPO / "scripts" / "trl_peer.py"), "--out", str(out / f"{name}.json"),
               "--arch", a.arch, "--seq", str(a.seq), "--warmup", str(a.warmup),
               "--micro-batches", str(a.micro_batches)]
    else:
        missing = [f for f in REAL_DATA if not (REPO / f).exists()] if uses_real_data(name) else []
        if missing:
            print(f"skipping {name}: {missing} missing (scripts/convert_counsel_chat.py, convert_esconv.py)")
            return {"status": "skipped"}
        if name.startswith("qlora") and not (random_model_dir(a) / "config.json").exists():
            subprocess.run([sys.executable, __file__, "--_save-random", str(random_model_dir(a)), "--arch", a.arch],
                           check=True)
        if name.endswith("_cold"):
            shutil.rmtree(compile_cache(a), ignore_errors=True)
        cmd = train_args(name, a, out)
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
    summary = out / name / "summary.json"
    if summary.exists():  # a compiled run's graphs taken from / added to the compile caches
        result["compile_cache"] = json.loads(summary.read_text()).get("model", {}).get("compile_cache")
    if (out / f"{name}.json").exists():
        return result | {"status": "ok"} | json.loads((out / f"{name}.json").read_text())
    if returncode is None:
        return result | {"status": f"timeout ({a.timeout} s)"}
    oom = "OutOfMemoryError" in text or "out of memory" in text
    result["status"] = "out_of_memory" if oom else f"failed (exit {returncode})"
    if not oom:
        print(f"--- {name} failed; the end of {out / name}.log:\n" + "\n".join(text.splitlines()[-25:]))
    return result


def parser() -> argparse.ArgumentParser:
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
    p.add_argument("--loss-parity", action="store_true",
                   help="instead of variants: bf16 against model.base_precision=fp8, OUT/loss_parity.json")
    p.add_argument("--parity-steps", type=int, default=200, help="optimizer steps of each --loss-parity run")
    p.add_argument("--parity-layers", type=int, default=8, help="decoder layers of --arch that --loss-parity keeps")
    p.add_argument("--parity-fp8-override", action="append", default=[], metavar="KEY=VALUE",
                   help="an override for --loss-parity's fp8 run only (repeatable), e.g. model.fp8_grad_dtype=e4m3")
    p.add_argument("--_plain", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--_liger", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--_save-random", type=Path, help=argparse.SUPPRESS)
    return p


def main() -> None:
    p = parser()
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
    if a.loss_parity:
        r = loss_parity(a, a.out)
        (a.out / "loss_parity.json").write_text(json.dumps(r, indent=2))
        if r["status"] == "ok":
            print(f"loss parity: {r['compared_steps']} steps, max relative gap {r['max_rel_gap']:.4f}, "
                  f"{r['steps_within_1pct']} within 1%")
        else:
            print(f"loss parity: {r['status']}; see {a.out}/parity_*.log")
        sys.exit(0 if r["status"] == "ok" else 1)
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
    if not any(r["status"] == "ok" for r in results.values()):  # a GPU call must not read as a success
        statuses = ", ".join(sorted({r["status"] for r in results.values()}))
        sys.exit(f"benchmark.py: no variant produced a result ({statuses}); see {a.out}/VARIANT.log")


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
