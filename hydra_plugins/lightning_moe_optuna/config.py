"""The sweeper's structured config: `override /hydra/sweeper: optuna` selects it."""

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore


@dataclass
class OptunaSweeperConf:
    _target_: str = "hydra_plugins.lightning_moe_optuna.sweeper.OptunaSweeper"
    # The sweeper builds the sampler itself (not Hydra), so that a resumed study gets a seed of its own
    _recursive_: bool = False
    # an instantiate-style node, e.g. {_target_: optuna.samplers.TPESampler, seed: 0}; null: Optuna's default
    sampler: Any = None
    direction: str = "minimize"  # or maximize: what the task function returns
    # A file path: an Optuna journal file (created with its folder). A URL (sqlite:///..., postgresql://...) is
    # given to Optuna as a database storage. null: in memory, so not resumable.
    storage: str | None = None
    study_name: str = "sweep"  # fixed, so that the same command finds the same study again
    n_trials: int = 20  # trials per invocation, added to those the study already has
    n_jobs: int = 1  # trials per launcher batch (run in parallel only by a parallel launcher)
    # Stop (and exit non-zero) once more than this fraction of this invocation's trials failed; 1.0: never
    max_failure_rate: float = 0.0
    # key: sweep in Hydra's override grammar, e.g. `tag(log, interval(1e-4, 3e-3))`, `choice(8, 16)`, `range(1, 5)`
    params: dict[str, str] = field(default_factory=dict)


ConfigStore.instance().store(group="hydra/sweeper", name="optuna", node=OptunaSweeperConf, provider="lightning_moe")
