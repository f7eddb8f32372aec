"""One TensorBoard run for the whole pipeline, with stages continuing one step axis."""

from __future__ import annotations

from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only


class ContinuousTensorBoardLogger(TensorBoardLogger):
    """Each stage is a fresh ``Trainer.fit`` whose ``global_step`` restarts at 0; the pipeline sets
    ``step_offset`` to the steps of the stages before, so ``train/loss`` reads as one curve."""

    def __init__(self, save_dir: str, **kwargs):
        super().__init__(save_dir=save_dir, name="", version="", default_hp_metric=False, **kwargs)
        self.step_offset = 0

    @rank_zero_only
    def log_metrics(self, metrics, step=None):
        super().log_metrics(metrics, None if step is None else step + self.step_offset)
