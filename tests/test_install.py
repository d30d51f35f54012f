"""The install: what CI and `make` put in the virtualenv, and what it prints."""

from __future__ import annotations

import re
import subprocess
import sys

from conftest import REPO
from test_layout import _requirement_names


def test_the_lock_pins_every_requirement_and_no_cuda_only_package():
    """CI installs requirements.txt under requirements.lock: each requirement has exactly one pinned version there
    (a name missing from the lock would float with the day), and the CPU lock holds none of the CUDA-only packages
    that requirements-gpu.txt adds."""
    lock = {}
    for line in (REPO / "requirements.lock").read_text().splitlines():
        spec = line.split("#")[0].strip()
        if spec:
            name, _, version = spec.partition("==")
            assert version, f"requirements.lock: {spec!r} is not pinned with =="
            lock[re.sub(r"[-_.]+", "-", name.lower())] = version
    for name in _requirement_names((REPO / "requirements.txt").read_text().splitlines()):
        name, _, extra = name.rstrip("]").partition("[")
        if name != "torch":  # the Makefile's TORCH picks the build: CPU here, CUDA on a GPU machine
            assert re.sub(r"[-_.]+", "-", name) in lock, f"{name} is not pinned in requirements.lock"
        if extra:  # `transformers[serving]`: the packages the extra adds are pinned too, under their own names
            for dep in set(_extra_requirements(name, extra)) - {"torch"}:
                assert re.sub(r"[-_.]+", "-", dep) in lock, f"{dep} ({name}[{extra}]) is not pinned in the lock"
    for name in [*_requirement_names((REPO / "requirements-gpu.txt").read_text().splitlines()), "triton"]:
        assert name not in lock, f"{name} is CUDA-only but pinned in the CPU lock"
    assert "torch" not in lock


def _extra_requirements(dist: str, extra: str) -> list[str]:
    """The names `dist[extra]` adds, from the installed distribution's metadata (what pip resolved)."""
    from importlib.metadata import requires

    from packaging.requirements import Requirement

    return [Requirement(r).name.lower() for r in requires(dist) or []
            if Requirement(r).marker and Requirement(r).marker.evaluate({"extra": extra})]


def test_importing_the_stack_prints_no_warning_about_optional_kernels():
    """bitsandbytes looks for an optional CPU kernel on the Hub at import (on CPUs with AVX-512 BF16), torchao for
    its CUDA-only libraries, and each warned in every script that imports peft; lightning_moe keeps only their
    errors (lightning_moe/__init__.py)."""
    out = subprocess.run([sys.executable, "-c", "import lightning_moe, peft, bitsandbytes, transformers"], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    for noise in ("gemm_4bit_forward", "Failed to load", "register_constant"):
        assert noise not in out.stderr + out.stdout, noise


def test_liger_missing_on_a_gpu_machine_is_named_before_weights():
    """The CPU install has no liger-kernel; a GPU machine that lacks it is told which list adds it."""
    import importlib.util

    import pytest

    from lightning_moe.config import ConfigError
    from lightning_moe.models.prechecks import check_liger

    if importlib.util.find_spec("liger_kernel") is not None:
        pytest.skip("liger-kernel is installed here (a GPU install)")
    with pytest.raises(ConfigError, match="requirements-gpu.txt"):
        check_liger("mistral", "gpu", cuda_available=True)


def test_xdist_groups_keep_their_tests_on_one_worker(tmp_path):
    """`make test` runs `-n 2 --dist loadgroup`, and the fixtures that train once for several tests (lora_run,
    smollm2_run) count on `xdist_group` sending those tests to one worker. pytest 9.2 broke that without a word
    (pytest-xdist #1386: the tests spread as if unmarked, each worker training its own copy), which is why
    requirements.txt caps pytest: this fails if an upgrade of the lock lets it through again."""
    (tmp_path / "test_grouped.py").write_text(
        "import os, pytest\n"
        + "".join(f"@pytest.mark.xdist_group('g')\ndef test_{i}():\n    print('worker', os.environ['PYTEST_XDIST_WORKER'])\n"
                  for i in range(4))
        + "".join(f"def test_free_{i}():\n    pass\n" for i in range(4)))
    out = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-n", "2", "--dist", "loadgroup",
                          "-v", "-rP", str(tmp_path / "test_grouped.py")],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:]
    workers = {line.split()[0] for line in out.stdout.splitlines() if "PASSED" in line and "::test_" in line
               and "test_free" not in line}
    assert len(workers) == 1, out.stdout[-2000:]  # one worker, e.g. {'[gw0]'}
