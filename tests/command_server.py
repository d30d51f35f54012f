"""The tests' command server: `python SCRIPT ARG...` without paying the third-party imports each time.

    python tests/command_server.py          (started by conftest.run_command, one per pytest process)

A train.py run of the tests' size is mostly imports: torch, transformers (which scans its models folder on every
start), Lightning, peft (which imports bitsandbytes and with it torch's compiler) and datasets (CONTRIBUTING.md,
"Tests", has the measurement), and the suite starts over 90 such processes. This server imports that stack once,
then runs each requested command in a fork of itself, as the interpreter would run it:

- the child takes the request's environment, working directory, argv, stdin and output files (stdio rebuilt on
  them, buffered as PYTHONUNBUFFERED says), and sys.path as Python builds it (the script's folder, then
  PYTHONPATH, then the site folders);
- it runs the script as __main__ (runpy, so Lightning's DDP launcher re-launches `__main__.__file__` as usual),
  then ends as an interpreter does: a SystemExit's code, a traceback and 1 for an exception, non-daemon threads
  joined, atexit handlers run, streams flushed.

lightning_moe itself is never imported here: each child imports the project's code fresh. conftest.run_command
uses a real subprocess whenever the request's environment differs from the server's in a key a library reads at
import (only the keys in conftest's FORKABLE_ENV may differ), and everywhere when LMOE_TEST_SUBPROCESS=1.
tests/test_install.py checks that a forked run and a fresh interpreter give the same run.

Protocol, one JSON line each way on stdin/stdout: after the imports the server writes {"ready": true}; a request
{"argv", "cwd", "env", "stdin", "stdout", "stderr"} (paths of files; stderr may equal stdout) is answered with
{"pid": N} when the child starts and {"returncode": R} when it ends (negative: killed by that signal).
"""

from __future__ import annotations

import atexit
import io
import json
import os
import runpy
import signal
import sys
import threading
import traceback

# What a train.py, evaluate.py, generate.py, chat.py or export.py process imports before the project's own code
# does anything: the share of a short run that this server exists to pay once.
PRELOAD = [
    "torch",
    "transformers",
    "transformers.modeling_utils",
    "transformers.models.mistral.modeling_mistral",
    "transformers.models.llama.modeling_llama",
    "peft",
    "lightning.pytorch",
    "datasets",
    "torchdata.stateful_dataloader",
    "hydra",
    "omegaconf",
    "safetensors.torch",
]


def _stream(fd: int, template, writable: bool, unbuffered: bool, line_buffering: bool = False):
    """A text stream on `fd` as the interpreter makes one at start-up (same encoding and error handler)."""
    raw = io.FileIO(fd, "w" if writable else "r", closefd=False)
    if not writable:
        return io.TextIOWrapper(io.BufferedReader(raw), encoding=template.encoding, errors=template.errors)
    buffer = raw if unbuffered else io.BufferedWriter(raw)
    return io.TextIOWrapper(buffer, encoding=template.encoding, errors=template.errors,
                            line_buffering=line_buffering, write_through=unbuffered)


def _redirect(request: dict) -> None:
    write = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    inputs = os.open(request["stdin"] or os.devnull, os.O_RDONLY)
    out = os.open(request["stdout"], write, 0o644)
    err = out if request["stderr"] == request["stdout"] else os.open(request["stderr"], write, 0o644)
    for fd, target in ((inputs, 0), (out, 1), (err, 2)):
        os.dup2(fd, target)
    for fd in {inputs, out, err}:
        os.close(fd)
    unbuffered = bool(os.environ.get("PYTHONUNBUFFERED"))
    sys.stdin = sys.__stdin__ = _stream(0, sys.__stdin__, False, unbuffered)
    sys.stdout = sys.__stdout__ = _stream(1, sys.__stdout__, True, unbuffered)
    # stderr is line-buffered since Python 3.9 unless it is unbuffered
    sys.stderr = sys.__stderr__ = _stream(2, sys.__stderr__, True, unbuffered, line_buffering=not unbuffered)


def _child(request: dict, base_path: list[str]) -> None:
    code = 1
    try:
        os.environ.clear()
        os.environ.update(request["env"])
        os.chdir(request["cwd"])
        _redirect(request)
        script, *args = request["argv"][1:]
        sys.argv = [script, *args]
        extra = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        sys.path[:] = [os.path.dirname(os.path.realpath(script)), *map(os.path.abspath, extra), *base_path]
        try:
            runpy.run_path(script, run_name="__main__")
            code = 0
        except SystemExit as e:
            if e.code is None:
                code = 0
            elif isinstance(e.code, int):
                code = e.code
            else:
                print(e.code, file=sys.stderr)
                code = 1
        except KeyboardInterrupt:
            # an interpreter ended by Ctrl-C dies of SIGINT after its exit handlers
            code = -signal.SIGINT
        except BaseException:  # noqa: BLE001  printed as the interpreter prints an uncaught exception
            traceback.print_exc()
            code = 1
        threading._shutdown()  # what Py_Finalize does first: wait for non-daemon threads
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001  a closed or broken stream: nothing more to say
                pass
        if code < 0:
            signal.signal(-code, signal.SIG_DFL)
            os.kill(os.getpid(), -code)
        os._exit(code & 0xFF)


def _reply(message: dict) -> None:
    os.write(1, (json.dumps(message) + "\n").encode())


def main() -> None:
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    base_path = sys.path[1:]  # sys.path[0] is this file's folder; each child puts its script's there
    _reply({"ready": True})
    requests = sys.stdin.buffer
    while line := requests.readline():
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _child(request, base_path)
        _reply({"pid": pid})
        _, status = os.waitpid(pid, 0)
        _reply({"returncode": os.waitstatus_to_exitcode(status)})


if __name__ == "__main__":
    main()
