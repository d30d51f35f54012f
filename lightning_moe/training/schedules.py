"""Learning-rate schedules as LambdaLR factors whose length can change while training.

transformers' schedules close over a fixed total step count. A budget-limited run does not know it in
advance: `lightning_moe.training.callbacks.budget.Budget` re-estimates how many steps fit in the remaining time and sets
`total` here, so the cosine reaches its floor as the budget ends instead of being cut mid-decay. The
factor is a plain object, so LambdaLR's state_dict saves `total` and a resumed run continues the curve.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class WarmupDecay:
    """Linear warm-up over `warmup` steps, then `kind` decay (cosine, linear, constant) to `min_ratio`."""

    warmup: int
    total: int
    kind: str = "cosine"
    min_ratio: float = 0.0

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / (self.warmup + 1)
        if self.kind == "constant":
            return 1.0
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if self.kind == "cosine" else 1.0 - progress
        return self.min_ratio + (1.0 - self.min_ratio) * shape
