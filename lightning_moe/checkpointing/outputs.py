"""Where the commands that read a run (evaluate.py, generate.py, export.py, chat.py's /save) may write, checked
before any weights load: never inside a training run (its record stays as training left it; the one exception is
evaluate.py's own `<run>/eval/`), never over an input or an existing file unless asked, never a directory given for
a file, and only where the file system lets us write and, where the size can be known, has room.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from lightning_moe.config.schema import ConfigError, RunFailure

RUN_MARKS = ("checkpoints", "summary.json", ".hydra", "logs")  # beside config.yaml: what train.py writes


def is_run_record(d: Path) -> bool:
    """A training run (config.yaml + what training writes beside it) or a sweep (multirun.yaml)."""
    return (d / "multirun.yaml").is_file() or (
        (d / "config.yaml").is_file() and any((d / m).exists() for m in RUN_MARKS))


def _existing_ancestor(path: Path) -> Path:
    for d in [path, *path.parents]:
        if d.exists():
            return d
    return Path("/")


def _size(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def check_output(out, *, key: str = "out", folder: bool = False, overwrite: bool = False, inputs=(),
                 needed_bytes: int | None = None) -> Path:
    """`out` checked as a new file (or, folder=True, a new folder); returns it as a Path. `inputs`: files the
    command reads, which it must never replace; `needed_bytes`: the size the output will take, if known."""
    out = Path(out)
    where = out.resolve()
    for d in [where, *where.parents]:
        if is_run_record(d) and not where.is_relative_to(d / "eval"):
            raise ConfigError(f"{key}: {out} is inside the training run {d}; commands that read a run never write "
                              f"into it: give a path outside it (evaluate.py's own place is {d / 'eval'}/)")
    for source in inputs:
        if Path(source).resolve() == where:
            raise ConfigError(f"{key}: {out} is also this command's input; give another {key}=PATH")
    if out.exists():
        if folder:
            if not out.is_dir() or any(out.iterdir()):
                raise ConfigError(f"{key}: {out} already exists; give a new {key}=DIR (nothing is ever replaced)")
        elif out.is_dir():
            raise ConfigError(f"{key}: {out} is a directory; give a file path, e.g. {key}={out / 'replies.jsonl'}")
        elif not overwrite:
            ask = f"another file ({key} FILE)" if key.startswith("/") else f"a new {key}=PATH, or overwrite=true"
            raise ConfigError(f"{key}: {out} already exists; give {ask}")
    parent = _existing_ancestor(where if folder else where.parent)
    if not parent.is_dir():
        raise ConfigError(f"{key}: {parent} is a file, so {out} cannot be created under it")
    try:  # a real write, not os.access: that says yes to root on a read-only file system's permission bits
        fd, probe = tempfile.mkstemp(dir=parent, prefix=".write-probe")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ConfigError(f"{key}: cannot write in {parent} ({e.strerror}); give a {key}= where you can write") from None
    if needed_bytes:
        check_free_space(out, needed_bytes, key)
    return out


def check_free_space(out, needed_bytes: int, key: str = "out") -> None:
    parent = _existing_ancestor(Path(out).resolve())
    free = shutil.disk_usage(parent).free
    if free < needed_bytes:
        raise ConfigError(f"{key}: {parent} has {_size(free)} free, this output needs about {_size(needed_bytes)}; "
                          "free some space or write elsewhere")


def write_file_atomic(out: Path, text: str) -> None:
    """`text` to `out` through a temporary sibling + rename: the file appears whole or not at all, and the
    temporary file is gone on every failure (a full disk, Ctrl-C)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, out)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(e, OSError):
            raise RunFailure(f"writing {out} failed ({e.strerror or e}); nothing was written") from e
        raise
