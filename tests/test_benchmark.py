"""scripts/benchmark.py on CPU with the tiny architecture: the plain transformers + PEFT baseline and the
real train.py path both run, count real tokens only, and use the FLOP formula of the guide (hand count)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from conftest import REPO, clean_env, run_script

SEQ = 64


@pytest.mark.slow
def test_benchmark_runs_both_paths_and_counts_real_tokens_and_model_flops(tmp_path):
    out = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "benchmark.py"), "--out", str(tmp_path), "--recipe", "none",
         "--arch", "tiny-mistral", "--device", "cpu", "--seq", str(SEQ), "--only", "plain,moe,nomoe",
         "--warmup", "1", "--micro-batches", "8", "--plain-steps", "2", "--override", "data.batch_size=8",
         "+callbacks.phases={_target_: phase_timer.PhaseTimer, out: '${run_dir}/phases.json', first: 2}"],
        cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert {k: r["status"] for k, r in results.items()} == {"plain": "ok", "moe": "ok", "nomoe": "ok"}
    assert "vs (a)" in out.stdout and "1.00x" in out.stdout  # the table, with the plain loop as the base

    # every synthetic conversation is longer than SEQ and truncated to it: no padding, all tokens real; 9 micro-
    # batches of 8 need more rows than the 57 of a 64-row set's training split: the set grows, no epoch end is timed
    for name in ("moe", "nomoe"):
        r = results[name]
        assert r["smallest_micro_batch"] == r["micro_batch_size"] == 8 and r["epochs_crossed"] == 0
        assert r["real_tokens"] == 8 * 8 * SEQ == r["padded_tokens"] * 8
        assert r["tokens_per_s"] == r["real_tokens"] / r["seconds"]
    assert results["moe"]["trainable_params"] > results["nomoe"]["trainable_params"]

    # gpu_recipe_check.sh's PhaseTimer, in the same runs: every micro-batch once, in its phase (the tiny default
    # logs every 5 optimizer steps: the 5th micro-batch is a logged step), and no more time than the run's own
    phases = json.loads((tmp_path / "moe" / "phases.json").read_text())
    counts = {k: v["micro_batches"] for k, v in phases["phases"].items()}
    assert counts == {"first": 2, "logged_steps": 1, "other": 6}, counts
    assert sum(v["tokens"] for v in phases["phases"].values()) == 9 * 8 * SEQ
    assert [r["logged"] for r in phases["micro_batches"]].index(True) == 4
    inside = sum(v["device_s"] + v["wait_before_s"] for v in phases["phases"].values())
    assert 0 < inside <= phases["wall_s"] and phases["outside_micro_batches_s"] >= 0

    # (a)'s model FLOPs: F = 4N + 6P + 6*L*H*d*S per token (lm_head in N, LoRA r16 on all 7 projections in P)
    h, i, L, nh, nkv, d, V, r = 128, 352, 4, 4, 2, 32, 2048, 16
    n = L * (h * nh * d + 2 * h * nkv * d + nh * d * h + 3 * h * i) + V * h
    p = L * r * ((h + nh * d) + 2 * (h + nkv * d) + (nh * d + h) + 2 * (h + i) + (i + h))
    plain = results["plain"]
    assert plain["trainable_params"] == p
    assert plain["real_tokens"] == 2 * 4 * SEQ
    assert plain["model_flops"] == plain["real_tokens"] * (4 * n + 6 * p + 6 * L * nh * d * SEQ)


def test_memory_trace_replay_finds_the_peak_and_who_allocated_it():
    """peak_allocations replays the allocator's trace: the peak is the highest net total, and only blocks alive at
    that moment count, grouped by the Python frames that allocated them (torch.nn's call frames skipped)."""
    sys.path.insert(0, str(REPO / "scripts"))
    from step_timer import peak_allocations

    def frames(name):
        return [{"filename": "/x/torch/nn/modules/module.py", "line": 1, "name": "_call_impl"},
                {"filename": f"/x/{name}.py", "line": 7, "name": name}]

    trace = [
        {"action": "alloc", "addr": 1, "size": 100, "frames": frames("attn")},
        {"action": "alloc", "addr": 2, "size": 300, "frames": frames("mlp")},
        {"action": "free_completed", "addr": 1, "size": 100, "frames": []},
        {"action": "alloc", "addr": 3, "size": 250, "frames": frames("mlp")},  # peak: 300 + 250
        {"action": "alloc", "addr": 4, "size": 50, "frames": []},  # the autograd engine: no Python frame
        {"action": "free_completed", "addr": 2, "size": 300, "frames": []},
        {"action": "free_completed", "addr": 9, "size": 40, "frames": []},  # allocated before the trace began
        {"action": "alloc", "addr": 5, "size": 200, "frames": frames("attn")},
    ]
    peak, groups = peak_allocations(trace)
    assert peak == 600
    assert groups == [("mlp.py:7 mlp", (550, 2)), ("(no Python frame: autograd engine)", (50, 1))]


def test_a_variant_past_its_timeout_is_recorded_and_the_next_still_runs(tmp_path):
    """A GPU call has one time limit: a variant that overruns --timeout must not crash the driver and lose the
    variants already measured (1 s is less than train.py's own start-up); when none produced a result, the
    driver still prints the table and exits non-zero, so the call does not read as a success."""
    out = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "benchmark.py"), "--out", str(tmp_path), "--recipe", "none",
         "--arch", "tiny-mistral", "--device", "cpu", "--seq", str(SEQ), "--only", "moe,nomoe", "--timeout", "1"],
        cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "no variant produced a result" in out.stderr, out.stdout[-3000:] + out.stderr
    results = json.loads((tmp_path / "results.json").read_text())
    assert {k: r["status"] for k, r in results.items()} == {"moe": "timeout (1 s)", "nomoe": "timeout (1 s)"}
    assert "variant" in out.stdout  # the table is still printed


def _benchmark():
    sys.path.insert(0, str(REPO / "scripts"))
    import benchmark

    return benchmark


@pytest.mark.slow  # ~45 compositions
def test_every_train_variant_composes_validates_and_names_a_local_tokenizer(tmp_path):
    """Each train.py variant's overrides compose into a valid config whose tokenizer is a local folder (the
    benchmark runs offline): a renamed recipe, key or bundled folder fails here, not after a GPU call's start-up
    (the qlora variants named a tokenizer folder that had moved)."""
    from hydra import compose, initialize_config_dir

    from lightning_moe.config import validate_config
    from lightning_moe.models.tokenizer import tokenizer_source
    from lightning_moe.paths import resolve_path

    bench = _benchmark()
    # a short --seq: the synthetic variants write their rows here (2048-token rows take seconds each)
    a = bench.parser().parse_args(["--out", str(tmp_path), "--scratch", str(tmp_path / "scratch"), "--seq", "64",
                                   "--parity-fp8-override", "model.fp8_grad_dtype=e4m3"])
    names = [f"longest_{a.longest.split(',')[0]}" if n == "longest" else n for n in bench.VARIANTS
             if n not in bench.PLAIN_LOOPS + bench.PEERS]
    assert "qlora" in names and "real_h100_compile" in names
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):  # once: composing is the cost
        configs = {}
        for name in names:
            cmd = bench.train_args(name, a, tmp_path)
            assert cmd[1] == str(REPO / "train.py"), name
            overrides = [o for o in cmd[2:] if not o.startswith("hydra.")]  # train.py's own Hydra settings
            configs[name] = compose("train", overrides=[*overrides, f"run_dir={tmp_path / name}"])
        for name, cmd in bench.parity_commands(a, tmp_path).items():  # --loss-parity's two runs
            overrides = [o for o in cmd[2:] if not o.startswith("hydra.")]
            configs[f"parity_{name}"] = compose("train", overrides=[*overrides, f"run_dir={tmp_path / name}"])
    assert configs["parity_fp8"].model.base_precision == "fp8" and configs["parity_fp8"].model.dtype == "bfloat16"
    assert configs["parity_fp8"].model.fp8_grad_dtype == "e4m3" and configs["parity_bf16"].model.fp8_grad_dtype == "e5m2"
    for name, cfg in configs.items():
        sections = validate_config(cfg)
        if sections.model.tokenizer is not None:  # unset: a random model falls back to the bundled one
            source = tokenizer_source(sections.model)
            assert resolve_path(source).is_dir(), f"{name}: model.tokenizer={source}, not a local folder"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without a GPU")
def test_benchmark_on_a_cpu_says_it_needs_cuda_and_exits_non_zero(tmp_path):
    """Issue #26 item 7: `scripts/benchmark.py --out DIR` on a CPU exited 0 after every variant failed."""
    out = run_script(REPO / "scripts" / "benchmark.py", "--out", tmp_path / "bench")
    assert out.returncode == 2 and "no CUDA GPU" in out.stderr, out.stderr[-2000:]


def test_the_trl_peer_counts_each_packed_conversation_by_where_its_positions_restart():
    """trl_peer.py's MFU counts each conversation's own attention: the lengths come from position_ids restarting."""
    sys.path.insert(0, str(REPO / "scripts"))
    import torch
    from trl_peer import segment_lengths

    assert segment_lengths(torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])) == [3, 2, 4]
    assert segment_lengths(torch.arange(5)[None]) == [5]
