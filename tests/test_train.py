"""`train.py` end to end, as a user runs it: real subprocesses, real Hydra, real Lightning."""

from __future__ import annotations

import csv
import subprocess
import sys

import pytest
import torch
from conftest import COUNSEL_CHAT_CSV, FAST, REPO, clean_env, read_summary, run_train, tiny_model

SUMMARY_KEYS = {"stop_reason", "global_step", "train_loss", "val_loss", "last_checkpoint", "elapsed_s", "tokens_per_s", "expert_load"}


def _load_ckpt(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


@pytest.mark.slow
def test_default_run_trains_validates_checkpoints_and_logs(trained_run):
    """`python train.py` with no arguments but the run dir (the shared `trained_run`): the embedded tiny default.
    That it is small (and so quick: README.md quotes the measured time) is checked by what it runs, not by a
    stopwatch: 40 optimizer steps of a 4-layer, 128-wide model with under 2M parameters, two validations."""
    run_dir = trained_run
    s = read_summary(run_dir)
    assert SUMMARY_KEYS <= set(s)
    assert s["stop_reason"] == "max_steps" and s["global_step"] == 40
    assert s["model"]["total_params"] < 2_000_000 and s["data"]["train"]["conversations"] <= 300
    with open(run_dir / "logs" / "metrics.csv") as f:
        assert len({r["step"] for r in csv.DictReader(f) if r.get("val/loss")}) == 2  # validations at 20 and 40
    assert s["train_loss"] < s["first_train_loss"] - 0.3, (s["first_train_loss"], s["train_loss"])
    assert s["tokens_per_s"] > 0 and s["val_loss"] is not None
    # per MoE layer, a load fraction per expert
    assert sorted(s["expert_load"]) == ["layer0", "layer1", "layer2", "layer3"]
    for fractions in s["expert_load"].values():
        assert len(fractions) == 4 and abs(sum(fractions) - 1) < 1e-4
    matrix = s["domain_expert_matrix"]
    assert matrix["domains"] == ["psychology", "mental_health", "bias_detection", "general_therapeutic"]
    assert len(matrix["all_layers"]) == 4 and all(abs(sum(r) - 1) < 1e-4 for r in matrix["all_layers"])
    assert (run_dir / ".hydra" / "config.yaml").is_file() and (run_dir / "routing" / "latest.json").is_file()
    assert (run_dir / "routing" / "domain_expert_matrix.png").stat().st_size > 1000

    # checkpoints: last + periodic + best, holding only what trains
    ckpt = _load_ckpt(s["last_checkpoint"])
    assert ckpt["global_step"] == 40
    keys = list(ckpt["state_dict"])
    assert keys and all(("lora_" in k) or (".router." in k) or (".experts." in k) for k in keys)
    assert ckpt["base_model"]["architecture"]["num_hidden_layers"] == 4
    assert sum(v.numel() for v in ckpt["state_dict"].values()) == s["model"]["trainable_params"]
    assert s["model"]["trainable_params"] < s["model"]["total_params"] / 3  # the frozen base stays out
    assert any((run_dir / "checkpoints").glob("best-*.ckpt"))

    # logs: the loss, the LR, throughput on real tokens, per-layer expert load and routing entropy
    with open(run_dir / "logs" / "metrics.csv") as f:
        columns = set(next(csv.reader(f)))
    assert {"train/loss", "val/loss", "train/device/items_per_sec", "moe/layer0/load_e0", "moe/layer0/entropy"} <= columns
    assert any(c.startswith("lr-AdamW") for c in columns)
    assert "val_routing/psychology/e0" in columns


@pytest.mark.slow
@pytest.mark.xdist_group("ddp")  # one DDP run at a time: 4 gloo ranks on 2 cores crawl
def test_ddp_on_two_cpu_processes_writes_one_run_dir_and_crosses_uneven_epochs_without_a_hang(tmp_path):
    """2 gloo processes, micro-batches by tokens over a small file: the epoch's 9 micro-batches are evened out to 5
    a rank (unequal counts would hang at the epoch's end), three epochs end, DeepSeek's bias sums both ranks' loads."""
    run_dir = tmp_path / "runs" / "ddp"
    small = tmp_path / "small.jsonl"
    small.write_text("".join((REPO / "data" / "therapeutic_sample.jsonl").read_text().splitlines(True)[:21]))
    out = run_train(f"hydra.run.dir={run_dir}", "trainer.strategy=ddp", "trainer.devices=2", "moe=deepseek",
                    f"data.train_files=[{small}]", "data.batch_tokens=256", "data.max_length=128", "data.packing=true",
                    "trainer.max_steps=12", "trainer.val_check_interval=12", "trainer.limit_val_batches=2", timeout=300)
    assert out.returncode == 0, out.stdout[-3000:]
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["ddp"]
    s = read_summary(run_dir)
    assert s["world_size"] == 2 and s["global_step"] == 12 and s["stop_reason"] == "max_steps" and s["epoch"] >= 2
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert any(abs(b) > 0 for layer in s["routing"].values() for b in layer["bias"])
    # the routing metrics are summed over ranks before they are logged: no "use sync_dist=True" warning per metric
    assert "sync_dist=True" not in out.stdout, [l for l in out.stdout.splitlines() if "sync_dist" in l][:3]


@pytest.mark.slow
@pytest.mark.skipif(not COUNSEL_CHAT_CSV.is_file(), reason="../shared/datasets/counsel_chat is not beside the repo")
def test_counsel_chat_converter_output_trains(tmp_path):
    converted = tmp_path / "counsel_chat.jsonl"
    conv = subprocess.run([sys.executable, str(REPO / "scripts" / "convert_counsel_chat.py"), "--out", str(converted)],
                          capture_output=True, text=True, timeout=120)
    assert conv.returncode == 0, conv.stderr
    out = run_train("data=counsel_chat", f"data.train_files=[{converted}]", f"hydra.run.dir={tmp_path}/run", *FAST)
    assert out.returncode == 0, out.stdout[-3000:]
    s = read_summary(tmp_path / "run")
    seen = s["data"]["train"]["by_domain"]
    assert set(seen) == {"psychology", "mental_health", "bias_detection", "general_therapeutic"}
    assert s["data"]["train"]["conversations"] + s["data"]["val"]["conversations"] == 2009


@pytest.mark.slow
def test_wandb_is_offline_without_a_key_and_packing_trains(tmp_path):
    run_dir = tmp_path / "run"
    out = run_train(f"hydra.run.dir={run_dir}", "logger=wandb", "data.packing=true", *FAST, timeout=180)
    assert out.returncode == 0, out.stdout[-3000:]
    assert list((run_dir / "wandb").glob("offline-run-*")), "wandb did not write an offline run"
    # the domain x expert heatmap goes to wandb as an image when wandb is on
    assert list((run_dir / "wandb").glob("offline-run-*/files/media/images/val_routing/domain_expert_matrix*.png"))
    s = read_summary(run_dir)
    assert s["stop_reason"] == "max_steps" and s["tokens_per_s"] > 0


@pytest.mark.slow
def test_time_budget_stops_with_a_checkpoint_of_the_final_step(tmp_path):
    # tests/faults.py's FakeClock (each micro-batch 1 s of the budget, as CONTRIBUTING.md says budgets are tested):
    # the budget's rules decide when it stops, in a few tiny steps rather than 8 real seconds of training
    run_dir = tmp_path / "run"
    clock = "+callbacks.clock={_target_: faults.FakeClock, step_seconds: 1.0}"
    out = run_train(f"hydra.run.dir={run_dir}", "trainer.max_time=00:00:00:08", "trainer.max_steps=100000",
                    "callbacks.model_checkpoint.every_n_train_steps=1000", "logger=tensorboard", "data.max_length=128",
                    clock, env=clean_env(PYTHONPATH=str(REPO / "tests")))
    assert out.returncode == 0, out.stdout[-3000:]
    s = read_summary(run_dir)
    assert s["stop_reason"] == "time_budget" and 0 < s["global_step"] < 100000
    assert _load_ckpt(s["last_checkpoint"])["global_step"] == s["global_step"]
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.slow
def test_qlora_through_train_py(tmp_path):
    """4-bit nf4 base (bitsandbytes on CPU) + LoRA + MoE, from a local model directory, with bitsandbytes' 8-bit
    AdamW (optim.name=adamw_8bit): the memory-floor pair."""
    tiny_model("tiny-mistral").save_pretrained(tmp_path / "model")
    out = run_train(f"model.name_or_path={tmp_path / 'model'}", "model.init=pretrained", "model.load_in_4bit=true",
                    "model.bnb_4bit_compute_dtype=float32", "optim.name=adamw_8bit", f"hydra.run.dir={tmp_path}/run",
                    *FAST)
    assert out.returncode == 0, out.stdout[-3000:]
    assert "in eval mode at the start of training" not in out.stdout  # Lightning's own check: from_pretrained
    s = read_summary(tmp_path / "run")
    assert s["stop_reason"] == "max_steps" and s["global_step"] == 4
    assert s["model"]["linear_4bit_modules"] == 4 * 7 and s["model"]["moe_layers"] == [0, 1, 2, 3]
    assert s["model"]["trainable_params"] < s["model"]["total_params"] / 2
    states = torch.load(s["last_checkpoint"], weights_only=False)["optimizer_states"][0]["state"].values()
    moments = [st.get("__bnb_optimizer_quant_state__", st)["state1"] for st in states]  # first moments
    assert all(m.dtype == (torch.uint8 if m.numel() >= 4096 else torch.float32) for m in moments)  # bnb: small in fp32
    assert any(m.dtype == torch.uint8 for m in moments)


@pytest.mark.slow
def test_recipe_training_path_bf16_fused_adamw_clipping_checkpointing(tmp_path):
    """therapeutic_h100's optimisation settings on the tiny architecture: bf16-mixed, fused AdamW with gradient
    clipping (which Lightning's mixed-precision plugin refuses on its own), selective activation checkpointing
    (the recipe's 4 of 40 layers becomes 2 of 4), workers."""
    run_dir = tmp_path / "run"
    out = run_train("+recipe=therapeutic_h100", "model.init=random", "model.arch=tiny-mistral", "moe.layers=[1,3]",
                    "model.tokenizer=bundled", "model.liger_kernel=false", "model.gradient_checkpointing=true",
                    "model.gradient_checkpointing_layers=2", "data=sample", "data.max_length=64", "data.batch_size=2",
                    "data.num_workers=2", "trainer.accelerator=cpu", "logger=csv", "trainer.max_steps=2",
                    "trainer.accumulate_grad_batches=2", "trainer.val_check_interval=4", "trainer.limit_val_batches=1",
                    "trainer.num_sanity_val_steps=0", f"hydra.run.dir={run_dir}")  # bf16 is emulated (slow) on CPU
    assert out.returncode == 0, out.stdout[-3000:]
    s = read_summary(run_dir)
    assert s["stop_reason"] == "max_steps" and s["global_step"] == 2 and s["model"]["moe_layers"] == [1, 3]
    assert s["model"]["checkpointed_layers"] == [1, 3]
    cfg = __import__("yaml").safe_load((run_dir / "config.yaml").read_text())
    assert cfg["trainer"]["precision"] == "bf16-mixed" and cfg["optim"]["fused"] and cfg["model"]["gradient_checkpointing"]
    assert cfg["trainer"]["gradient_clip_val"] == 1.0
