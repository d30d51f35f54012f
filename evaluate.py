"""Evaluate a trained run against its base, per domain, with its routing and optional bias probes. See README.md,
"After training".

    python evaluate.py run=runs/a
    python evaluate.py run=[runs/a,runs/b]     # side by side (or run=SWEEP_DIR)
"""

from pathlib import Path

import hydra
from omegaconf import DictConfig

import lightning_moe.config.commands  # noqa: F401  (registers the command's schema)
from lightning_moe.cli import command_overrides, exit_on_user_error
from lightning_moe.paths import set_project_root

set_project_root(Path(__file__).parent)


@hydra.main(config_path="conf", config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    def _evaluate():
        from lightning_moe.evaluation.run import evaluate

        evaluate(cfg, command_overrides())

    exit_on_user_error(_evaluate, cfg)


if __name__ == "__main__":
    main()
