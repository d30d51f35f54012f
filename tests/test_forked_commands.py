"""tests/forked.py runs the entry points forked from a server with the third-party stack imported: what a command
sees and does must be what a fresh interpreter gives it, or every test that runs a command tests something else."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import FAST, REPO, clean_env, read_summary
from forked import _get_server

# Everything of the interpreter a command can observe: argv, sys.path, cwd, its environment, __main__, stdio
# (encoding, buffering, terminal or not, stdin's content), signal dispositions; then it writes to both streams,
# leaves a non-daemon thread and an atexit handler behind, and exits with a code or an uncaught exception.
PROBE = r'''
import atexit, json, os, signal, sys, threading, time
import __main__
state = {
    "argv": sys.argv, "path": sys.path[:3], "cwd": os.getcwd(), "env": os.environ.get("MASTER_ADDR"),
    "file": __main__.__file__, "spec": __main__.__spec__, "name": __name__,
    "stdout": [sys.stdout.encoding, sys.stdout.errors, sys.stdout.line_buffering, sys.stdout.write_through,
               sys.stdout.isatty()],
    "stderr": [sys.stderr.encoding, sys.stderr.errors, sys.stderr.line_buffering],
    "stdin": sys.stdin.read(),
    "signals": {s.name: str(signal.getsignal(s)) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGPIPE)},
    "wandb_imported": "wandb" in sys.modules,  # forked.FORKABLE_ENV lets WANDB_* differ: the server must not hold it
}
print(json.dumps(state, sort_keys=True))
print("to stderr", file=sys.stderr)
atexit.register(lambda: print("atexit ran after the thread"))
threading.Thread(target=lambda: (time.sleep(0.2), print("thread joined"))).start()
if sys.argv[1] == "raise":
    raise ValueError("uncaught")
sys.exit(int(sys.argv[1]))
'''


@pytest.mark.parametrize("ending, unbuffered", [("3", True), ("0", False), ("raise", True)])
def test_a_forked_command_sees_and_does_what_a_fresh_interpreter_does(tmp_path, ending, unbuffered):
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    argv = [sys.executable, str(script), ending]
    env = clean_env(MASTER_ADDR="x", PYTHONPATH=str(tmp_path / "extra"))
    if not unbuffered:  # then stdout is block-buffered: it reaches the file after stderr's lines
        del env["PYTHONUNBUFFERED"]
    server = _get_server(clean_env(), REPO)
    assert server.forkable(argv, env)
    forked = server.run(argv, tmp_path, env, timeout=60, stdin="line one\n", merge=True)
    fresh = subprocess.run(argv, cwd=tmp_path, env=env, input="line one\n", text=True, timeout=60,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert forked.returncode == fresh.returncode == (1 if ending == "raise" else int(ending))
    lines = {name: out.stdout.splitlines() for name, out in (("forked", forked), ("fresh", fresh))}
    if ending == "raise":  # the traceback's frames differ (runpy's in the fork): the rest does not
        for name in lines:
            lines[name] = [line for line in lines[name] if not line.startswith("  ")]
    assert lines["forked"] == lines["fresh"]
    state = json.loads(next(line for line in lines["fresh"] if line.startswith("{")))  # what it was given
    assert state["stdin"] == "line one\n" and state["env"] == "x" and state["path"][1] == str(tmp_path / "extra")


def test_environment_a_library_reads_at_import_gets_a_real_interpreter():
    server = _get_server(clean_env(), REPO)
    argv = [sys.executable, str(REPO / "train.py")]
    assert server.forkable(argv, clean_env(PYTHONPATH="tests", WANDB_MODE="offline"))
    for key, value in (("HF_HUB_OFFLINE", "1"), ("OMP_NUM_THREADS", "2"), ("HOME", "/elsewhere"),
                       ("TRANSFORMERS_VERBOSITY", "error")):
        assert not server.forkable(argv, clean_env(**{key: value})), key
    assert not server.forkable([sys.executable, "-c", "pass"], clean_env())


@pytest.mark.slow
def test_a_forked_training_run_equals_one_in_a_fresh_interpreter(tmp_path):
    """The same short train.py command both ways: the same losses to the bit, the same routing, the same files."""
    runs = {}
    for name in ("forked", "fresh"):
        argv = [sys.executable, str(REPO / "train.py"), *FAST, f"hydra.run.dir={tmp_path / name}"]
        env = clean_env()
        if name == "forked":
            out = _get_server(clean_env(), REPO).run(argv, REPO, env, timeout=300, stdin=None, merge=True)
        else:
            out = subprocess.run(argv, cwd=REPO, env=env, text=True, timeout=300, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT)
        assert out.returncode == 0, out.stdout[-3000:]
        runs[name] = read_summary(tmp_path / name)
    for key in ("stop_reason", "global_step", "first_train_loss", "train_loss", "val_loss", "routing",
                "domain_expert_matrix", "tokens_seen"):
        assert runs["forked"][key] == runs["fresh"][key], key
    files = {name: sorted(str(p.relative_to(tmp_path / name)) for p in (tmp_path / name).rglob("*")
                          if "events.out" not in p.name) for name in runs}
    assert files["forked"] == files["fresh"]


@pytest.mark.parametrize("fresh", [False, True])
def test_the_guard_sees_weights_built_in_a_fork_as_in_a_fresh_interpreter(tmp_path, fresh):
    """tests/guarded.py watches transformers' model code: in a fork it is already imported (the server's), so the
    guard patches it in place; a command that builds weights must be reported either way, or every 'refused before
    any weights' test would pass without looking. Only a fresh interpreter can say whether torch was imported."""
    from conftest import run_guarded

    out, report = run_guarded("trainer.max_steps=1", "trainer.limit_val_batches=0", "data.max_length=64",
                              "data.batch_size=2", f"hydra.run.dir={tmp_path / 'run'}", fresh=fresh)
    assert out.returncode == 0, out.stderr[-2000:]
    assert report["weights_built"] and report["exit_code"] == 0
    assert report.get("torch_imported") is (True if fresh else None)
