"""The helper scripts: the bundled tokenizer is reproducible, and the Lightning.ai job command is a valid run."""

from __future__ import annotations

import importlib.util
import shlex
import subprocess
import sys

from conftest import REPO, compose

from lightning_moe.config import validate_config


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bundled_tokenizer_is_rebuilt_identically_from_the_bundled_data(tmp_path):
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "build_tokenizer.py"), "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (tmp_path / name).read_bytes() == (REPO / "lightning_moe" / "assets" / "tokenizer" / name).read_bytes(), name


def test_lightning_job_command_is_a_valid_resumable_run(tmp_path, capsys):
    job = _load_script("lightning_job")
    assert job.main(["--name", "t1", "--dry-run", "--num-machines", "2", "--devices", "8", "--",
                     "+recipe=therapeutic_h100", "optim.lr=1e-4"]) == 0
    command = capsys.readouterr().out.splitlines()[1].strip()
    argv = shlex.split(command.replace("$LIGHTNING_ARTIFACTS_DIR", str(tmp_path)))
    assert argv[:2] == ["python", "train.py"]
    assert f"hydra.run.dir={tmp_path}/t1" in argv  # fixed: a restarted attempt finds its checkpoints
    overrides = [a for a in argv[2:] if not a.startswith("hydra.")]
    cfg = compose(overrides)
    validate_config(cfg)
    assert (cfg.trainer.num_nodes, cfg.trainer.strategy, cfg.trainer.devices) == (2, "ddp", 8)
    assert cfg.optim.lr == 1e-4 and cfg.model.name_or_path == "LatitudeGames/Wayfarer-2-12B"


def test_benchmark_qlora_variants_name_a_tokenizer_that_loads(tmp_path, monkeypatch):
    """The QLoRA variants run on a GPU only, so nothing else runs their command; its overrides must at least
    compose, validate and find their tokenizer (they once named its old folder under data/, long moved into
    the package)."""
    from argparse import Namespace

    from lightning_moe.models.tokenizer import load_tokenizer

    benchmark = _load_script("benchmark")
    a = Namespace(recipe="therapeutic_h100_fast", arch="tiny-mistral", seq=64, warmup=1, micro_batches=1,
                  scratch=tmp_path, profile=False, memory=False, override=[])
    (tmp_path / "random-tiny-mistral").mkdir()
    (tmp_path / "random-tiny-mistral" / "config.json").write_text("{}")  # the weights this variant would build
    (tmp_path / "out").mkdir()
    # the benchmark runs train.py, whose relative paths resolve against the project root, not the working directory
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LIGHTNING_MOE_ROOT", str(REPO))
    for name in ("qlora", "qlora_upcast", "qlora_24gb_a"):
        argv = benchmark.train_args(name, a, tmp_path / "out")
        overrides = [x for x in argv[2:] if not x.startswith(("hydra.", "+callbacks.bench"))]
        model = validate_config(compose(overrides)).model
        assert load_tokenizer(model).chat_template, name
