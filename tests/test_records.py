"""A run never loses its record, never leaks a secret, and says what it is doing: each case one real train.py run
(or one refused start) with the fault a user meets."""

from __future__ import annotations

import csv
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import FAST, REPO, clean_env, read_summary, run_guarded, run_train, train_cmd

FAULT_ENV = clean_env(PYTHONPATH=str(REPO / "tests"))


def _record(run_dir):
    return {p.relative_to(run_dir): p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and "eval" not in p.parts}


def test_a_rerun_that_cannot_continue_a_finished_run_changes_nothing_of_it(trained_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("eval", ".lock"))
    before = _record(run)
    out, report = run_guarded(f"hydra.run.dir={run}", "trainer.max_steps=34", "lora.r=8")
    assert out.returncode == 2 and "lora.r: 16 in the checkpoint, 8 now" in out.stderr, out.stderr[-2000:]
    assert "hydra.run.dir=NEW_DIR" in out.stderr and not report["weights_built"]
    after = _record(run)
    changed = [p for p in before if after.get(p) != before[p]]
    assert changed == [Path("train.log")] or changed == [], changed  # only Hydra's log gains the refusal's lines


@pytest.mark.slow
def test_a_second_run_on_the_same_directory_is_refused_while_the_first_holds_it(tmp_path):
    run = tmp_path / "run"
    first = subprocess.Popen(train_cmd(f"hydra.run.dir={run}", "trainer.max_steps=400", "data.max_length=64"),
                             cwd=REPO, env=clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not ((run / ".lock").is_file() and (run / ".lock").read_text()):
            assert first.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        second = run_train(f"hydra.run.dir={run}", "trainer.max_steps=4", timeout=120)
        assert second.returncode == 2 and "is in use by another run" in second.stdout
        assert f"pid {first.pid}" in second.stdout  # it says who holds it
        # the first run takes its lock before it trains: the SIGTERM below is meant for a run that is training
        # (config.yaml is written when its first step starts), not for one still loading its model
        while not (run / "config.yaml").is_file():
            assert first.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=120)
    assert first.returncode == 143 and read_summary(run)["stop_reason"] == "sigterm"
    assert not list((run / "checkpoints").glob("last-v*.ckpt"))  # no stray checkpoint of a second writer


@pytest.mark.slow
def test_secrets_from_overrides_env_set_and_interpolation_reach_no_file_of_the_run(tmp_path):
    secrets = {"plain": "hf_PASTEDplainOVERRIDE1234567", "env_set": "wk-ENVSET-secret-0987654321",
               "interpolated": "hf_INTERPOLATEDtoken09876543"}
    run = tmp_path / "run"
    out = run_train("logger=wandb", f"data.system_prompt={secrets['plain']}",
                    f"+hydra.job.env_set.WANDB_API_KEY={secrets['env_set']}", "+notes.remark='token ${oc.env:HF_TOKEN}'",
                    f"hydra.run.dir={run}", *FAST, env=clean_env(WANDB_MODE="offline", HF_TOKEN=secrets["interpolated"]))
    assert out.returncode == 0, out.stdout[-3000:]
    files = [p for p in run.rglob("*") if p.is_file()]
    assert {".hydra/overrides.yaml", ".hydra/hydra.yaml", "config.yaml", "train.log"} <= {
        str(p.relative_to(run)) for p in files}
    assert list(run.glob("checkpoints/*.ckpt")) and list(run.glob("wandb/offline-run-*/run-*.wandb"))
    for p in files:
        data = p.read_bytes()
        for route, value in secrets.items():
            assert value.encode() not in data, (route, p)
    assert not any(v in out.stdout for v in secrets.values())


@pytest.mark.slow
def test_a_full_disk_names_the_failed_checkpoint_keeps_the_others_and_leaves_no_temporary_files(tmp_path):
    run = tmp_path / "run"
    out = run_train(f"hydra.run.dir={run}", "trainer.max_steps=8", "callbacks.model_checkpoint.every_n_train_steps=2",
                    "+callbacks.fault={_target_: faults.DiskFullAt, step: 3}", *FAST[2:], env=FAULT_ENV)
    assert out.returncode == 1, out.stdout[-3000:]
    assert "error: saving checkpoint" in out.stdout and "No space left on device" in out.stdout
    assert "the previous checkpoints are intact" in out.stdout and "Traceback" not in out.stdout
    good = torch.load(run / "checkpoints" / "step000002.ckpt", map_location="cpu", weights_only=True)
    assert good["global_step"] == 2
    assert not [p for p in run.rglob("*") if ".tmp" in p.name]
    s = read_summary(run)  # written: there was room for it
    assert s["stop_reason"] == "error" and "saving checkpoint" in s["error"]


@pytest.mark.slow
def test_leftovers_of_a_killed_run_are_removed_and_progress_shows_in_a_log_file(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / ".last.ckpt.tmp999").write_bytes(b"half a checkpoint")
    (run / ".summary.json.tmp123").write_text("{")
    out = run_train(f"hydra.run.dir={run}", *FAST, "trainer.log_every_n_steps=2")
    assert out.returncode == 0, out.stdout[-3000:]
    assert not [p for p in run.rglob("*") if ".tmp" in p.name] and "left behind by a killed run" in out.stdout
    # stdout is a pipe here, as under nohup or SLURM: plain progress lines, then the closing summary
    lines = [line for line in out.stdout.splitlines() if line.startswith("step ")]
    assert any(line.startswith("step 2/4 | epoch 0 | loss ") and "tokens/s" in line and "ETA" in line for line in lines)
    assert any(line.startswith("step 4/4") for line in lines) and "\r" not in out.stdout
    assert "Run finished: stop_reason=max_steps at step 4" in out.stdout
    assert f"python evaluate.py run={run}" in out.stdout and "domain_expert_matrix.png" in out.stdout
    assert "Tip:" not in out.stdout and "kernels-community" not in out.stdout  # third-party noise filtered


@pytest.mark.slow
@pytest.mark.parametrize("case", ["one_row", "no_validation"])
def test_data_too_small_to_split_is_named_and_validation_that_never_runs_is_warned(tmp_path, case):
    if case == "one_row":
        data = tmp_path / "one.jsonl"
        data.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                                 {"role": "assistant", "content": "hello"}]}) + "\n")
        out, report = run_guarded(f"data.train_files=[{data}]", f"hydra.run.dir={tmp_path}/run")
        assert out.returncode == 2 and "data.val_fraction: 1 conversation(s)" in out.stderr, out.stderr[-2000:]
        assert "data.val_files" in out.stderr and not report["weights_built"]
    else:
        out = run_train("trainer.max_steps=2", "trainer.val_check_interval=1000", *FAST[2:],
                        f"hydra.run.dir={tmp_path}/run")
        assert out.returncode == 0 and "validation never runs" in out.stdout, out.stdout[-2000:]


# ---- issue 25: a finished run's record (items 1, 3, 4, 5, 6) --------------------------------------------------
FINISHED_ARGS = [*FAST, "callbacks.model_checkpoint.every_n_train_steps=2"]  # validation (and best) at step 4


def _run_record(run_dir):
    """Every file of a run but Hydra's log (which gains each start's lines) and the lock's holder note."""
    return {p: b for p, b in _record(run_dir).items() if p.name not in ("train.log", ".lock")}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished FAST run (4 steps); tests copy it, never write into it."""
    run = tmp_path_factory.mktemp("finished") / "run"
    out = run_train(f"hydra.run.dir={run}", *FINISHED_ARGS)
    assert out.returncode == 0, out.stdout[-3000:]
    return run


@pytest.mark.slow
def test_the_same_command_on_a_finished_run_leaves_it_byte_identical_and_a_longer_one_continues_from_last(tmp_path):
    """README: "after SIGTERM (exit 143) the same command resumes" and "A rerun that cannot continue a run ... is
    refused before anything of it changes": a scheduler's retry of a finished run's command must leave its
    summary.json (expert_load, routing, last_checkpoint), export/ and checkpoints as they were, and a larger
    trainer.max_steps continues from last.ckpt, never from the best checkpoint (an earlier state)."""
    run = tmp_path / "run"
    first = run_train(f"hydra.run.dir={run}", *FINISHED_ARGS)
    assert first.returncode == 0, first.stdout[-3000:]
    before = _run_record(run)
    again = run_train(f"hydra.run.dir={run}", *FINISHED_ARGS)
    assert again.returncode == 0, again.stdout[-3000:]
    assert "already finished" in again.stdout and "nothing of it changed" in again.stdout
    after = _run_record(run)
    assert sorted(after) == sorted(before) and [p for p in before if after[p] != before[p]] == []

    longer = run_train(f"hydra.run.dir={run}", *FINISHED_ARGS, "trainer.max_steps=6")
    assert longer.returncode == 0, longer.stdout[-3000:]
    s = read_summary(run)
    assert s["resumed_from"] == str(run / "checkpoints" / "last.ckpt")
    assert s["global_step"] == 6 and s["stop_reason"] == "max_steps"
    assert s["last_checkpoint"] == str(run / "checkpoints" / "last.ckpt") and s["expert_load"]
    assert json.loads((run / "export" / "export_config.json").read_text())["global_step"] == 6


@pytest.mark.slow
@pytest.mark.xdist_group("finished_run")  # one worker trains finished_run (a module fixture is built once per worker)
def test_a_moved_run_continues_into_its_own_last_checkpoint(finished_run, tmp_path):
    """README: "checkpoints/ last.ckpt" and `checkpoint=last` (After training) mean the run's newest checkpoint:
    after `mv R R2`, continuing in R2 writes R2's last.ckpt, not a last-v1.ckpt beside an older last.ckpt."""
    run = tmp_path / "moved"
    shutil.copytree(finished_run, run)
    out = run_train(f"hydra.run.dir={run}", *FINISHED_ARGS, "trainer.max_steps=6")
    assert out.returncode == 0, out.stdout[-3000:]
    assert sorted(p.name for p in (run / "checkpoints").glob("last*.ckpt")) == ["last.ckpt"]
    assert torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["global_step"] == 6
    s = read_summary(run)
    assert s["last_checkpoint"] == str(run / "checkpoints" / "last.ckpt")
    assert s["best_checkpoint"].startswith(str(run / "checkpoints"))


@pytest.mark.xdist_group("finished_run")
def test_a_run_whose_checkpoints_were_deleted_is_refused_unless_started_over(finished_run, tmp_path):
    """README: "A rerun that cannot continue a run ... is refused before anything of it changes": without its
    checkpoints a run cannot be continued, and retraining from step 0 would rewrite its summary, config and export
    and append a second history to metrics.csv. resume=false is the documented way to start over."""
    run = tmp_path / "run"
    shutil.copytree(finished_run, run, ignore=shutil.ignore_patterns("checkpoints"))
    before = _run_record(run)
    out, report = run_guarded(f"hydra.run.dir={run}", *FINISHED_ARGS)
    assert out.returncode == 2 and "holds the record of a run but no checkpoint" in out.stderr, out.stderr[-2000:]
    assert "resume=false" in out.stderr and not report["weights_built"]
    assert _run_record(run) == before


@pytest.mark.slow
@pytest.mark.xdist_group("finished_run")
def test_resume_false_starts_over_with_the_earlier_record_set_aside(finished_run, tmp_path):
    """MOE_TRAINING_GUIDE.md: "`resume=false` starts over in the same directory": the earlier run's files are moved
    to replaced/<time>/, so its record is kept whole and the new run's metrics.csv holds one history, not two."""
    run = tmp_path / "run"
    shutil.copytree(finished_run, run, ignore=shutil.ignore_patterns("checkpoints"))
    before = _run_record(run)
    out = run_train(f"hydra.run.dir={run}", *FINISHED_ARGS, "resume=false", "trainer.log_every_n_steps=1")
    assert out.returncode == 0, out.stdout[-3000:]
    (old,) = (run / "replaced").iterdir()
    assert {p: before[p] for p in before} == {p: (old / p).read_bytes() for p in before}
    assert read_summary(run)["resumed_from"] is None and read_summary(run)["global_step"] == 4
    with open(run / "logs" / "metrics.csv") as f:
        steps = [r["step"] for r in csv.DictReader(f) if r.get("train/lm_loss")]
    assert len(steps) == len(set(steps)) == 4
    assert sorted(p.name for p in (run / "checkpoints").glob("last*.ckpt")) == ["last.ckpt"]


@pytest.mark.xdist_group("finished_run")
def test_continuing_a_random_base_with_another_seed_is_refused(finished_run, tmp_path):
    """README: "A rerun that cannot continue a run (another base model, other LoRA or MoE shapes) is refused
    before anything of it changes": a model.init=random base is its architecture and the seed that drew it."""
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    before = _run_record(run)
    out, report = run_guarded(f"hydra.run.dir={run}", *FINISHED_ARGS, "trainer.max_steps=6", "seed=7")
    assert out.returncode == 2 and "seed" in out.stderr and "hydra.run.dir" in out.stderr, out.stderr[-2000:]
    assert not report["weights_built"]
    assert _run_record(run) == before


def test_deleting_the_lock_file_does_not_let_a_second_run_into_a_busy_directory(tmp_path):
    """README: ".lock  held while a run trains: a second start on the same directory is refused, naming the
    holder": the operating system holds the lock for the holder's life, so removing the file changes nothing."""
    run = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from lightning_moe.training.lock import "
         "RunLock\nwith RunLock(Path(sys.argv[1])):\n    print('locked', flush=True); time.sleep(300)", str(run)],
        cwd=REPO, env=clean_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        (run / ".lock").unlink()
        out, report = run_guarded(f"hydra.run.dir={run}", *FAST)
        assert out.returncode == 2 and "is in use by another run" in out.stderr, out.stderr[-2000:]
        assert f"pid {holder.pid}" in out.stderr and not report["weights_built"]
    finally:
        holder.kill()
        holder.wait()
