"""What the entry points (train.py, evaluate.py, generate.py, chat.py, export.py) share: exit codes, turning the
project's errors into one-line messages, and the stages every command runs before anything large.

Imports no torch: a config mistake is reported before the heavy stack loads.
"""

from __future__ import annotations

import sys
from typing import Callable

from lightning_moe.config.schema import ConfigError

EXIT_CONFIG = 2  # a config, data or input mistake, named in the message
EXIT_SIGTERM = 143  # 128 + SIGTERM: schedulers (Lightning jobs, SLURM) read it as "preempted, retry"


def exit_on_user_error(fn: Callable[[], object]) -> object:
    """Run `fn`; a ConfigError (bad config, data, prompt file, unreachable weights, busy run directory: each a
    subclass) prints `error: ...` naming what to change, and exits 2."""
    try:
        return fn()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_CONFIG)
