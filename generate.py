"""Replies from a trained run to a JSONL file of prompts. See README.md, "After training".

    python generate.py run=runs/a prompts=prompts.jsonl out=replies.jsonl
"""

from pathlib import Path

import hydra
from omegaconf import DictConfig

import lightning_moe.config.commands  # noqa: F401  (registers the command's schema)
from lightning_moe.cli import command_overrides, exit_on_user_error
from lightning_moe.paths import set_project_root

set_project_root(Path(__file__).parent)


@hydra.main(config_path="conf", config_name="generate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    exit_on_user_error(lambda: _generate(cfg), cfg)


def _generate(cfg: DictConfig) -> None:
    from lightning_moe.generation.prompts import read_prompts

    rows = read_prompts(cfg.prompts)  # every row checked before anything large
    from lightning_moe.checkpointing.outputs import check_output

    check_output(cfg.out, overwrite=cfg.overwrite, inputs=[cfg.prompts])  # never into a run, never over a file
    from lightning_moe.checkpointing.load import plan_load
    from lightning_moe.generation.batch import generate_file

    plan = plan_load(cfg.run, cfg.checkpoint, command_overrides(), cfg.device)
    generate_file(plan, rows, cfg)


if __name__ == "__main__":
    main()
