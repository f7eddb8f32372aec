"""Parameter/width logging and throughput (tokens/s, MFU on GPUs)."""

from __future__ import annotations

import time

import torch
from lightning.pytorch import Callback

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
        student = pl_module.student
        counts = count_params(student)
        family = get_family(student)
        metrics = {"params/total": float(counts.total), "params/active": float(counts.active),
                   "slim/expert_width": float(family.expert_width(student.config)),
                   "slim/num_attention_heads": float(student.config.num_attention_heads),
                   "slim/num_key_value_heads": float(student.config.num_key_value_heads)}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)


class ThroughputMonitor(Callback):
    """Tokens/s of each optimizer step and, on a known GPU, MFU with FLOPs counted as SlimMoE training
    spends them: student forward+backward (6 × active params) + teacher forward (2 × active params)."""

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
        pl_module.log("perf/tokens_per_s", tokens_per_s)
        if self.peak:
            pl_module.log("perf/mfu", tokens_per_s * self.flops_per_token / (self.peak * trainer.world_size))
