"""Reliability promises, each proven by a fault injected into a real train.py run (tests/faults.py):
exact resume after SIGTERM, budgets, checkpoint integrity, non-finite steps, bad configs, sweeps, secrets."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import FAST, REPO, clean_env, read_summary, run_guarded, run_train, train_cmd

from lightning_moe.checkpointing.io import AtomicCheckpointIO
from lightning_moe.checkpointing.resume import find_resume_checkpoint
from lightning_moe.models.prechecks import check_precision

FAULT_ENV = clean_env(PYTHONPATH=str(REPO / "tests"))
# 16 micro-batches = 8 optimizer steps at accumulation 2; validation after micro-batch 9 (step 5); periodic
# checkpoint every 3 steps; LoRA dropout on (so the RNG matters); DeepSeek routing (so the aux-free bias does)
RESUME_ARGS = ["moe=deepseek", "trainer.max_steps=8", "trainer.accumulate_grad_batches=2", "data.batch_size=2",
               "data.max_length=96", "trainer.val_check_interval=10", "trainer.limit_val_batches=2",
               "trainer.log_every_n_steps=1", "lora.dropout=0.1", "callbacks.model_checkpoint.every_n_train_steps=3"]


def _losses(run_dir: Path) -> list[float]:
    with open(run_dir / "logs" / "metrics.csv") as f:
        return [float(r["train/lm_loss"]) for r in csv.DictReader(f) if r.get("train/lm_loss")]


def _final(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    out = run_train(*RESUME_ARGS, f"hydra.run.dir={run_dir}")
    assert out.returncode == 0, out.stdout[-3000:]
    return run_dir


@pytest.mark.parametrize("where", [
    "train_batch=4",    # mid-accumulation: the first micro-batch of step 3's window is done
    "train_batch=5",    # just after the periodic checkpoint at step 3
    "validation=1",     # during the first validation
])
@pytest.mark.slow
@pytest.mark.xdist_group("uninterrupted")  # one worker trains the module fixture for all three
def test_sigterm_anywhere_then_resume_matches_an_uninterrupted_run(uninterrupted, tmp_path, where):
    run_dir = tmp_path / "run"
    fault = f"+callbacks.fault={{_target_: faults.SigtermAt, marker: {tmp_path}/fired, {where.replace('=', ': ')}}}"
    args = [*RESUME_ARGS, fault, f"hydra.run.dir={run_dir}"]
    first = run_train(*args, env=FAULT_ENV)
    assert first.returncode == 143, first.stdout[-3000:]
    assert read_summary(run_dir)["stop_reason"] == "sigterm"
    used_before = _final(run_dir)["callbacks"]["Budget"]["time_elapsed"]["train"]
    first_loss = read_summary(run_dir)["first_train_loss"]
    second = run_train(*args, env=FAULT_ENV)  # the same command
    assert second.returncode == 0, second.stdout[-3000:]
    assert read_summary(run_dir)["resumed_from"] and "Restored all states from the checkpoint" in second.stdout
    assert read_summary(run_dir)["first_train_loss"] == first_loss  # the run's, not the restart's

    expected, got = _losses(uninterrupted), _losses(run_dir)
    assert len(got) == len(expected) == 8  # one per optimizer step
    assert max(abs(a - b) for a, b in zip(got, expected)) < 1e-5, (got, expected)
    a, b = _final(uninterrupted), _final(run_dir)
    assert a["global_step"] == b["global_step"] == 8
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for k in a["state_dict"]:  # LoRA, routers, experts and the DeepSeek biases
        torch.testing.assert_close(b["state_dict"][k], a["state_dict"][k], rtol=0, atol=1e-6, msg=k)
    es = "EarlyStopping{'monitor': 'val/loss', 'mode': 'min'}"
    assert b["callbacks"][es]["wait_count"] == a["callbacks"][es]["wait_count"]
    assert float(b["callbacks"][es]["best_score"]) == pytest.approx(float(a["callbacks"][es]["best_score"]), abs=1e-5)
    assert b["callbacks"]["Budget"]["time_elapsed"]["train"] > used_before  # budget time carried over


@pytest.mark.slow
def test_sigterm_to_the_whole_process_group_still_saves_the_step_it_stopped_at(tmp_path):
    """A scheduler's SIGTERM often reaches every process of the job, the dataloader workers too (SLURM's scancel,
    `timeout`). The workers ignore it, so the main process saves the step it stopped at, as when it alone is
    signalled, instead of raising on a lost worker (exit 1) and leaving only the periodic checkpoint of step 3."""
    run_dir = tmp_path / "run"
    fault = f"+callbacks.fault={{_target_: faults.SigtermAt, marker: {tmp_path}/fired, train_batch: 8, group: true}}"
    out = subprocess.run(train_cmd(*RESUME_ARGS, "data.num_workers=2", fault, f"hydra.run.dir={run_dir}"), cwd=REPO,
                         env=FAULT_ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300,
                         start_new_session=True)  # its own process group: the signal must not reach pytest
    assert out.returncode == 143 and "killed by signal" not in out.stdout, out.stdout[-3000:]
    assert read_summary(run_dir)["stop_reason"] == "sigterm"
    assert _final(run_dir)["global_step"] == 4  # the steps done when it stopped (one per 2 micro-batches)


# The budget reads time.monotonic: under faults.FakeClock each micro-batch takes exactly STEP_S and nothing else
# takes any time, so how many steps a budget allows follows from its rules alone (a loaded CI machine once ran
# fewer steps in 12 real seconds than a wall-clock assertion expected).
STEP_S = 1.0
CLOCK = f"+callbacks.clock={{_target_: faults.FakeClock, step_seconds: {STEP_S}}}"
BUDGET_ARGS = ["trainer.max_steps=100000", "optim.budget_aware_schedule=true", "optim.warmup_steps=1",
               "callbacks.model_checkpoint.every_n_train_steps=100000", "trainer.val_check_interval=100000",
               "data.max_length=128", "trainer.log_every_n_steps=1", CLOCK]


@pytest.mark.slow
def test_twelve_second_budget_stops_in_time_with_a_checkpoint_and_a_finished_schedule(tmp_path):
    run_dir = tmp_path / "run"
    out = run_train("trainer.max_time=00:00:00:12", *BUDGET_ARGS, f"hydra.run.dir={run_dir}", env=FAULT_ENV)
    assert out.returncode == 0, out.stdout[-3000:]
    s = read_summary(run_dir)
    assert s["stop_reason"] == "time_budget" and s["budget"]["stopped_by_budget"]
    final = _final(run_dir)
    assert set(final["callbacks"]["Budget"]["step_times"]) == {STEP_S}  # what the budget measured: the clock's
    assert s["global_step"] == final["global_step"] and s["budget"]["used_s"] == s["global_step"] * STEP_S
    # inside the budget (the final validation and save take no time on this clock), and not at the first estimate
    assert 5 < s["global_step"] and s["budget"]["used_s"] <= 12, s["budget"]
    with open(run_dir / "logs" / "metrics.csv") as f:
        lrs = [float(r["lr-AdamW/pg1"]) for r in csv.DictReader(f) if r.get("lr-AdamW/pg1")]
    assert max(lrs) == pytest.approx(3e-3, rel=0.1)  # conf/train.yaml: optim.lr
    assert lrs[-1] < 0.15 * max(lrs), lrs[-5:]  # the cosine reached (near) its floor as the budget ended

    # resuming with a larger budget extends it; the time already used counts
    out = run_train("trainer.max_time=00:00:00:17", *BUDGET_ARGS, f"hydra.run.dir={run_dir}", env=FAULT_ENV)
    assert out.returncode == 0, out.stdout[-3000:]
    t = read_summary(run_dir)
    assert t["stop_reason"] == "time_budget" and t["global_step"] > s["global_step"]
    assert s["budget"]["used_s"] < t["budget"]["used_s"] == t["global_step"] * STEP_S <= 17


@pytest.mark.slow
def test_used_up_budget_stops_at_once_unless_reset(tmp_path):
    # on the fake clock, as the other budget tests: the two budgets that train cost 3 tiny steps each instead of 6
    # real seconds each. Steps of 2 s use the 6 s up (the clock stands still in the final validation, so with 1 s
    # steps the first run stops, by its estimate of that validation, with room for a step the resumed run takes)
    run_dir = tmp_path / "run"
    clock = "+callbacks.clock={_target_: faults.FakeClock, step_seconds: 2.0}"
    common = ["trainer.max_time=00:00:00:06", "trainer.max_steps=100000", "data.max_length=64",
              "callbacks.model_checkpoint.every_n_train_steps=100000", "trainer.val_check_interval=100000",
              clock, f"hydra.run.dir={run_dir}"]
    assert run_train(*common, env=FAULT_ENV).returncode == 0
    steps = read_summary(run_dir)["global_step"]
    assert steps > 0
    assert run_train(*common, env=FAULT_ENV).returncode == 0
    assert read_summary(run_dir)["global_step"] == steps  # nothing left: stops at once
    assert run_train(*common, "callbacks.budget.reset_on_resume=true", env=FAULT_ENV).returncode == 0
    assert read_summary(run_dir)["global_step"] > steps  # a fresh budget


def test_a_save_that_dies_midway_leaves_the_previous_checkpoint(tmp_path):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "global_step": 1}, path)
    before = path.read_bytes()

    class Explodes:
        def __reduce__(self):
            raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError, match="killed mid-write"):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(1000)}, "global_step": 2, "x": Explodes()}, path)
    assert path.read_bytes() == before
    assert io.load_checkpoint(path)["global_step"] == 1  # and it loads with weights_only=True


@pytest.mark.slow
def test_resume_falls_back_to_the_newest_checkpoint_that_loads(tmp_path):
    run_dir = tmp_path / "run"
    args = ["trainer.max_steps=6", "callbacks.model_checkpoint.every_n_train_steps=4", *FAST[2:],
            f"hydra.run.dir={run_dir}"]
    assert run_train(*args).returncode == 0
    ckpts = run_dir / "checkpoints"
    (ckpts / "last.ckpt").write_bytes(b"not a checkpoint: the disk filled up")
    (ckpts / ".last.ckpt.tmp999").write_bytes(b"half a file")
    assert find_resume_checkpoint(ckpts).name == "step000004.ckpt"
    out = run_train(*[a.replace("max_steps=6", "max_steps=8") for a in args])
    assert out.returncode == 0, out.stdout[-3000:]
    s = read_summary(run_dir)
    assert s["resumed_from"].endswith("step000004.ckpt") and s["global_step"] == 8


def test_resuming_onto_another_base_model_is_refused_before_weights_load(trained_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir, ignore=shutil.ignore_patterns("eval", ".lock"))
    assert _final(run_dir)["base_model"]["fingerprint"]
    out, report = run_guarded("model.arch=tiny-llama", "trainer.max_steps=4", *FAST[2:], f"hydra.run.dir={run_dir}")
    assert out.returncode == 2 and "was trained on base model 'tiny-mistral'" in out.stderr
    assert not report["weights_built"]


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["skip", "stop"])
def test_non_finite_gradients_are_skipped_then_stop_and_never_reach_checkpoints(tmp_path, policy):
    run_dir = tmp_path / "run"
    nan_batches = [3] if policy == "skip" else list(range(2, 100))
    out = run_train("trainer.max_steps=8", *FAST[2:], f"optim.nonfinite={policy}", "optim.max_nonfinite_skips=2",
                    f"+callbacks.fault={{_target_: faults.NaNGradAt, batches: {nan_batches}}}",
                    f"hydra.run.dir={run_dir}", env=FAULT_ENV)
    assert out.returncode == 0, out.stdout[-3000:]
    s = read_summary(run_dir)
    if policy == "skip":
        assert s["stop_reason"] == "max_steps" and s["nonfinite_steps_skipped"] == 1
    else:
        assert s["stop_reason"] == "non_finite" and s["nonfinite_steps_skipped"] == 1
    for path in (run_dir / "checkpoints").glob("*.ckpt"):
        state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
        assert all(torch.isfinite(v).all() for v in state.values()), path


@pytest.mark.parametrize("override, key, stage", [
    ("lora.target_modules=[wq,wk]", "lora.target_modules", "architecture"),
    ("moe.layers=[5,50]", "moe.layers", "architecture"),
    ("moe.top_k=5", "moe.top_k", "config"),
    ("moe.num_experts=3", "domains", "config"),
    ("trainer.max_time=12h", "trainer.max_time", "config"),
    ("moe.router=sinkhorn", "moe.router", "config"),
    ("moe.expert=giant", "moe.expert", "config"),
    ("data.batch_size=0", "data.batch_size", "config"),
    ("trainer.accumulate_grad_batches=0", "trainer.accumulate_grad_batches", "config"),
    ("trainer.accelerator=cpu", "model.liger_kernel", "architecture"),  # Liger's kernels are Triton: CUDA only
    ("trainer.accelerator=cpu model.liger_kernel=false model.offload_activations=true", "model.offload_activations",
     "architecture"),
    # three checks that used to run only after the weights were built
    ("lora=none moe=none", "nothing to train", "config"),
    ("model.init=random model.load_in_4bit=true", "model.load_in_4bit", "config"),
    ("moe=lora_experts moe.lora_targets=[w1,w2]", "moe.lora_targets", "architecture"),
    ("trainer.accelerator=cpu model.liger_kernel=false trainer.precision=16-mixed", "trainer.precision", "config"),
])
def test_bad_config_on_the_12b_recipe_fails_before_any_weights(tmp_path, override, key, stage):
    """On the 12B architecture with random init, building the model would take minutes and 24 GB. tests/guarded.py
    records that no weights were built, and that config-only mistakes failed before torch was imported."""
    out, report = run_guarded("+recipe=therapeutic_h100", "model.init=random", *override.split(),
                              f"hydra.run.dir={tmp_path}/run", cwd=tmp_path, fresh=True)
    assert out.returncode == 2 and key in out.stderr, out.stderr[-2000:]
    assert not report["weights_built"]
    assert report["torch_imported"] == (stage == "architecture")


def test_bf16_on_a_gpu_without_it_is_refused():
    from lightning_moe.config import ConfigError

    with pytest.raises(ConfigError, match="trainer.precision: bf16-mixed needs a GPU with bf16"):
        check_precision("bf16-mixed", "gpu", cuda_available=True, bf16_supported=False)
    check_precision("bf16-mixed", "gpu", cuda_available=True, bf16_supported=True)
    check_precision("bf16-mixed", "cpu", cuda_available=False, bf16_supported=False)  # CPUs emulate bf16


@pytest.mark.slow
def test_sweep_records_failing_and_diverging_trials_and_finishes(tmp_path):
    sweep = tmp_path / "sweep"
    out = run_train("-m", "optim.lr=1e-3,1e30", "moe.top_k=2,9", "optim.max_nonfinite_skips=1",
                    f"hydra.sweep.dir={sweep}", *FAST, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:]
    with open(sweep / "sweep_summary.csv") as f:
        rows = {r["overrides"]: r for r in csv.DictReader(f)}
    assert rows["optim.lr=0.001 moe.top_k=2"]["stop_reason"] == "max_steps"
    assert rows["optim.lr=1e+30 moe.top_k=2"]["stop_reason"] == "non_finite"
    bad = [r for k, r in rows.items() if "top_k=9" in k]
    assert len(bad) == 2 and all(r["stop_reason"] == "error" and "moe.top_k" in r["error"] for r in bad)


def _optuna_study(sweep_dir: Path):
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    storage = JournalStorage(JournalFileBackend(str(sweep_dir / "optuna.journal")))
    return optuna.load_study(study_name="tiny", storage=storage)


@pytest.mark.slow
def test_optuna_sweep_resumes_its_study(tmp_path):
    args = ["-m", "+sweep=optuna", f"hydra.sweep.dir={tmp_path}/optuna", *FAST]
    assert run_train(*args, "hydra.sweeper.n_trials=2", timeout=600).returncode == 0
    out = run_train(*args, "hydra.sweeper.n_trials=1", timeout=600)
    assert out.returncode == 0, out.stdout[-3000:]
    study = _optuna_study(tmp_path / "optuna")
    assert len(study.trials) == 3 and all(t.state.name == "COMPLETE" for t in study.trials)
    assert len({tuple(sorted(t.params.items())) for t in study.trials}) == 3  # the resumed run proposed new ones


@pytest.mark.slow
def test_optuna_sweep_records_a_failing_trial_and_goes_on(tmp_path):
    sweep = tmp_path / "optuna"
    out = run_train("-m", "+sweep=optuna", "hydra.sweeper.n_trials=2", "moe.top_k=9",  # an invalid config
                    f"hydra.sweep.dir={sweep}", *FAST, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:]
    assert [t.state.name for t in _optuna_study(sweep).trials] == ["FAIL", "FAIL"]
    with open(sweep / "sweep_summary.csv") as f:
        assert [r["stop_reason"] for r in csv.DictReader(f)] == ["error", "error"]


@pytest.mark.slow
def test_optuna_sweep_stopped_by_its_failure_rate_still_writes_the_sweep_table(tmp_path):
    sweep = tmp_path / "optuna"
    out = run_train("-m", "+sweep=optuna", "hydra.sweeper.n_trials=3", "hydra.sweeper.max_failure_rate=0",
                    "moe.top_k=9", f"hydra.sweep.dir={sweep}", *FAST, timeout=600)
    assert out.returncode != 0 and "stopped the sweep" in out.stdout, out.stdout[-3000:]
    with open(sweep / "sweep_summary.csv") as f:  # the record of the trial that ran, though the sweep stopped
        rows = list(csv.DictReader(f))
    assert [r["stop_reason"] for r in rows] == ["error"] and "moe.top_k" in rows[0]["error"]


@pytest.mark.slow
def test_secrets_never_reach_configs_logs_or_summary(tmp_path):
    secrets = {"WANDB_API_KEY": "wk-SECRET-1234567890", "HF_TOKEN": "hf_SECRET_0987654321"}
    run_dir = tmp_path / "run"
    out = run_train("logger=wandb", "+notes.hf_token=${oc.env:HF_TOKEN}", "+notes.remark='token ${oc.env:HF_TOKEN}'",
                    f"hydra.run.dir={run_dir}", *FAST, env=clean_env(WANDB_MODE="offline", **secrets))
    assert out.returncode == 0, out.stdout[-3000:]
    assert "SECRET" not in out.stdout
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert any(p.name == "config.yaml" for p in files) and list(run_dir.glob("wandb/offline-run-*"))
    for p in files:
        data = p.read_bytes()
        assert not any(v.encode() in data for v in secrets.values()), p


def test_remote_code_is_not_run_unless_the_config_says_so(tmp_path):
    model_dir = tmp_path / "remote"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({
        "model_type": "custom_remote", "auto_map": {"AutoConfig": "configuration_custom.CustomConfig"}}))
    (model_dir / "configuration_custom.py").write_text(
        "from transformers import PretrainedConfig\nclass CustomConfig(PretrainedConfig):\n    model_type = 'custom_remote'\n")
    (model_dir / "model.safetensors").write_bytes(b"")
    out = run_train(f"model.name_or_path={model_dir}", "model.init=pretrained", f"hydra.run.dir={tmp_path}/run")
    assert out.returncode == 2 and "model.trust_remote_code" in out.stdout
