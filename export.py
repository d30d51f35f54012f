"""Export a trained run for serving: merged HF model, PEFT adapter, or one adapter per domain + its router.
See README.md, "After training".

    python export.py run=runs/a format=merged out=exports/a
"""

from pathlib import Path

import hydra
from omegaconf import DictConfig

import lightning_moe.config.commands  # noqa: F401  (registers the command's schema)
from lightning_moe.cli import command_overrides, exit_on_user_error
from lightning_moe.paths import set_project_root

set_project_root(Path(__file__).parent)


@hydra.main(config_path="conf", config_name="export", version_base="1.3")
def main(cfg: DictConfig) -> None:
    def _export():
        from lightning_moe.export.run import export_run

        export_run(cfg, command_overrides())

    exit_on_user_error(_export, cfg)


if __name__ == "__main__":
    main()
