"""Shared helpers: real Hydra composition, tiny real HF models, and the entry points run as commands."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `pytest -n 2` on 2 cores: one thread per process, or OpenMP's spinning threads oversubscribe the cores (two
    # 2-thread trainings side by side ran 7x slower than one after the other; 1 thread each, 1.3x faster in all)
    os.environ["OMP_NUM_THREADS"] = "1"

import torch  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
COUNSEL_CHAT_CSV = SHARED / "datasets" / "counsel_chat" / "20200325_counsel_chat.csv"
TINY_ARCHS = ["tiny-mistral", "tiny-llama", "tiny-qwen2", "tiny-gemma", "tiny-phi3"]


def compose(overrides: list[str] | None = None, run_dir: str | Path = "/tmp/lightning-moe-test"):
    """The real config tree composed as `python train.py <overrides>` would, with run_dir set."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return hydra_compose("train", overrides=[*(overrides or []), f"run_dir={run_dir}"])


def tiny_hf_config(arch: str = "tiny-mistral", **overrides):
    from lightning_moe.models.architecture import resolve_model_config
    from lightning_moe.config.schema import ModelConfig

    cfg = resolve_model_config(ModelConfig(init="random", arch=arch))
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def tiny_model(arch: str = "tiny-mistral", seed: int = 0, attn: str = "sdpa", **overrides):
    from transformers import AutoModelForCausalLM

    from lightning_moe.models import varlen

    varlen.register()
    torch.manual_seed(seed)
    overrides.setdefault("use_cache", False)  # as in training; a KV cache also turns off packed-sequence masks
    return AutoModelForCausalLM.from_config(tiny_hf_config(arch, **overrides), attn_implementation=attn).eval()


@pytest.fixture(scope="session")
def tokenizer():
    from lightning_moe.config.schema import ModelConfig
    from lightning_moe.models.tokenizer import load_tokenizer

    return load_tokenizer(ModelConfig(init="random", arch="tiny-mistral", tokenizer="bundled"))


def train_cmd(*args: str) -> list[str]:
    return [sys.executable, str(REPO / "train.py"), *args]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra: str) -> dict:
    """The environment of a user's shell, plus a port of its own for a DDP rendezvous: two DDP runs on two xdist
    workers must not meet on one port."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "HF_HUB_OFFLINE", "MASTER_PORT"))}
    env.update(PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", MASTER_PORT=str(free_port()))
    env.update(extra)
    return env


def run_entry(entry: str | Path, *args: str, cwd: Path = REPO, env: dict | None = None, stdin: str | None = None,
              timeout: float = 300, merge: bool = False, fresh: bool = False) -> subprocess.CompletedProcess:
    """`python ENTRY ARG...` (train.py, evaluate.py, ...) as a user runs it: stdout and stderr apart, or merged.
    Forked from tests/command_server.py, which has the third-party stack imported already (forked.py says when
    it falls back to a real interpreter; `fresh` and LMOE_TEST_SUBPROCESS=1 always do)."""
    from forked import run_command

    return run_command([sys.executable, str(REPO / entry), *map(str, args)], cwd=cwd, env=env or clean_env(),
                       timeout=timeout, stdin=stdin, merge=merge, server_env=clean_env(), fresh=fresh)


def run_train(*args: str, cwd: Path = REPO, timeout: float = 300, env: dict | None = None):
    """Run train.py as a user would; returns the CompletedProcess (stdout and stderr merged)."""
    return run_entry("train.py", *args, cwd=cwd, env=env, timeout=timeout, merge=True)


def run_guarded(*args: str, entry: str = "train.py", cwd: Path = REPO, env: dict | None = None, timeout: float = 300,
                fresh: bool = False):
    """Run an entry point under tests/guarded.py: (CompletedProcess, report). The report says whether weights were
    built before the process exited and, with `fresh` (a real interpreter: a forked command has torch from the
    command server), whether torch was imported (structural, not timed). stdout and stderr apart."""
    report = Path(tempfile.mkdtemp()) / "report.json"
    out = run_entry("tests/guarded.py", report, REPO / entry, *args, cwd=cwd, env=env, timeout=timeout, fresh=fresh)
    return out, json.loads(report.read_text())


def run_script(script: Path, *args, cwd: Path = REPO, timeout: float = 120, env: dict | None = None):
    """Run a scripts/ file as from a fresh clone (no PYTHONPATH); stdout and stderr kept apart."""
    env = env or {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, str(script), *map(str, args)],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


def read_summary(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "summary.json").read_text())


# Fixtures that train with train.py (or convert the real model): a test that needs one is a full run, whatever its
# own body does, so it is marked slow here rather than by hand (on a loaded 2-core machine the trained_run fixture
# alone took 50-120 s, and the refusal tests that read it 10-25 s each: make test-fast was 7.5 minutes with them)
TRAINING_FIXTURES = {"trained_run", "finished_run", "lora_run", "uninterrupted", "smollm2", "smollm2_run"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if TRAINING_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, worker_id) -> Path:
    """`python train.py` (the embedded default) once per test session, shared by every test that only reads a
    trained run's outputs or loads it (evaluate, generate, chat, export); with pytest-xdist the workers share it
    through a file lock. Tests must not write into it."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp() if worker_id == "master" else tmp_path_factory.getbasetemp().parent
    run_dir = root / "trained_run"
    with FileLock(str(root / "trained_run.lock")):
        if not (run_dir / "summary.json").is_file():
            out = run_train(f"hydra.run.dir={run_dir}", timeout=600)
            assert out.returncode == 0, out.stdout[-3000:]
    return run_dir


# Short runs for tests that check wiring rather than learning: a few steps, one validation at the end.
FAST = [
    "trainer.max_steps=4",
    "trainer.val_check_interval=4",
    "trainer.limit_val_batches=2",
    "data.max_length=128",
    "data.batch_size=4",
]


SMOLLM2_DIR = REPO / "cache" / "models" / "smollm2-135m-instruct"


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """The real pretrained model (SmolLM2-135M-Instruct) converted by scripts/get_model.py into the repository's
    git-ignored cache: downloaded and converted once (about two minutes), then reused by every later session;
    pytest-xdist's workers wait on a file lock rather than converting it twice."""
    from filelock import FileLock

    SMOLLM2_DIR.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(SMOLLM2_DIR.parent / ".smollm2.lock")):
        if not (SMOLLM2_DIR / "source.json").is_file():
            out = run_script(REPO / "scripts" / "get_model.py", timeout=900)
            assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    return SMOLLM2_DIR
