"""The run's record of how it was started: config.yaml and .hydra/ (config.yaml, overrides.yaml, hydra.yaml).

Hydra would write .hydra/ itself at every start (conf/train.yaml turns that off: hydra.output_subdir=null), before
any check, with the raw command line: a rerun that is then refused would have replaced a finished run's record,
and a token typed as an override would sit in plain text. This writes them instead, secrets masked, when training
starts (or, for a sweep trial that failed before, with its failure).
"""

from __future__ import annotations

from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from lightning_moe.reporting.redact import redact, redact_text


def write_command_record(run_dir: Path, cfg: DictConfig | None) -> None:
    hydra_dir = run_dir / ".hydra"
    hydra_dir.mkdir(parents=True, exist_ok=True)
    if cfg is not None:
        plain = OmegaConf.create(redact(OmegaConf.to_container(cfg, resolve=True)))
        OmegaConf.save(plain, run_dir / "config.yaml")
        OmegaConf.save(OmegaConf.create(redact(OmegaConf.to_container(cfg, resolve=False))), hydra_dir / "config.yaml")
    if HydraConfig.initialized():
        hc = HydraConfig.get()
        overrides = [redact_text(o) for o in hc.overrides.task]
        OmegaConf.save(OmegaConf.create(overrides), hydra_dir / "overrides.yaml")
        node = redact(OmegaConf.to_container(hc, resolve=False))
        node["overrides"] = {"hydra": [redact_text(o) for o in hc.overrides.hydra], "task": overrides}
        OmegaConf.save(OmegaConf.create({"hydra": node}), hydra_dir / "hydra.yaml")
