"""The commands that use a trained run (evaluate.py, generate.py, export.py, chat.py) against careless or hostile
input: each is refused in one line naming the key or file, exit 2, before any weights load, and nothing of the run
(or of any other file) is written. Issue #25 items 2, 9, 10, 11."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from conftest import REPO, run_guarded

from lightning_moe.checkpointing.load import plan_load
from lightning_moe.checkpointing.outputs import check_output
from lightning_moe.config.schema import ConfigError


def _snapshot(run) -> dict:
    return {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in run.rglob("*") if p.is_file()}


def _prompts(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    return prompts


@pytest.mark.parametrize("entry,args,key", [
    ("evaluate.py", [], "run"), ("chat.py", [], "run"), ("export.py", ["run=R", "out=X"], "format"),
    ("generate.py", ["run=R"], "prompts")])
def test_a_missing_required_key_is_named_in_one_line(entry, args, key):
    """README "checks its inputs before any weights load" / CONTRIBUTING "every user mistake ... one line and exit
    code 2": `python evaluate.py` with no run= was an omegaconf MissingMandatoryValue traceback, exit 1."""
    out, report = run_guarded(*args, entry=entry)
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.strip().splitlines()[-1].startswith(f"error: {key}: required"), out.stderr[-2000:]
    assert "Traceback" not in out.stderr and not report["weights_built"]


@pytest.mark.parametrize("entry,args,expected", [
    ("generate.py", ["max_new_tokens=-1"], "max_new_tokens: -1 must be at least 1"),
    ("generate.py", ["greedy=false", "temperature=0"], "temperature: 0"),
    ("export.py", ["format=merged", "out=OUT", "dtype=int8"], "dtype: 'int8' is not one of"),
])
def test_values_no_run_can_use_are_named_before_weights(trained_run, tmp_path, entry, args, expected):
    """Issue #25 item 10: `max_new_tokens=-1`, `dtype=int8` are named errors before weights load (README: "checks
    its inputs before any weights load")."""
    args = [a.replace("OUT", str(tmp_path / "x")) for a in args]
    if entry == "generate.py":
        args += [f"prompts={_prompts(tmp_path)}", f"out={tmp_path}/o.jsonl"]
    out, report = run_guarded(f"run={trained_run}", *args, entry=entry)
    assert out.returncode == 2 and expected in out.stderr, out.stderr[-2000:]
    assert not report["weights_built"] and not (tmp_path / "o.jsonl").exists() and not (tmp_path / "x").exists()


@pytest.mark.parametrize("case", ["evaluate_into_run", "evaluate_into_other_run", "generate_over_summary",
                                  "generate_over_prompts", "generate_over_a_file", "generate_into_a_dir",
                                  "export_into_run"])
def test_commands_that_read_a_run_never_write_into_it_or_over_a_file(trained_run, tmp_path, case):
    """README "nothing of the run itself is touched": `evaluate.py run=R out=R` deleted R/logs/metrics.csv,
    `generate.py out=R/summary.json` replaced the run's summary, and generate.py replaced any existing out= file,
    the prompts file included. Each is refused before any weights load, and every file stays as it was."""
    prompts, other = _prompts(tmp_path), tmp_path / "other_run"
    shutil.copytree(trained_run, other, ignore=shutil.ignore_patterns("*.ckpt", "export", "routing"))
    kept = tmp_path / "kept.jsonl"
    kept.write_text("mine\n")
    entry, args, expected = {
        "evaluate_into_run": ("evaluate.py", [f"out={trained_run}"], "is inside the training run"),
        "evaluate_into_other_run": ("evaluate.py", [f"out={other}"], "is inside the training run"),
        "generate_over_summary": ("generate.py", [f"prompts={prompts}", f"out={trained_run}/summary.json"],
                                  "is inside the training run"),
        "generate_over_prompts": ("generate.py", [f"prompts={prompts}", f"out={prompts}", "overwrite=true"],
                                  "is also this command's input"),
        "generate_over_a_file": ("generate.py", [f"prompts={prompts}", f"out={kept}"], "overwrite=true"),
        "generate_into_a_dir": ("generate.py", [f"prompts={prompts}", f"out={tmp_path}"], "is a directory"),
        "export_into_run": ("export.py", ["format=merged", f"out={other}/merged"], "is inside the training run"),
    }[case]
    before, before_other = _snapshot(trained_run), _snapshot(other)
    out, report = run_guarded(f"run={trained_run}", *args, entry=entry)
    assert out.returncode == 2 and expected in out.stderr, out.stderr[-2000:]
    assert not report["weights_built"]
    assert _snapshot(trained_run) == before and _snapshot(other) == before_other
    assert prompts.read_text().startswith('{"messages"') and kept.read_text() == "mine\n"


def test_evaluate_may_write_in_the_runs_own_eval_folder_only(trained_run, tmp_path):
    """README: evaluate.py writes into `<run>/eval/<time>/`, nowhere else in the run."""
    assert check_output(trained_run / "eval" / "mine", folder=True)
    with pytest.raises(ConfigError, match="inside the training run"):
        check_output(trained_run / "logs" / "x", folder=True)


def _damaged(trained_run, tmp_path, kind):
    run = tmp_path / f"run_{kind}"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(trained_run / "config.yaml", run / "config.yaml")
    ckpt = run / "checkpoints" / "last.ckpt"
    if kind == "truncated":
        data = (trained_run / "checkpoints" / "last.ckpt").read_bytes()
        ckpt.write_bytes(data[: len(data) // 2])
    elif kind == "pickle":  # a payload that would run a command if unpickled unsafely
        import pickle

        ckpt.write_bytes(pickle.dumps({"state_dict": os.system}))
    return run, ckpt


@pytest.mark.parametrize("kind", ["truncated", "pickle", "foreign"])
def test_a_damaged_or_foreign_checkpoint_is_named(trained_run, tmp_path, kind):
    """Issue #25 item 9 (README "checks its inputs before any weights load"): a truncated last.ckpt, a pickle payload
    or checkpoint=/etc/passwd ended in a raw traceback that did not name the file."""
    run, ckpt = _damaged(trained_run, tmp_path, kind)
    if kind == "foreign":
        run, ckpt = trained_run, "/etc/passwd"
    with pytest.raises(ConfigError, match=f"checkpoint: {ckpt} (cannot be read|is not a checkpoint)"):
        plan_load(run, checkpoint=str(ckpt) if kind == "foreign" else "last")


@pytest.mark.parametrize("entry", ["evaluate.py", "generate.py", "export.py"])
def test_each_command_names_a_damaged_checkpoint_and_exits_2(trained_run, tmp_path, entry):
    """The same, as a user meets it: exit 2 and the file named, from each command; evaluate.py given a good and a
    damaged run writes no half comparison."""
    run, ckpt = _damaged(trained_run, tmp_path, "truncated")
    args = {"evaluate.py": [f"run=[{trained_run},{run}]", f"out={tmp_path}/cmp"],
            "generate.py": [f"run={run}", f"prompts={_prompts(tmp_path)}", f"out={tmp_path}/o.jsonl"],
            "export.py": [f"run={run}", "format=peft", f"out={tmp_path}/x"]}[entry]
    out, report = run_guarded(*args, entry=entry)
    assert out.returncode == 2 and f"checkpoint: {ckpt} cannot be read" in out.stderr, out.stderr[-2000:]
    assert "Traceback" not in out.stderr and not report["weights_built"]
    assert not any(p.name in ("cmp", "o.jsonl", "x") for p in tmp_path.iterdir())


def test_unwritable_places_and_too_little_space_are_refused_before_weights(tmp_path):
    """Issue #25 item 10: a read-only place or a full disk was a traceback after all the work."""
    with pytest.raises(ConfigError, match="cannot write in /sys"):
        check_output("/sys/lightning-moe-export", folder=True)
    (tmp_path / "f").write_text("")
    with pytest.raises(ConfigError, match="is a file"):
        check_output(tmp_path / "f" / "out.jsonl")
    with pytest.raises(ConfigError, match="free, this output needs about"):
        check_output(tmp_path / "big", folder=True, needed_bytes=2**62)


def test_a_failed_write_leaves_no_temporary_file(tmp_path):
    """Issue #25 item 10: a full disk left `.NAME.tmpPID` behind. Here the disk is "full" for real: the process may
    not write files over 1 KiB (RLIMIT_FSIZE), so the write fails with EFBIG as it would with ENOSPC."""
    code = (f"import resource, signal; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            f"resource.setrlimit(resource.RLIMIT_FSIZE, (1024, 1024)); "
            f"from pathlib import Path; from lightning_moe.checkpointing.outputs import write_file_atomic; "
            f"write_file_atomic(Path({str(tmp_path / 'out.jsonl')!r}), 'x' * 100000)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "RunFailure: writing" in out.stderr and "nothing was written" in out.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("overrides,formats", [([], None), (["moe=none"], "merged|peft"),
                                               (["+recipe=servable_tiny"], "per_domain")])
def test_the_closing_report_offers_only_the_exports_the_run_can_make(tmp_path, overrides, formats):
    """Issue #26 item 3: every run's "next:" hint offered format=merged|peft|per_domain, even to runs (the tiny
    default) that can produce none of them."""
    from conftest import compose
    from omegaconf import OmegaConf

    from lightning_moe.reporting.console import run_report

    OmegaConf.save(compose(overrides, run_dir=tmp_path), tmp_path / "config.yaml")
    report = run_report({"stop_reason": "max_steps", "global_step": 4}, tmp_path)
    export_line = [line for line in report.splitlines() if "export.py" in line][0]
    if formats:
        assert export_line.strip() == f"python export.py run={tmp_path} format={formats} out=DIR"
    else:
        assert export_line.strip().startswith("# export.py: none of merged|peft|per_domain fits this run")


def test_the_readmes_after_training_block_exports_only_what_its_runs_can():
    """Issue #26 item 3 (README "After training" runs as written): it exported runs/a, the tiny default with MoE
    experts, with format=merged, which export.py refuses. Each export line's run is composed from the block's own
    train.py line and its format checked as export.py checks it."""
    import re
    import shlex

    from conftest import compose

    from lightning_moe.config import validate_config
    from lightning_moe.config.export_forms import check_format

    text = (REPO / "README.md").read_text()
    block = text[text.index("## After training"):]
    block = block[block.index("```bash"):block.index("```\n", block.index("```bash") + 7)]
    trained, exports = {}, []
    for line in block.splitlines():
        words = shlex.split(line.split(" #")[0]) if line.startswith("python ") else []
        if words[:2] == ["python", "train.py"]:
            run = next(w.split("=", 1)[1] for w in words if w.startswith("hydra.run.dir="))
            trained[run] = [w for w in words[2:] if not w.startswith("hydra.")]
        elif words[:2] == ["python", "export.py"]:
            exports.append(dict(w.split("=", 1) for w in words[2:]))
    assert exports and all(e["run"] in trained for e in exports)
    for e in exports:
        check_format(e["format"], validate_config(compose(trained[e["run"]])))  # raises ConfigError if refused
    assert re.search(r"python export\.py run=runs/a format=merged", block) is None


def test_a_trial_a_killed_sweep_left_running_is_recorded_as_failed(tmp_path):
    """Issue #25 item 13 (README: an Optuna sweep's study is a journal file, "the same command continues it"): a
    trial killed mid-run stayed RUNNING in the study for ever. The sweeper closes such trials when it resumes."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend
    from optuna.trial import TrialState

    from hydra_plugins.lightning_moe_optuna.sweeper import close_abandoned_trials

    storage = JournalStorage(JournalFileBackend(str(tmp_path / "optuna.journal")))
    study = optuna.create_study(study_name="s", storage=storage)
    study.tell(study.ask(), 1.0)
    study.ask()  # the sweep was killed while this trial trained
    resumed = optuna.load_study(study_name="s", storage=JournalStorage(JournalFileBackend(str(tmp_path / "optuna.journal"))))
    assert close_abandoned_trials(resumed) == [1]
    assert [t.state for t in resumed.get_trials()] == [TrialState.COMPLETE, TrialState.FAIL]


@pytest.mark.slow
def test_a_sweeps_files_never_hold_a_token_given_as_an_override(tmp_path):
    """Issue #25 item 8 (README: "secrets masked"): a sweep (-m) with a token in an override wrote it in plain text
    into the sweep directory's multirun.yaml, three times. Every file the sweep writes is read for it."""
    from conftest import FAST, run_train

    secret, sweep = "hf_SWEEPoverrideTOKEN1234567890", tmp_path / "sweep"
    out = run_train("-m", "optim.lr=1e-3", f"data.system_prompt={secret}", f"hydra.sweep.dir={sweep}", *FAST)
    assert out.returncode == 0, out.stdout[-3000:]
    files = [p for p in sweep.rglob("*") if p.is_file()]
    assert sweep / "multirun.yaml" in files and sweep / "sweep_summary.csv" in files
    assert not [p for p in files if secret.encode() in p.read_bytes()]
    assert secret not in out.stdout


@pytest.mark.slow
def test_a_wandb_runs_files_never_hold_a_secret_interpolated_from_the_environment(tmp_path):
    """Issue #25 item 8 (README: "secrets masked"): with logger=wandb, a value interpolated from the environment was
    masked in config.yaml but written in plain text into wandb's offline run file, which `wandb sync` uploads."""
    from conftest import FAST, clean_env, run_train

    secret, run = "hf_WANDBinterpolatedTOKEN123456", tmp_path / "run"
    out = run_train("logger=wandb", "+logger.wandb.notes=${oc.env:HF_TOKEN}", "+logger.wandb.tags=[${oc.env:HF_TOKEN}]",
                    f"hydra.run.dir={run}", *FAST, env=clean_env(WANDB_MODE="offline", HF_TOKEN=secret))
    assert out.returncode == 0, out.stdout[-3000:]
    files = [p for p in run.rglob("*") if p.is_file()]
    assert list(run.glob("wandb/offline-run-*/run-*.wandb"))
    assert not [p for p in files if secret.encode() in p.read_bytes()]


def test_export_temporaries_of_killed_or_beaten_exports_are_removed(tmp_path):
    """Issue #25 item 10 (README: an export "appears whole or not at all"): a temporary folder left by a SIGKILL, or
    by losing the final rename to a parallel export, stayed for ever. The next export to the same place removes a
    dead process's, never a live one's; the loser of a race removes its own."""
    from lightning_moe.export.folder import ExportFolder

    out = tmp_path / "exp"
    dead, live = tmp_path / ".exp.tmp999999999", tmp_path / f".exp.tmp{os.getppid()}"  # no such pid / a live one
    dead.mkdir()
    live.mkdir()
    with pytest.raises(ConfigError, match="already exists"):
        with ExportFolder(out) as folder:
            assert not dead.exists() and live.exists()
            (folder / "weights.safetensors").write_text("x")
            out.mkdir()  # a parallel export took the name first
    assert sorted(p.name for p in tmp_path.iterdir()) == [live.name, "exp"] and not list(out.iterdir())
