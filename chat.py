"""Talk to a trained run in the terminal, through its chat template. See README.md, "After training".

    python chat.py run=runs/a
    echo "I can't sleep before exams" | python chat.py run=runs/a
"""

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

import lightning_moe.config.commands  # noqa: F401  (registers the command's schema)
from lightning_moe.cli import command_overrides, exit_on_user_error
from lightning_moe.paths import set_project_root

set_project_root(Path(__file__).parent)


@hydra.main(config_path="conf", config_name="chat", version_base="1.3")
def main(cfg: DictConfig) -> None:
    def _chat():
        from lightning_moe.generation.terminal import check_open

        check_open(sys.stdin)  # before torch and the weights load: a closed input is refused at once
        from lightning_moe.checkpointing.load import plan_load
        from lightning_moe.generation.chat import chat

        chat(plan_load(cfg.run, cfg.checkpoint, command_overrides(), cfg.device), cfg)

    exit_on_user_error(_chat, cfg)


if __name__ == "__main__":
    main()
