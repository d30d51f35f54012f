"""Fine-tune a HF causal LM with LoRA + domain-expert MoE layers. See README.md.

    python train.py                                  # embedded tiny default: CPU, no download, < 2 min
    python train.py +recipe=therapeutic_h100         # the 12B therapeutic recipe
    python train.py -m moe.top_k=1,2 optim.lr=1e-4,3e-4   # a sweep, with a table of results at the end
"""

import sys

import hydra
from omegaconf import DictConfig

from lightning_moe.config import ConfigError, validate_config

EXIT_SIGTERM = 143  # 128 + SIGTERM: schedulers (Lightning jobs, SLURM) read it as "preempted, retry"


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    single_run = HydraConfig.get().mode == RunMode.RUN
    try:
        validate_config(cfg)  # before torch is imported: a bad override costs a second, not a model load
        from lightning_moe.data import DataError
        from lightning_moe.modeling import WeightsUnavailable
        from lightning_moe.pipeline import run

        try:
            summary = run(cfg)
        except (DataError, WeightsUnavailable) as e:
            raise ConfigError(str(e)) from e
    except ConfigError as e:
        if not single_run:
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if summary["stop_reason"] == "sigterm" and single_run:
        sys.exit(EXIT_SIGTERM)
    return summary.get("best_val_loss")  # what a sweeper (e.g. Optuna) minimises


if __name__ == "__main__":
    main()
