"""OptunaSweeper: ask n_jobs trials, launch them as one batch of Hydra jobs, tell Optuna each one's result."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


class OptunaSweeper(Sweeper):
    def __init__(self, sampler: DictConfig | None, direction: str, storage: str | None, study_name: str,
                 n_trials: int, n_jobs: int, max_failure_rate: float, params: DictConfig) -> None:
        if not 0.0 <= max_failure_rate <= 1.0:
            raise ValueError(f"hydra.sweeper.max_failure_rate: must be in [0, 1], got {max_failure_rate}")
        if n_jobs < 1:
            raise ValueError(f"hydra.sweeper.n_jobs: must be >= 1, got {n_jobs}")
        self.sampler_cfg, self.direction, self.storage, self.study_name = sampler, direction, storage, study_name
        self.n_trials, self.n_jobs, self.max_failure_rate = n_trials, n_jobs, max_failure_rate
        self.params = {str(k): str(v) for k, v in (params or {}).items()}

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context = config, hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> None:
        import optuna
        from optuna.trial import TrialState

        from ._space import search_space

        # Optuna's warnings through Hydra's logging, in the sweep's format; its per-trial lines would repeat ours
        optuna.logging.disable_default_handler()
        optuna.logging.enable_propagation()
        optuna.logging.set_verbosity(optuna.logging.WARNING)

        # the command line after hydra.sweeper.params, so that it can pin or re-sweep a parameter
        space, fixed = search_space([f"{k}={v}" for k, v in self.params.items()] + list(arguments))
        storage = self._open_storage()
        before = _trials_so_far(storage, self.study_name)
        study = optuna.create_study(study_name=self.study_name, storage=storage, sampler=self._sampler(before),
                                    direction=self.direction, load_if_exists=True)
        log.info("Study %r in %s: %d trials so far, %d more, searching %s", self.study_name, self.storage or "memory",
                 before, self.n_trials, ", ".join(space))
        for number in close_abandoned_trials(study):
            log.warning("Trial %d was still RUNNING in the study (its sweep was killed): recorded as failed", number)

        done = failed = 0
        while done < self.n_trials:
            trials = [study.ask(space) for _ in range(min(self.n_jobs, self.n_trials - done))]
            batch = [[*fixed, *(f"{k}={v}" for k, v in t.params.items())] for t in trials]
            # job numbers continue the study's trial numbers, so a resumed sweep's trial folders do not restart at 0
            returns = self.launcher.launch(batch, initial_job_idx=trials[0].number)
            for trial, ret in zip(trials, returns):
                value, why = _objective(ret)
                if value is None:
                    study.tell(trial, state=TrialState.FAIL)
                    failed += 1
                    log.warning("Trial %d failed (%s): %s in %s", trial.number, why, trial.params, _job_dir(ret))
                else:
                    study.tell(trial, value)
                    log.info("Trial %d: %s -> %.6g", trial.number, trial.params, value)
            done += len(trials)
            if failed / done > self.max_failure_rate:
                # Hydra runs the multirun-end callbacks only after a sweep that returns: the sweep table
                # (lightning_moe/reporting/sweep.py) of the trials so far is written here before stopping
                self.hydra_context.callbacks.on_multirun_end(config=self.config)
                raise RuntimeError(f"{failed} of {done} trials failed, more than hydra.sweeper.max_failure_rate="
                                   f"{self.max_failure_rate}: stopped the sweep")

        completed = study.get_trials(deepcopy=False, states=[TrialState.COMPLETE])
        if completed:
            best = study.best_trial
            log.info("Best of %d completed trials: trial %d, %s -> %.6g", len(completed), best.number, best.params,
                     best.value)
        else:
            log.warning("No trial of study %r has completed", self.study_name)

    def _open_storage(self) -> Any:
        """A path: an Optuna journal file (no database needed). A URL: Optuna's database storage."""
        if self.storage is None or "://" in self.storage:
            return self.storage
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        Path(self.storage).parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(self.storage))

    def _sampler(self, trials_before: int) -> Any:
        """A sampler seeded with seed + the study's trials so far: with the configured seed alone, a resumed
        study would be proposed the first run's parameters again."""
        if self.sampler_cfg is None:
            return None
        seed = self.sampler_cfg.get("seed")
        return instantiate(self.sampler_cfg, **({} if seed is None else {"seed": seed + trials_before}))


def close_abandoned_trials(study: Any) -> list[int]:
    """Trials left RUNNING by a sweep that was killed mid-trial, told FAIL so the study and the sweep table agree
    (a study belongs to one sweep command at a time: its journal file is in the sweep directory)."""
    from optuna.trial import TrialState

    abandoned = [t.number for t in study.get_trials(deepcopy=False, states=[TrialState.RUNNING])]
    for number in abandoned:
        study.tell(number, state=TrialState.FAIL)
    return abandoned


def _trials_so_far(storage: Any, study_name: str) -> int:
    import optuna

    if storage is None or study_name not in optuna.get_all_study_names(storage):
        return 0
    return len(optuna.load_study(study_name=study_name, storage=storage).trials)


def _objective(ret: JobReturn) -> tuple[float | None, str]:
    """(the finite float the task returned, or None with why not)."""
    try:
        value = ret.return_value  # re-raises what the task raised
    except Exception as e:  # noqa: BLE001  one trial's error must not end the sweep
        return None, f"{type(e).__name__}: {e}"
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None, f"returned {value!r}"
    return (number, "") if math.isfinite(number) else (None, f"returned {number}")


def _job_dir(ret: JobReturn) -> str | None:
    return OmegaConf.select(ret.hydra_cfg, "hydra.runtime.output_dir") if ret.hydra_cfg else ret.working_dir
