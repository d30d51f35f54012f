"""run_command: `python SCRIPT ARG...` for the tests, forked from tests/command_server.py when that is faithful.

Returns what subprocess.run(..., capture_output or stderr=STDOUT, text=True) returns. The command runs in a fork of
a server that has already imported the third-party stack (command_server.py says why and how), unless:
- LMOE_TEST_SUBPROCESS=1 (every command a real subprocess: the way to rule the server out when a test fails);
- the command is not `sys.executable SCRIPT.py ...`;
- its environment differs from the server's in a key outside FORKABLE_ENV: a variable a library may read when it
  is imported (HF_*, TORCH*, OMP_NUM_THREADS, HOME...) needs an interpreter that imports with it.
"""

from __future__ import annotations

import atexit
import io
import json
import locale
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

SERVER = Path(__file__).resolve().parent / "command_server.py"

# Read only after start-up: by the project's code (imported fresh in every child), by code the server does not
# import (wandb: tests/test_forked_commands.py checks), by huggingface_hub when a token is asked for (HF_TOKEN),
# when torch's compiler first writes its caches, or by pytest itself. Anything else that differs from the
# server's environment gets a real interpreter.
FORKABLE_ENV = {"MASTER_PORT", "MASTER_ADDR", "NODE_RANK", "PYTHONPATH", "PYTHONUNBUFFERED", "WANDB_MODE",
                "WANDB_API_KEY", "HF_TOKEN", "LIGHTNING_MOE_ROOT", "TERM", "TORCHINDUCTOR_CACHE_DIR",
                "TRITON_CACHE_DIR", "PYTEST_CURRENT_TEST"}


class CommandServer:
    def __init__(self, env: dict, cwd: Path):
        self.env = dict(env)
        self.proc = subprocess.Popen([sys.executable, str(SERVER)], cwd=cwd, env=self.env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE)
        self._pending = b""
        self.lock = threading.Lock()
        ready = self._read(timeout=600)
        if ready != {"ready": True}:
            raise RuntimeError(f"command server did not start: {ready}")

    def _read(self, timeout: float | None) -> dict | None:
        """The next reply line, or None when `timeout` seconds pass first."""
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._pending:
            ready, _, _ = select.select([fd], [], [], timeout)
            if not ready:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                raise RuntimeError(f"command server exited ({self.proc.wait()})")
            self._pending += chunk
        line, self._pending = self._pending.split(b"\n", 1)
        return json.loads(line)

    def forkable(self, argv: list[str], env: dict) -> bool:
        different = {k for k in set(env) | set(self.env) if env.get(k) != self.env.get(k)}
        return (self.proc.poll() is None and argv[0] == sys.executable and len(argv) > 1
                and argv[1].endswith(".py") and different <= FORKABLE_ENV)

    def run(self, argv, cwd, env, timeout, stdin: str | None, merge: bool) -> subprocess.CompletedProcess:
        with tempfile.TemporaryDirectory(prefix="forked-") as tmp, self.lock:
            files = {name: os.path.join(tmp, name) for name in ("stdin", "stdout", "stderr")}
            if stdin is not None:
                Path(files["stdin"]).write_bytes(stdin.encode(locale.getpreferredencoding(False)))
            request = {"argv": argv, "cwd": str(cwd), "env": env, "stdin": files["stdin"] if stdin is not None else None,
                       "stdout": files["stdout"], "stderr": files["stdout"] if merge else files["stderr"]}
            self.proc.stdin.write((json.dumps(request) + "\n").encode())
            self.proc.stdin.flush()
            pid = self._read(timeout=60)["pid"]
            done = self._read(timeout=timeout)
            if done is None:  # as subprocess.run: kill it, then raise with what it wrote
                os.kill(pid, signal.SIGKILL)
                self._read(timeout=60)
                raise subprocess.TimeoutExpired(argv, timeout, output=_text(files["stdout"]))
            out = _text(files["stdout"])
            err = None if merge else _text(files["stderr"])
            return subprocess.CompletedProcess(argv, done["returncode"], out, err)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)


def _text(path: str) -> str:
    """A captured file decoded as subprocess.run(text=True) decodes a pipe (locale encoding, universal newlines)."""
    data = Path(path).read_bytes() if os.path.exists(path) else b""
    return io.TextIOWrapper(io.BytesIO(data), encoding=locale.getpreferredencoding(False)).read()


_server: CommandServer | None = None


def _get_server(env: dict, cwd: Path) -> CommandServer:
    global _server
    if _server is None or _server.proc.poll() is not None:
        _server = CommandServer(env, cwd)
        atexit.register(_server.close)
    return _server


def run_command(argv: list[str], *, cwd: Path, env: dict, timeout: float, stdin: str | None = None,
                merge: bool = False, server_env: dict, fresh: bool = False) -> subprocess.CompletedProcess:
    """`argv` as subprocess.run would run it (stderr into stdout when `merge`), forked when faithful and not
    `fresh`. `server_env`: the environment the server imports in (the tests' clean_env); started on the first
    call, once per process."""
    if not fresh and os.environ.get("LMOE_TEST_SUBPROCESS") != "1":
        server = _get_server(server_env, cwd)
        if server.forkable(argv, env):
            return server.run(argv, cwd, env, timeout, stdin, merge)
    return subprocess.run(argv, cwd=cwd, env=env, input=stdin, text=True, timeout=timeout, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT if merge else subprocess.PIPE)
