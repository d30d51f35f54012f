"""One run per directory at a time: an OS-level lock (flock) on <run_dir>/.lock for the run's whole life.

The kernel releases it when the process ends, however it ends, so a killed run leaves no stale lock. Under DDP
only global rank 0 takes it (the other ranks are that run's own processes). A second start on a locked directory
is refused, saying which process holds it.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from lightning_moe.config.schema import ConfigError
from lightning_moe.reporting.redact import redact_text


class RunDirectoryBusy(ConfigError):
    """Another process is training in this run directory."""


def _global_rank_zero() -> bool:
    return all(int(os.environ.get(k, 0)) == 0 for k in ("LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "RANK"))


class RunLock:
    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / ".lock"
        self._fd: int | None = None

    def __enter__(self) -> "RunLock":
        if not _global_rank_zero():
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode(errors="replace").strip()
            os.close(fd)
            raise RunDirectoryBusy(
                f"hydra.run.dir: {self.path.parent} is in use by another run ({holder or 'unknown process'}); wait "
                "for it to finish, or give this run its own directory (hydra.run.dir=NEW_DIR)") from None
        os.ftruncate(fd, 0)
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S"),
                  "command": redact_text(" ".join(sys.argv))}
        os.write(fd, json.dumps(holder).encode())
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
