"""One TensorBoard run for the whole pipeline, with stages continuing one step axis.

What the axis holds (docs/design.md §3): a training tag at step ``s`` is the batch of step ``s`` of the run; a
validation point at ``s`` is measured after that batch's update (Lightning's convention), except a stage's first
point, at its first step, which measures the sliced student before any update (``callbacks.ValidateAfterSlicing``).
"""

from __future__ import annotations

import json

from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only

# The metrics TensorBoard's HParams view shows beside the run's hyperparameters (the scalars of these tags).
HPARAM_METRICS = ("val/loss", "val/ppl", "val/kd_loss", "val/teacher_agreement")


def flatten_hparams(value, prefix: str = "") -> dict:
    """``{"a": {"b": 1}, "stages": [{"name": "x"}]}`` -> ``{"a/b": 1, "stages/0/name": "x"}``: the flat
    str/int/float/bool values TensorBoard's HParams view takes. A list of sections (the stages) is keyed by
    index; any other list, and None, becomes its JSON text."""
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, (list, tuple)) and value and all(isinstance(v, dict) for v in value):
        items = enumerate(value)
    else:
        return {prefix: value if isinstance(value, (bool, int, float, str)) else json.dumps(value, default=str)}
    flat = {}
    for key, item in items:
        flat.update(flatten_hparams(item, f"{prefix}/{key}" if prefix else str(key)))
    return flat


class ContinuousTensorBoardLogger(TensorBoardLogger):
    """Each stage is a fresh ``Trainer.fit`` whose ``global_step`` restarts at 0; the pipeline sets
    ``step_offset`` to the steps of the stages before, so ``train/loss`` reads as one curve."""

    def __init__(self, save_dir: str, **kwargs):
        super().__init__(save_dir=save_dir, name="", version="", default_hp_metric=False, **kwargs)
        self.step_offset = 0

    @rank_zero_only
    def log_metrics(self, metrics, step=None):
        super().log_metrics(metrics, None if step is None else step + self.step_offset)

    @rank_zero_only
    def log_hyperparams(self, params, metrics=None, step=None) -> None:
        """The run's configuration (Pipeline.run, once per run; the stage trainers run with
        ``enable_autolog_hparams=False``, since each stage's module would otherwise stand for the run). Lightning's
        own version declares its metrics by writing values for them (``hp_metric``); here the HParams view is
        pointed at the run's validation tags instead, and no scalar is written. ``hparams.yaml`` keeps ``params``
        as given (nested); the HParams view gets :func:`flatten_hparams` of them."""
        from torch.utils.tensorboard.summary import hparams

        self.hparams.update(params)
        declared = {tag: 0.0 for tag in (metrics or HPARAM_METRICS)}  # only the names are read
        writer = self.experiment._get_file_writer()  # what Lightning's own log_hyperparams writes through
        for summary in hparams(flatten_hparams(params), declared):
            writer.add_summary(summary)
        self.save()  # on disk now: a resumed run does not log them again

    def resume_at(self, step: int) -> None:
        """This process resumes a killed run, continuing the step axis at ``step`` (the step the first unfinished
        stage restarts from: its checkpoint's, or its first). The killed run may have written events at ``step``
        and beyond (steps after its last checkpoint) that this process writes again; TensorBoard hides those of
        the earlier events files (``SummaryWriter(purge_step=step)``: a session start at ``step``), so no step
        shows twice. Only the first writer of a process can purge, so only a call before anything is logged
        counts; this process writes nothing below ``step``."""
        if self._experiment is None:
            self._kwargs["purge_step"] = step
