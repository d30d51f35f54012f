"""Run an entry point (train.py, evaluate.py, ...) and record, structurally, how far it got before it exited:

    python tests/guarded.py REPORT.json train.py ARG...

REPORT.json gets {"torch_imported": bool, "weights_built": bool, "exit_code": int} (torch_imported left out when
forked from tests/command_server.py, below). "weights_built" turns true
when transformers finishes building a model with any parameter off the meta device (a shape-only model on the
meta device, as the pre-weight checks build, does not count). The tests use it to prove that a bad config
fails before any weights exist, and that config-only checks fail before torch is even imported: what the code
did, not how long it took, so a slow machine cannot fail them.
"""

from __future__ import annotations

import atexit
import importlib.abc
import importlib.machinery
import json
import runpy
import sys
from pathlib import Path

report_path, entry, *args = sys.argv[1:]
state = {"torch_imported": False, "weights_built": False, "exit_code": None}


def _watch(pretrained_model_class) -> None:
    original = pretrained_model_class.post_init

    def post_init(self, *a, **kw):
        original(self, *a, **kw)
        if any(p.device.type != "meta" for p in self.parameters()):
            state["weights_built"] = True

    pretrained_model_class.post_init = post_init


class _Finder(importlib.abc.MetaPathFinder):
    """Patches transformers.modeling_utils as soon as it has been executed, without importing it early."""

    def find_spec(self, name, path, target=None):
        if name != "transformers.modeling_utils":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            _watch(module.PreTrainedModel)

        spec.loader.exec_module = exec_module
        return spec


# Forked from tests/command_server.py, this process has torch and transformers from the server: whether the
# command imported torch cannot be told (the report leaves torch_imported out, so a test that asks fails rather
# than passes; conftest.run_guarded(fresh=True) runs a real interpreter), and transformers' model code is watched
# where it already is.
PRELOADED = "torch" in sys.modules


def _write() -> None:
    if PRELOADED:
        del state["torch_imported"]
    else:
        state["torch_imported"] = "torch" in sys.modules
    Path(report_path).write_text(json.dumps(state))


if "transformers.modeling_utils" in sys.modules:
    _watch(sys.modules["transformers.modeling_utils"].PreTrainedModel)
else:
    sys.meta_path.insert(0, _Finder())
atexit.register(_write)
sys.argv = [entry, *args]
sys.path.insert(0, str(Path(entry).resolve().parent))
try:
    runpy.run_path(entry, run_name="__main__")
    state["exit_code"] = 0
except SystemExit as e:
    state["exit_code"] = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    raise
