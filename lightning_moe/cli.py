"""What the entry points (train.py, evaluate.py, generate.py, chat.py, export.py) share: exit codes, turning the
project's errors into one-line messages, and the stages every command runs before anything large.

Imports no torch: a config mistake is reported before the heavy stack loads.
"""

from __future__ import annotations

import logging
import sys
import warnings
from typing import Callable

from lightning_moe.config.schema import ConfigError, RunFailure

EXIT_RUNTIME = 1  # the run failed (e.g. a checkpoint could not be written), named in the message
EXIT_CONFIG = 2  # a config, data or input mistake, named in the message
EXIT_SIGTERM = 143  # 128 + SIGTERM: schedulers (Lightning jobs, SLURM) read it as "preempted, retry"


# Third-party notices a user of this repository cannot act on: deprecations inside libraries, bitsandbytes'
# optional CPU kernels, Lightning's tip about litlogger.
_NOISY_WARNINGS = (".*set_vital.*", ".*LeafSpec.*", ".*is_gradient_checkpointing.*", ".*gradient_checkpointing_enable.*",
                   ".*litlogger.*", ".*Checkpoint directory .* exists and is not empty.*")
_NOISY_LOGGERS = ("bitsandbytes",)
# Lightning's advertisement for litlogger, at every Trainer start; and its note that it ignores Trainer(max_time=)
# because a Timer callback is there: that Timer is our budget (training/callbacks), built from trainer.max_time
_NOISY_LINES = ("💡 Tip:", "Ignoring `Trainer(max_time=...)`")


class _DropLines(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_NOISY_LINES)


class _PrintedByLightning(logging.Filter):
    """On the root logger's console handlers: `import lightning` gives its logger a console handler of its own and
    lets records propagate too, so "GPU available: ..." was printed twice. Lightning's own handler prints them;
    log files (Hydra's <run_dir>/train.log) still get them through the root."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.name.startswith("lightning") and logging.getLogger("lightning").handlers)


def quiet_third_party() -> None:
    """Filter third-party noise, and mask secrets in every log line (Hydra has configured logging by now)."""
    from lightning_moe.reporting.redact import redact_logs

    redact_logs()
    for handler in logging.getLogger().handlers:
        if type(handler) is logging.StreamHandler and not any(isinstance(f, _PrintedByLightning) for f in handler.filters):
            handler.addFilter(_PrintedByLightning())
    for pattern in _NOISY_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _DropLines) for f in rank_zero.filters):
        rank_zero.addFilter(_DropLines())


def exit_on_user_error(fn: Callable[[], object], command_cfg=None) -> object:
    """Run `fn`; a ConfigError (bad config, data, prompt file, unreachable weights, busy run directory: each a
    subclass) prints `error: ...` naming what to change, and exits 2. `command_cfg` (the use-side commands'):
    its own keys are checked first (lightning_moe.config.commands.check_command)."""
    from omegaconf.errors import MissingMandatoryValue

    quiet_third_party()
    try:
        if command_cfg is not None:
            from lightning_moe.config.commands import check_command

            check_command(command_cfg)
        return fn()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_CONFIG)
    except MissingMandatoryValue as e:  # a `???` read later than check_command looks (e.g. inside a section)
        print(f"error: {e.full_key or e.key}: required; give it on the command line", file=sys.stderr)
        sys.exit(EXIT_CONFIG)
    except RunFailure as e:  # e.g. a full disk: one line naming the file, not a traceback through Lightning
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_RUNTIME)


def command_overrides() -> list[str]:
    """The command line's overrides (Hydra's), for composing a trained run's saved config under them."""
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task)
