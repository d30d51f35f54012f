"""One run per directory at a time: an OS-level lock (flock) on the run directory itself, for the run's whole life.

The kernel holds it on the directory's inode, so neither deleting <run_dir>/.lock nor moving the directory lets a
second run in, and it releases it when the process ends, however it ends, so a killed run leaves no stale lock.
<run_dir>/.lock only says who holds it (pid, host, start, command), for the refusal's message; if that note was
deleted, the holder's pid is read from the kernel's table of locks (/proc/locks). Under DDP only global rank 0
takes it (the other ranks are that run's own processes).
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


def _holder(run_dir: Path, note: Path) -> str:
    """Who holds the lock: the note the holder wrote, else the pid the kernel lists for the directory's inode."""
    try:
        h = json.loads(note.read_text())
        return f"pid {h['pid']} on {h['host']} since {h['since']}: {h['command']}"
    except (OSError, ValueError, KeyError, TypeError):
        pass
    st = os.stat(run_dir)
    inode = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        for line in Path("/proc/locks").read_text().splitlines():
            fields = line.split()  # "1: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF"
            if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == inode:
                return f"pid {fields[4]}"
    except OSError:
        pass
    return "unknown process"


class RunLock:
    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / ".lock"  # the holder's note, not the lock
        self._fd: int | None = None

    def __enter__(self) -> "RunLock":
        if not _global_rank_zero():
            return self
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.run_dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunDirectoryBusy(
                f"hydra.run.dir: {self.run_dir} is in use by another run ({_holder(self.run_dir, self.path)}); wait "
                "for it to finish, or give this run its own directory (hydra.run.dir=NEW_DIR)") from None
        self._fd = fd
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S"),
                  "command": redact_text(" ".join(sys.argv))}
        self.path.write_text(json.dumps(holder))
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
