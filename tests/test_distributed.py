"""Several processes (gloo on a CPU): routing state the same on every rank and equal to one process over the same
global batch, SIGTERM to one process of a 2-process run, and 2 nodes simulated on one machine."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import FAST, REPO, clean_env, free_port, read_summary, run_train, train_cmd

from lightning_moe.moe.layer import RouterRecord
from lightning_moe.moe.metrics import RoutingTally
from lightning_moe.moe.routers.deepseek import DeepSeekRouter

H, E, STEPS, TOKENS = 16, 4, 6, 32


def _route(rank: int, world: int, out: str) -> None:
    """STEPS optimizer steps of one DeepSeek router over this rank's share of each step's global batch."""
    if world > 1:
        dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    router = DeepSeekRouter(H, E, 2, init_std=1.0, bias_update_rate=0.05)
    tally = RoutingTally(E, ["a", "b"], 2)
    reduce = (lambda t: (dist.all_reduce(t), t)[1]) if world > 1 else (lambda t: t)
    for step in range(STEPS):
        x = torch.randn(TOKENS, H, generator=torch.Generator().manual_seed(step)) + 0.5 * step
        domain = torch.arange(TOKENS) % 2
        mine = slice(rank, None, world)  # this rank's tokens of the global batch
        mask = torch.ones(TOKENS // world, dtype=torch.bool)
        out_ = router(x[mine], mask)
        router.observe(out_.selected & mask.unsqueeze(-1))
        tally.add([RouterRecord(0, out_, mask, domain[mine], torch.zeros_like(mask, dtype=torch.long), 1, router,
                                out_.gates, mask, domain[mine])])
        router.after_optimizer_step(lambda t: reduce(t.clone()))
    metrics = {k: v.tolist() for k, v in tally.per_layer(lambda t: reduce(t.clone()))["layer0"].items()}
    matrix = tally.matrix(lambda t: reduce(t.clone()))["all_layers"]
    torch.save({"bias": router.e_score_correction_bias, "metrics": metrics, "matrix": matrix}, f"{out}.{rank}")
    if world > 1:
        dist.destroy_process_group()


def test_routing_state_is_identical_on_every_rank_and_equals_one_process_over_the_global_batch(tmp_path, monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    mp.spawn(_route, args=(2, str(tmp_path / "two")), nprocs=2, join=True)
    _route(0, 1, str(tmp_path / "one"))
    r0, r1, one = (torch.load(tmp_path / f, weights_only=False) for f in ("two.0", "two.1", "one.0"))
    assert torch.equal(r0["bias"], r1["bias"]) and torch.equal(r0["bias"], one["bias"])  # bit-identical
    assert r0["bias"].abs().sum() > 0  # it moved
    for key in ("load", "entropy", "active_experts", "dead_fraction"):
        assert r0["metrics"][key] == r1["metrics"][key]
        assert torch.allclose(torch.tensor(r0["metrics"][key]), torch.tensor(one["metrics"][key]), atol=1e-6), key
    assert r0["matrix"] == r1["matrix"]
    assert torch.allclose(torch.tensor(r0["matrix"]), torch.tensor(one["matrix"]), atol=1e-6)


def _children(pid: int) -> list[int]:
    return [int(c) for c in (Path("/proc") / str(pid) / "task" / str(pid) / "children").read_text().split()]


@pytest.mark.slow
@pytest.mark.xdist_group("ddp")  # one DDP run at a time: 4 gloo ranks on 2 cores crawl
@pytest.mark.parametrize("target", ["launcher", "rank1"])
def test_sigterm_to_one_process_of_two_stops_both_at_one_step_and_resumes(tmp_path, target):
    """The launcher (rank 0, which passes the signal on) or rank 1 alone gets SIGTERM; both ranks stop after the same
    micro-batch (SigtermSync; Lightning alone lets the signalled rank leave while the other waits in a collective),
    one checkpoint of that step is written, the launcher exits 143 and the run resumes on 2 processes."""
    run = tmp_path / "run"
    args = [f"hydra.run.dir={run}", "trainer.strategy=ddp", "trainer.devices=2", "moe=deepseek",
            "trainer.max_steps=3000", "data.max_length=64", "data.batch_size=2",
            "callbacks.model_checkpoint.every_n_train_steps=5", "trainer.val_check_interval=100000"]
    proc = subprocess.Popen(train_cmd(*args), cwd=REPO, env=clean_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 180
    while not (run / "checkpoints" / "step000005.ckpt").exists():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.2)
    os.kill(proc.pid if target == "launcher" else _children(proc.pid)[0], signal.SIGTERM)
    try:
        output = proc.communicate(timeout=120)[0]
    except subprocess.TimeoutExpired:
        for pid in [*_children(proc.pid), proc.pid]:
            os.kill(pid, signal.SIGKILL)
        raise AssertionError(f"SIGTERM to the {target} left the run hanging: " + proc.communicate()[0][-3000:])
    assert proc.returncode == 143, output[-3000:]
    assert "[rank: 1] Received SIGTERM" in output
    s = read_summary(run)
    last = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert s["stop_reason"] == "sigterm" and last["global_step"] == s["global_step"] >= 5
    if target == "rank1":
        return
    stopped = s["global_step"]
    out = run_train(*[a.replace("max_steps=3000", f"max_steps={stopped + 4}") for a in args], timeout=300)
    assert out.returncode == 0, out.stdout[-3000:]
    t = read_summary(run)
    assert t["resumed_from"] and t["global_step"] == stopped + 4 and t["world_size"] == 2


@pytest.mark.slow
@pytest.mark.xdist_group("ddp")  # one DDP run at a time: 4 gloo ranks on 2 cores crawl
def test_two_nodes_on_one_machine_train_into_one_run_directory(tmp_path):
    """Lightning's num_nodes=2 with MASTER_ADDR=127.0.0.1 and NODE_RANK 0/1, one process a node, as a cluster
    without a scheduler would start them: one run directory, written by global rank 0."""
    run = tmp_path / "run"
    port = str(free_port())
    procs = [subprocess.Popen(train_cmd(f"hydra.run.dir={run}", "trainer.strategy=ddp", "trainer.devices=1",
                                        "trainer.num_nodes=2", *FAST),
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=clean_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, NODE_RANK=str(rank)))
             for rank in (0, 1)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    s = read_summary(run)
    assert s["world_size"] == 2 and s["global_step"] == 4 and s["stop_reason"] == "max_steps"
    assert json.loads((run / "summary.json").read_text())["run_dir"] == str(run)
    assert sorted(p.name for p in (run / "checkpoints").glob("last*.ckpt")) == ["last.ckpt"]
    assert "Run finished" in outputs[0] and "Run finished" not in outputs[1]  # reported once, by global rank 0


def _step_losses(run_dir: Path) -> list[float]:
    import csv

    with open(run_dir / "logs" / "metrics.csv") as f:
        return [float(r["train/lm_loss"]) for r in csv.DictReader(f) if r.get("train/lm_loss")]


# 7 conversations kept (every 32nd of the bundled sample: each domain) -> 4 a rank, 2 micro-batches of 2 an epoch;
# 2 optimizer steps at accumulation 2, one an epoch. LoRA dropout on (each rank's RNG matters). Small on purpose:
# each of the test's 3 launches is 2 processes, and their start-up is most of its cost.
DDP_RESUME = ["trainer.strategy=ddp", "trainer.devices=2", "trainer.max_steps=2", "trainer.accumulate_grad_batches=2",
              "data.batch_size=2", "data.max_length=64", "lora.dropout=0.1", "trainer.limit_val_batches=0",
              "trainer.log_every_n_steps=1", "callbacks.model_checkpoint.every_n_train_steps=100"]


@pytest.mark.slow
@pytest.mark.xdist_group("ddp")  # one DDP run at a time: 4 gloo ranks on 2 cores crawl
def test_ddp_sigterm_mid_accumulation_then_the_same_command_matches_an_uninterrupted_run(tmp_path):
    """README: "after SIGTERM (exit 143) the same command resumes", with "trainer.strategy=ddp trainer.devices=2"
    as with one process (MOE_TRAINING_GUIDE.md section 6: "The resumed run matches an uninterrupted one"): exact
    resume, byte for byte. Each rank has state of its own that rank 0's checkpoint must carry: its place in its
    share of the shuffled data (a later epoch's order, here), its RNG (dropout masks) and the gradients of its
    half-accumulated step. SIGTERM comes after micro-batch 2: the first of step 2's window and of epoch 1."""
    whole, cut, data = tmp_path / "whole", tmp_path / "cut", tmp_path / "conversations.jsonl"
    data.write_text("".join((REPO / "data" / "therapeutic_sample.jsonl").read_text().splitlines(keepends=True)[::32]))
    args = [*DDP_RESUME, f"data.train_files=[{data}]"]
    env = clean_env(PYTHONPATH=str(REPO / "tests"))
    out = run_train(*args, f"hydra.run.dir={whole}", env=env, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:]
    fault = f"+callbacks.fault={{_target_: faults.SigtermAt, marker: {tmp_path}/fired, train_batch: 2}}"
    first = run_train(*args, fault, f"hydra.run.dir={cut}", env=env, timeout=600)
    assert first.returncode == 143, first.stdout[-3000:]
    stopped = torch.load(cut / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert (stopped["global_step"], stopped["epoch"]) == (1, 1)  # mid-accumulation, mid-epoch, past an epoch's end
    second = run_train(*args, fault, f"hydra.run.dir={cut}", env=env, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:]
    assert read_summary(cut)["resumed_from"] and read_summary(cut)["world_size"] == 2
    assert _step_losses(cut) == _step_losses(whole) and len(_step_losses(whole)) == 2
    a, b = (torch.load(r / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
            for r in (whole, cut))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
