"""What a stage logs besides its losses: parameter counts and widths, the validation of the sliced student before
its first step, token throughput (and MFU on GPUs), a progress bar that names the stage and counts its steps, the
module summary without its FLOPs, and the train / validate phases of the measured memory trace (memory_trace.py)."""

from __future__ import annotations

import logging
import sys
import time

import torch
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelSummary, TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm
from lightning.pytorch.utilities.model_summary.model_summary import _format_summary_table

from lightning_slimmoe import memory_trace
from lightning_slimmoe.families import get_family
from lightning_slimmoe.params import count_params

# Dense bf16 peak of common accelerators (FLOP/s), for MFU.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


class ParamAndWidthLogger(Callback):
    """``params/total``, ``params/active`` and the widths of the student, once per stage."""

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.global_step > 0:  # resumed mid-stage: logged when the stage began, before its first checkpoint
            return
        student = pl_module.student
        counts = count_params(student)
        family = get_family(student)
        metrics = {"params/total": float(counts.total), "params/active": float(counts.active),
                   "slim/expert_width": float(family.expert_width(student.config)),
                   "slim/num_attention_heads": float(student.config.num_attention_heads),
                   "slim/num_key_value_heads": float(student.config.num_key_value_heads)}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)


class ValidateAfterSlicing(Callback):
    """The held-out metrics of the student a KD stage starts from (just sliced), before its first update: the first
    point of the stage's ``val/`` curves, at its first step, so that the curve shows what the slice cost and then the
    recovery. Lightning's sanity check is that validation: it runs after ``setup`` (where ExpertSlimming slices) and
    before the first step, leaves the random state as it was (so training is unchanged), and is skipped when a stage
    resumes from a checkpoint (its point was logged then). The pipeline asks for all of it (``num_sanity_val_steps=-1``:
    every batch ``limit_val_batches`` allows); Lightning does not log a sanity check's metrics, so this callback
    does. ``seconds``: what it took (not counted in the stage's throughput)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._started = None

    def on_sanity_check_start(self, trainer, pl_module) -> None:
        self._started = time.perf_counter()

    def on_sanity_check_end(self, trainer, pl_module) -> None:
        self.seconds = time.perf_counter() - self._started
        metrics = {name: float(value) for name, value in trainer.callback_metrics.items() if name.startswith("val/")}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)


class TokenThroughput(Callback):
    """``perf/tokens_per_s`` of each optimizer step and, on a known GPU, ``perf/mfu`` with FLOPs counted as SlimMoE
    training spends them: student forward+backward (6 × active params) + teacher forward (2 × active params).
    (Lightning's ``ThroughputMonitor`` logs samples and FLOPs under its own tag names; the run contract's tags
    are these.)"""

    def __init__(self, tokens_per_batch: int):
        self.tokens_per_batch = tokens_per_batch
        self._start = None
        self.flops_per_token = None
        self.peak = None

    def on_train_start(self, trainer, pl_module) -> None:
        flops = 6 * count_params(pl_module.student).active
        if pl_module.teacher is not None:
            flops += 2 * count_params(pl_module.teacher).active
        self.flops_per_token = flops
        self.peak = peak_flops(pl_module.device)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._start is None:
            return
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        tokens_per_s = self.tokens_per_batch * trainer.world_size / (time.perf_counter() - self._start)
        pl_module.log("perf/tokens_per_s", tokens_per_s, prog_bar=True)
        if self.peak:
            pl_module.log("perf/mfu", tokens_per_s * self.flops_per_token / (self.peak * trainer.world_size))


class MemoryPhases(Callback):
    """Marks the KD steps ``train`` and every validation pass ``validate`` in the memory trace
    (``SLIMMOE_MEMORY_TRACE``, memory_trace.py); does nothing when it is off."""

    def __init__(self) -> None:
        self._outer = None  # the phase a validation pass interrupted (train, or none before the first step)

    def on_train_start(self, trainer, pl_module) -> None:
        memory_trace.enter("train")

    def on_train_end(self, trainer, pl_module) -> None:
        memory_trace.enter(None)

    def on_validation_start(self, trainer, pl_module) -> None:
        self._outer = memory_trace.enter("validate")

    def on_validation_end(self, trainer, pl_module) -> None:
        memory_trace.enter(self._outer)


class StageProgressBar(TQDMProgressBar):
    """Lightning's bar, for a stage that is one ``Trainer.fit`` of ``max_steps`` over an endless stream: it reads
    ``[slim50] 12/40`` (stage, step, steps) instead of ``Epoch 0/-2``, with the losses and throughput."""

    def __init__(self, stage_name: str, steps: int):
        super().__init__()
        self.stage_name, self.steps = stage_name, steps

    @property
    def train_description(self) -> str:
        return f"[{self.stage_name}]"

    @property
    def sanity_check_description(self) -> str:  # ValidateAfterSlicing: no sanity check, the stage's first point
        return f"[{self.stage_name}] validation before the first step"

    def init_train_tqdm(self) -> Tqdm:
        """Lightning's bar, made with the stage's total and (a resumed stage) its step: a bar made without them
        prints ``0/?`` first, and a stage resumed mid-"epoch" gets no ``on_train_epoch_start`` to set them, so it
        counted ``58/?`` to the end."""
        return Tqdm(desc=self.train_description, position=2 * self.process_position, disable=self.is_disabled,
                    leave=True, dynamic_ncols=True, file=sys.stdout, smoothing=0, bar_format=self.BAR_FORMAT,
                    total=self.steps, initial=self.trainer.global_step)

    def on_train_epoch_start(self, trainer, *_) -> None:
        """Nothing: the bar was made for the whole stage (one "epoch" of an endless stream); Lightning's would reset
        it to the epoch's unknown length."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._should_update(trainer.global_step, self.steps):
            self.train_progress_bar.n = trainer.global_step
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
            self.train_progress_bar.refresh()

    def get_metrics(self, trainer, pl_module) -> dict:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics


class StageModelSummary(ModelSummary):
    """Lightning's plain-text module summary (the same style as the progress bars) without the FLOPs column and its
    "Total Flops" line: Lightning counts FLOPs only for a module with an ``example_input_array``, which a stage's
    has not, so they always read 0. Shown where they are counted."""

    @staticmethod
    def summarize(summary_data, total_parameters, trainable_parameters, model_size, total_training_modes,
                  total_flops, **summarize_kwargs) -> None:
        columns = summary_data if total_flops else [c for c in summary_data if c[0] != "FLOPs"]
        table = _format_summary_table(total_parameters, trainable_parameters, model_size, total_training_modes,
                                      total_flops, *columns)
        if not total_flops:
            table = table.rsplit("\n", 1)[0]  # "0  Total Flops", the table's last line
        logging.getLogger("lightning.pytorch.callbacks.model_summary").info("\n" + table)
