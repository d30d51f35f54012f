"""Lightning's ThroughputMonitor, with MFU against the dense bf16 peak that Lightning's table lacks for the H200."""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ThroughputMonitor

from lightning_moe.models.flops import dense_peak_flops
from lightning_moe.upstream import set_throughput_peak


class PeakFlopsThroughputMonitor(ThroughputMonitor):
    """MFU against lightning_moe.models.flops.dense_peak_flops; configure it with a length_fn counting real tokens."""

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        peak = dense_peak_flops(trainer.strategy.root_device, trainer.precision)
        if peak:
            set_throughput_peak(self, peak)
