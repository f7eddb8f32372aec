"""StageModule: one SlimMoE stage = a frozen teacher + a trainable student, trained with top-k KD.

The teacher is the *original* model in every stage (SlimMoE §3): frozen, ``eval()``, no gradients, no
optimizer state and never written into a checkpoint. Without a teacher the stage is plain LM training
(the demo uses that to make its teacher).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict

import lightning.pytorch as pl
import torch
from torch import nn
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torchmetrics import MeanMetric, Metric

from lightning_slimmoe import memory_trace
from lightning_slimmoe.config import OptimizerConfig, ParallelConfig
from lightning_slimmoe.distill import DistillOutput, KDConfig, distill_loss, frozen_forward, teacher_topk
from lightning_slimmoe.distributed import (clip_grad_norm_fsdp1_, fsdp1_unit_kwargs, fsdp_mesh,
                                           reshard_head, shard_model, shard_model_fsdp1)
from lightning_slimmoe.loading import fingerprint, materialize_, pending_fingerprint, pending_load
from lightning_slimmoe.models import keeping_fixed_dtypes

TEACHER_PREFIX = "teacher."
STUDENT_PREFIX = "student."
EXPERTS_IMPLEMENTATIONS = ("grouped_mm", "batched_mm", "eager")
_LOGGED_KERNELS: set = set()  # (role, device type, kernel) already logged: the choice is logged once per process


def choose_experts_implementation(device: torch.device | str, requested: str | None = None) -> str:
    """transformers' fused-experts kernel for a model on ``device``: ``requested`` if given, else the one measured
    fastest there that keeps results reproducible (bench/speed.py ``experts_kernels``; docs/results.md "Speed").
    CPU: ``grouped_mm``, transformers' default: ``eager`` measured 1.07-1.73x faster at the ``cpu`` preset's shapes,
    but its logits differ from ``grouped_mm``'s by ~1e-7 at other shapes, so with it a stock reload (``grouped_mm``)
    and exact resume no longer match bit for bit; name ``eager`` in the YAML to take the speed. ``batched_mm`` is ~30x
    slower. CUDA: ``grouped_mm`` on compute capability >= 8.0, where torch's grouped GEMM kernel runs, else ``eager``
    (transformers' own fallback; ``grouped_mm`` would take its slow per-group loop there)."""
    if requested is not None:
        if requested not in EXPERTS_IMPLEMENTATIONS:
            raise ValueError(f"experts_implementation={requested!r}: must be one of {list(EXPERTS_IMPLEMENTATIONS)} "
                             "or null (automatic)")
        return requested
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return "grouped_mm" if torch.cuda.get_device_capability(device) >= (8, 0) else "eager"
    return "grouped_mm"


def set_experts_implementation_(model: nn.Module | None, device: torch.device | str, requested: str | None = None,
                                role: str = "model") -> str | None:
    """Apply :func:`choose_experts_implementation` to ``model`` (a transformers MoE); returns the kernel, None for a
    model without fused experts. Logged once per (role, device, kernel) and process."""
    if model is None or not hasattr(model, "set_experts_implementation"):
        return None
    can_set = getattr(model, "_can_set_experts_implementation", None)
    if can_set is not None and not can_set():
        return None
    kernel = choose_experts_implementation(device, requested)
    if getattr(model.config, "_experts_implementation", None) != kernel:
        model.set_experts_implementation(kernel)
    kernel = model.config._experts_implementation
    key = (role, torch.device(device).type, kernel)
    if key not in _LOGGED_KERNELS:
        _LOGGED_KERNELS.add(key)
        how = "experts_implementation" if requested is not None else "automatic"
        rank_zero_info(f"{role} experts kernel on {torch.device(device).type}: {kernel} ({how})")
    return kernel


def teacher_targets(teacher: nn.Module, ids_BT: torch.Tensor, kd: KDConfig,
                    top_k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen teacher's top-k (values, ids), (N, k) each with N = B*T: what the KD loss distils towards, what the
    teacher cache stores and what the KD criteria score against (one function for all, so the cached and scored
    numbers are the live ones)."""
    with frozen_forward(teacher):  # inference_mode, or no_grad for a sharded / 8-bit teacher
        t_hidden_NH = teacher.model(input_ids=ids_BT, use_cache=False).last_hidden_state.flatten(0, 1)
        t_vals_NK, t_ids_NK = teacher_topk(t_hidden_NH, teacher.get_output_embeddings(), top_k or kd.top_k,
                                           kd.chunk_tokens, log_probs_at=kd.temperature if kd.tail_bucket else None)
        del t_hidden_NH
        reshard_head(teacher)  # a sharded teacher's gathered lm_head is freed at once (no backward frees it)
    if t_vals_NK.is_inference():  # ordinary tensors again: the checkpointed loss saves them for backward
        t_vals_NK = t_vals_NK.clone()  # (N, k)
        if t_ids_NK.dim() == 2 and t_ids_NK.stride(0) == 0:  # top_k = V: the expanded arange(V), not copied
            t_ids_NK = torch.arange(t_ids_NK.shape[1], device=t_ids_NK.device).expand(t_ids_NK.shape)
        else:
            t_ids_NK = t_ids_NK.clone()  # (N, k)
    return t_vals_NK, t_ids_NK


def model_fingerprint(model: nn.Module) -> str:
    """Cheap identity of a model: its config and a sample of every tensor (not a full-weight hash).

    A meta-built model still waiting for its sharded load (loading.py) gets the same value, read from its
    checkpoint: sharded and single-process runs record the same teacher fingerprint."""
    if pending_load(model) is not None:
        return pending_fingerprint(model)
    with torch.no_grad():
        return fingerprint(model.config, ((name, p.shape, p.detach().flatten()[:16])
                                          for name, p in model.state_dict().items()))


class StageModule(pl.LightningModule):
    def __init__(self, student: nn.Module, teacher: nn.Module | None = None, kd: KDConfig | None = None,
                 optimizer: OptimizerConfig | None = None, parallel: ParallelConfig | None = None,
                 max_nonfinite_skips: int = 0, experts_implementation: str | None = None, lr_window=None):
        """``lr_window`` (a ``planning.LRWindow``: offset, total, warmup_ratio, min_lr_ratio): this stage's steps
        are steps ``offset ..`` of one warm-up + cosine curve of ``total`` steps (``lr_schedule: run``); None = the
        curve spans this stage's own ``max_steps`` with its optimizer's ratios."""
        super().__init__()
        self.lr_window = lr_window
        choose_experts_implementation("cpu", experts_implementation)  # a bad name fails here, not at fit time
        self.experts_implementation = experts_implementation  # None = automatic per device (apply_experts_kernel)
        self.max_nonfinite_skips = max_nonfinite_skips
        self.nonfinite_skips = 0  # steps skipped so far in this stage (kept in the checkpoint)
        self._drop_gradients = False  # set by a skipped step on several ranks, read before optimizer.step
        self.student = student
        self.teacher = teacher
        self.kd = kd or KDConfig()
        self.optim_cfg = optimizer or OptimizerConfig()
        self.parallel = parallel or ParallelConfig()
        # Checkpoints never hold the teacher, so its keys are absent when a sharded checkpoint is loaded
        # into the whole module; the student is still loaded strictly by `load_state_dict` below.
        self.strict_loading = False
        if teacher is not None:
            teacher.requires_grad_(False)
            teacher.eval()
            self.teacher_fingerprint = getattr(teacher, "slimmoe_fingerprint", None) or model_fingerprint(teacher)
        else:
            self.teacher_fingerprint = None
        self.save_hyperparameters({"kd": asdict(self.kd), "optimizer": asdict(self.optim_cfg),
                                   "model_type": student.config.model_type, "has_teacher": teacher is not None})
        self.val_lm_loss = MeanMetric()
        self.val_kd_loss = MeanMetric()
        self.val_agreement = MeanMetric()
        # A TeacherCacheReader (lightning_slimmoe/teacher_cache.py), attached for a fit by
        # callbacks/teacher_cache.py: training batches then read the teacher's top-k from disk.
        self.teacher_cache = None

    # --- the teacher stays frozen whatever Lightning toggles ----------------------------------------
    def train(self, mode: bool = True):
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def apply_experts_kernel(self, device: torch.device | str | None = None) -> dict:
        """Set the fused-experts kernel of student and teacher for ``device`` (default: the strategy's root device)
        from ``experts_implementation`` (:func:`choose_experts_implementation`); returns ``{role: kernel}``. Called
        by :meth:`configure_model` and, before scoring (which runs in a callback's ``setup``), by the pipeline."""
        if device is None:
            device = self.trainer.strategy.root_device if self._trainer is not None else self.device
        return {role: set_experts_implementation_(model, device, self.experts_implementation, role=role)
                for role, model in (("student", self.student), ("teacher", self.teacher)) if model is not None}

    # --- FSDP: student and teacher sharded per decoder layer (distributed.py) -------------------------
    def configure_model(self) -> None:
        """FSDP2 (ModelParallelStrategy): shard student and teacher, then load the ones built on the meta device
        (loading.py), each rank reading only its shards: no rank ever holds a whole model (docs/design.md §4).
        FSDP1 (FSDPStrategy): wrap the same units of the (whole, loaded) models; Lightning then leaves the
        module as it is instead of making it one root unit that would mix frozen and trainable weights.
        Idempotent, as Lightning requires: ExpertSlimming calls it early to score the sharded student,
        Lightning calls it again, and the teacher is the same object in every stage."""
        reads = any(m is not None and pending_load(m) is not None for m in (self.student, self.teacher))
        with memory_trace.phase("load") if reads else contextlib.nullcontext():  # FSDP2 reads weights here
            self._configure_model()

    def _configure_model(self) -> None:
        strategy = self.trainer.strategy if self._trainer is not None else None
        device = strategy.root_device if strategy is not None else self.device
        self.apply_experts_kernel(device)  # a student rebuilt for its sliced shape gets it too
        if isinstance(strategy, FSDPStrategy):
            unit_kwargs = fsdp1_unit_kwargs(strategy, self.parallel)
            for model, trainable in ((self.student, True), (self.teacher, False)):
                if model is not None:
                    materialize_(model, device)
                    shard_model_fsdp1(model, unit_kwargs, self.parallel, trainable=trainable)
            return
        if self.device_mesh is None:  # single device / DDP: nothing to shard
            for model in (self.student, self.teacher):
                if model is not None:
                    materialize_(model, device)
            return
        mesh = fsdp_mesh(device)
        shard_model(self.student, mesh, self.parallel, trainable=True)
        materialize_(self.student, device)
        if self.teacher is not None:
            shard_model(self.teacher, mesh, self.parallel, trainable=False)
            materialize_(self.teacher, device)

    # --- loss ---------------------------------------------------------------------------------------
    def forward_loss(self, batch: dict) -> DistillOutput:
        ids_BT, labels_BT = batch["input_ids"], batch["labels"]
        s_hidden_NH = self.student.model(input_ids=ids_BT, use_cache=False).last_hidden_state.flatten(0, 1)
        t_vals_NK = t_ids_NK = None
        if self.teacher_cache is not None and "block_index" in batch:
            # A training batch (samples carry their block index) with the cache attached: no teacher forward.
            t_vals_BTK, t_ids_BTK = self.teacher_cache.lookup(batch["block_index"], self.kd.top_k)
            if t_vals_BTK.shape[:2] != ids_BT.shape:
                raise ValueError(f"teacher cache holds (blocks, tokens) {tuple(t_vals_BTK.shape[:2])} for a batch of "
                                 f"{tuple(ids_BT.shape)}")
            t_vals_NK = t_vals_BTK.flatten(0, 1).to(ids_BT.device, non_blocking=True)  # (N, k)
            t_ids_NK = t_ids_BTK.flatten(0, 1).to(ids_BT.device, non_blocking=True)  # (N, k)
        elif self.teacher is not None:
            t_vals_NK, t_ids_NK = self.teacher_targets(ids_BT)
        return distill_loss(s_hidden_NH, self.student.get_output_embeddings(), labels_BT.flatten(),
                            t_vals_NK, t_ids_NK, self.kd)

    def teacher_targets(self, ids_BT: torch.Tensor, top_k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The frozen teacher's top-k (values, ids) for this stage's KD loss (:func:`teacher_targets`)."""
        return teacher_targets(self.teacher, ids_BT, self.kd, top_k)

    def training_step(self, batch, batch_idx):
        out = self.forward_loss(batch)
        losses_3 = torch.stack([out.loss.detach(), out.kd_loss, out.lm_loss]).float()  # (3,)
        # Several ranks: ONE collective per step serves both the non-finite check (every rank's losses) and the
        # logged global mean (instead of an all_gather plus three sync_dist all-reduces). One process: none.
        losses_W3 = self.all_gather(losses_3).reshape(-1, 3) if self.trainer.world_size > 1 else losses_3[None]
        if self._skip_or_stop_if_non_finite(losses_W3):
            # No update: the optimizer changes neither weights nor state; the step still counts, so the data
            # stream and a resume stay aligned. One process: returning None skips backward and leaves every
            # gradient unset. Several ranks: Lightning refuses None, and an FSDP backward is collective, so
            # every rank backpropagates a zero loss and the gradients are dropped in on_before_optimizer_step.
            if self.trainer.world_size == 1:
                return None
            self._drop_gradients = True
            return out.loss.nan_to_num(0.0, 0.0, 0.0) * 0.0
        mean_3 = losses_W3.mean(0) if losses_W3.shape[0] > 1 else losses_3  # the global mean, not rank 0's share
        # train/loss is what is optimised: LM loss in a pretrain stage, the KD mix in a KD stage. Its two parts keep
        # their own tags so that each reads as one curve across stages (the KD term only where there is a teacher).
        self.log("train/loss", mean_3[0], prog_bar=True)
        if self.teacher is not None:
            self.log("train/kd_loss", mean_3[1])
        self.log("train/lm_loss", mean_3[2])
        return out.loss

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        # Free the gradients now: Lightning zeroes them only inside the next step's closure, after its forward, so
        # a whole student's worth of gradients would sit through that forward (and the teacher's). Equivalent under
        # gradient accumulation: this runs at the window's end and the next window starts from zero either way.
        optimizer.zero_grad(set_to_none=True)

    def on_before_optimizer_step(self, optimizer) -> None:
        if self._drop_gradients:  # a skipped step on several ranks (training_step): no gradient, no update
            optimizer.zero_grad(set_to_none=True)
            self._drop_gradients = False

    def _skip_or_stop_if_non_finite(self, losses_W3: torch.Tensor) -> bool:
        """Stop every rank before backward and ``optimizer.step`` when any rank's loss is NaN/Inf, so weights
        and optimizer state stay finite (torchtitan's rule) — or, within ``max_nonfinite_skips``, tell every
        rank to skip the step (returns True). ``losses_W3``: (loss, kd_loss, lm_loss) of every rank, gathered
        (training_step): the ranks decide on the same numbers, since a rank that raised or skipped alone would
        leave the others waiting in the gradient reduce-scatter forever. One host sync when all are finite."""
        if bool(torch.isfinite(losses_W3[:, 0]).all()):
            return False
        losses_W3 = losses_W3.cpu()
        bad = [rank for rank in range(losses_W3.shape[0]) if not bool(torch.isfinite(losses_W3[rank, 0]))]
        where = "; ".join(f"rank {rank}: loss={losses_W3[rank, 0].item()} (kd_loss={losses_W3[rank, 1].item()}, "
                          f"lm_loss={losses_W3[rank, 2].item()})" for rank in bad)
        if self.nonfinite_skips < self.max_nonfinite_skips:
            self.nonfinite_skips += 1
            rank_zero_warn(f"skipped global step {self.global_step} (no update): non-finite training loss on "
                           f"{where} [{self.nonfinite_skips}/{self.max_nonfinite_skips} skips allowed]")
            self.log("train/nonfinite_skips", float(self.nonfinite_skips))
            return True
        limit = (f"; {self.nonfinite_skips} of max_nonfinite_skips={self.max_nonfinite_skips} skips already used"
                 if self.max_nonfinite_skips else "")
        raise FloatingPointError(f"non-finite training loss at global step {self.global_step} on {where}; "
                                 f"stopped before optimizer.step on every rank (this is rank {self.global_rank})"
                                 + limit)

    def validation_step(self, batch, batch_idx):
        out = self.forward_loss(batch)
        reshard_head(self.student)  # FSDP2: no backward frees the gathered head here (0.58 GiB for Qwen3's vocab)
        self.val_lm_loss.update(out.lm_loss, weight=out.num_tokens)
        if self.teacher is not None:
            self.val_kd_loss.update(out.kd_loss, weight=out.num_tokens)
            self.val_agreement.update(out.agreement, weight=out.num_tokens)

    def on_validation_epoch_end(self):
        # val/loss is the held-out LM cross-entropy in every stage (what val/ppl exponentiates and summary.json's
        # val_loss records), so that one curve compares the teacher's pretraining with every student; the KD loss
        # has its own tag. val/lm_loss is the same number under its earlier name (bench/quality.py reads it).
        lm = self.val_lm_loss.compute()
        self.log("val/loss", lm, prog_bar=True)
        self.log("val/lm_loss", lm)
        self.log("val/ppl", torch.exp(lm))
        if self.teacher is not None:
            self.log("val/kd_loss", self.val_kd_loss.compute())
            self.log("val/teacher_agreement", self.val_agreement.compute())
        for metric in (self.val_lm_loss, self.val_kd_loss, self.val_agreement):
            metric.reset()

    # --- optimizer: AdamW (fused where available) or bitsandbytes AdamW8bit, warm-up + cosine -------
    def configure_optimizers(self):
        cfg = self.optim_cfg
        params = [p for p in self.student.parameters() if p.requires_grad]
        if cfg.name == "adamw8bit":
            try:
                import bitsandbytes as bnb
            except ImportError as err:
                raise ImportError("optimizer.name='adamw8bit' needs bitsandbytes: pip install bitsandbytes") from err
            optimizer = bnb.optim.AdamW8bit(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
        else:
            # fused: one kernel per step, also on CPU, where it is faster than the foreach default (docs/results.md)
            fused = all(p.device.type in ("cuda", "cpu") for p in params)
            optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                                          weight_decay=cfg.weight_decay, fused=fused or None)
        window = self.lr_window
        if window is None:
            offset, total = 0, max(1, int(self.trainer.max_steps))
            warmup_ratio, min_lr_ratio = cfg.warmup_ratio, cfg.min_lr_ratio
        else:  # one curve over the run: the step counter of this stage continues the earlier stages'
            offset, total = int(window.offset), max(1, int(window.total))
            warmup_ratio, min_lr_ratio = window.warmup_ratio, window.min_lr_ratio
        warmup = int(warmup_ratio * total)

        def lr_lambda(step: int) -> float:
            # LambdaLR's step is this stage's (restored from its checkpoint on resume): the curve is a pure
            # function of it, the window and the ratios, so a resumed stage continues the same curve.
            step += offset
            if step < warmup:
                return (step + 1) / warmup
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
        # "name": LearningRateMonitor logs it as the `lr` tag of the run contract.
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "name": "lr"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        clip = self.optim_cfg.grad_clip if gradient_clip_val is None else gradient_clip_val
        if clip and isinstance(self.trainer.strategy, FSDPStrategy):
            if gradient_clip_algorithm not in (None, "norm"):
                raise ValueError(f"gradient_clip_algorithm={gradient_clip_algorithm!r}: only 'norm' under FSDPStrategy")
            clip_grad_norm_fsdp1_(self.student, clip)
        elif clip:
            self.clip_gradients(optimizer, gradient_clip_val=clip, gradient_clip_algorithm=gradient_clip_algorithm or "norm")

    def _apply(self, fn, recurse=True):
        # Lightning's `*-true` precisions convert the whole module with `.to(dtype)`, buffers included. transformers
        # keeps some tensors in fp32 whatever the weights' dtype (rotary `inv_freq`, computed, never saved; the
        # fp32-kept router biases), and so does every reload of an export with `from_pretrained(dtype=...)`. Rounded
        # to bf16, the student's RoPE would differ from its reloaded export's (logits off by ~1e-2) and from what a
        # serving engine computes, and the teacher from the hub's: those tensors keep their dtype here.
        super()._apply(keeping_fixed_dtypes(self, fn), recurse)
        # torchmetrics' states follow a `.to(dtype)` too: the validation means would accumulate in bf16 (a val loss
        # of 5.79 read back as 5.78125, every stage's perplexity rounded to the same 324.0). They stay fp32.
        for metric in self.modules():
            if isinstance(metric, Metric):
                metric.set_dtype(torch.float32)
        return self

    # --- checkpoints hold the student only ----------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # What was logged so far reaches the disk before the checkpoint does: a resume continues the TensorBoard
        # curves from the checkpoint's step and writes nothing below it (tb.ContinuousTensorBoardLogger.resume_at).
        for logger in self.loggers:
            logger.save()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith(TEACHER_PREFIX)}
        checkpoint["teacher_fingerprint"] = self.teacher_fingerprint
        checkpoint["nonfinite_skips"] = self.nonfinite_skips

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.nonfinite_skips = int(checkpoint.get("nonfinite_skips", 0))
        saved = checkpoint.get("teacher_fingerprint")
        if saved != self.teacher_fingerprint:
            raise ValueError(
                "the checkpoint was trained against a different teacher (fingerprint "
                f"{str(saved)[:12]} != current {str(self.teacher_fingerprint)[:12]}); resume with the same teacher")

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Load the student strictly; a checkpoint never carries the teacher."""
        student = {k[len(STUDENT_PREFIX):]: v for k, v in state_dict.items() if k.startswith(STUDENT_PREFIX)}
        unexpected = [k for k in state_dict if not k.startswith((STUDENT_PREFIX, TEACHER_PREFIX))]
        if strict and unexpected:
            raise RuntimeError(f"unexpected keys in checkpoint: {unexpected[:5]}")
        return self.student.load_state_dict(student, strict=strict, assign=assign)
