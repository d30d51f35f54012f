"""Each expert form's own knobs, as `moe.<form>.<knob>`: the routers' pattern (config/routers.py) for expert forms.

A form with knobs of its own names its torch-free config class in its ExpertForm (config/registry.py's EXPERTS);
`MoEConfig` gets one section per such form (`moe.upcycled.noise=0.01` needs no `+`), `check(moe, sec)` runs for the
chosen form only, and a section of another form set away from its defaults is refused (validate.py). What several
forms share stays in `MoEConfig` (`expert_dim`, `lora_r`, `lora_alpha`, `lora_targets`). The flat keys that moved
here are in config/routers.py's MOVED, with the routers': an old command line is refused naming the new key.
No torch here: validation runs before the training stack loads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lightning_moe.config.routers import check


@dataclass
class ExpertFormConfig:
    """No knobs, no rules: what a form registered without a config class gets."""

    def check(self, moe: Any, sec: Any) -> None:
        """Rules of this form's own (moe: the shared MoEConfig, sec: every section); raise ConfigError."""


@dataclass
class UpcycledConfig(ExpertFormConfig):
    train: str = "lora"  # lora: the copies stay frozen and train through a rank-moe.lora_r LoRA each | full: they train
    noise: float = 0.0  # Gaussian noise on the copies, as a fraction of each weight's std (breaks their symmetry)

    def check(self, moe: Any, sec: Any) -> None:
        check(self.train in ("lora", "full"), "moe.upcycled.train", f"'{self.train}' is not one of lora, full")
        check(self.noise >= 0, "moe.upcycled.noise", "must be >= 0 (0: exact copies)")
