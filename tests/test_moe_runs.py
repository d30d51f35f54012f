"""Every conf/moe entry trains through train.py and reports its routing metrics; domain routing on real data."""

from __future__ import annotations

import csv
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import COUNSEL_CHAT_CSV, FAST, REPO, read_summary, run_train

MOE_CONFIGS = sorted(p.stem for p in (REPO / "conf" / "moe").glob("*.yaml") if p.stem != "none")
METRICS = {"load", "cv", "maxvio", "entropy", "effective_expert_fraction", "dead_fraction", "active_experts", "dropped_fraction"}


@pytest.mark.slow
def test_every_moe_config_trains_and_reports_routing_metrics_in_one_sweep(tmp_path):
    """One multirun over every conf/moe entry (one process: the start-up is paid once): each trial trains,
    reports its routing metrics and writes its heatmap, and the sweep tables every trial with its override."""
    sweep = tmp_path / "sweep"
    out = run_train("-m", f"moe={','.join(MOE_CONFIGS)}", f"hydra.sweep.dir={sweep}", *FAST, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:]
    assert f"Sweep of {len(MOE_CONFIGS)} runs" in out.stdout
    with open(sweep / "sweep_summary.csv") as f:
        rows = {r["overrides"]: r for r in csv.DictReader(f)}
    assert set(rows) == {f"moe={name}" for name in MOE_CONFIGS}
    for job in sorted(p for p in sweep.iterdir() if p.is_dir()):
        name = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())[0].split("=")[1]
        s = read_summary(job)
        assert s["stop_reason"] == "max_steps" and s["global_step"] == 4 and rows[f"moe={name}"]["val_loss"]
        assert set(s["routing"]) == {f"layer{i}" for i in s["model"]["moe_layers"]}, name
        for layer in s["routing"].values():
            assert METRICS <= set(layer) and abs(sum(layer["load"]) - 1) < 1e-4
        assert s["active_experts"] > 0 and s["active_expert_flops_vs_top_k"] > 0
        assert (job / "routing" / "domain_expert_matrix.png").stat().st_size > 1000
        ckpt = torch.load(job / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
        if name == "deepseek":  # the aux-loss-free bias is trained state: in the summary and in the checkpoint
            bias_keys = [k for k in ckpt["state_dict"] if k.endswith("e_score_correction_bias")]
            assert len(bias_keys) == 4 and any(ckpt["state_dict"][k].abs().sum() > 0 for k in bias_keys)
            assert all(len(layer["bias"]) == 4 for layer in s["routing"].values())
            assert set(ckpt["router_state"]) == set(s["model"]["moe_layers"])  # loads since the last bias step
        if name == "switch":
            assert all(0 <= layer["dropped_fraction"] < 1 for layer in s["routing"].values())


@pytest.mark.slow
@pytest.mark.skipif(not COUNSEL_CHAT_CSV.is_file(), reason="../shared/datasets/counsel_chat is not beside the repo")
def test_domain_supervision_routes_each_counsel_chat_domain_to_its_expert(tmp_path):
    """+recipe=counsel_chat_tiny: turn-level routing (on counsel-chat, from the opening prompt), domain-supervised
    (MOE_TRAINING_GUIDE.md section 5 quotes the matrix)."""
    converted = tmp_path / "counsel_chat.jsonl"
    conv = subprocess.run([sys.executable, str(REPO / "scripts" / "convert_counsel_chat.py"), "--out", str(converted)],
                          capture_output=True, text=True, timeout=120)
    assert conv.returncode == 0, conv.stderr
    # the recipe at 120 steps and 256 tokens (the prompts, which the routing reads, are short): a third of the cost
    out = run_train("+recipe=counsel_chat_tiny", f"data.train_files=[{converted}]", f"hydra.run.dir={tmp_path}/run",
                    "data.max_length=256", "trainer.max_steps=120", "trainer.val_check_interval=120", timeout=600)
    assert out.returncode == 0, out.stdout[-3000:]
    s = read_summary(tmp_path / "run")
    m, counts = s["domain_expert_matrix"], s["data"]["val"]["by_domain"]
    rows = m["all_layers"]
    # each domain with enough validation conversations to measure (bias_detection has 10) peaks on its own expert
    large = [i for i, d in enumerate(m["domains"]) if counts[d] >= 30]
    assert len(large) == 3 and all(rows[i].index(max(rows[i])) == i for i in large), rows
    assert m["nmi"] > 0.12, m["nmi"]  # 0 when routing says nothing of the domain (measured 0.18 here)
