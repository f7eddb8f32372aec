"""ExpertSlimming: score the incoming student and slice it at the stage boundary.

Runs in ``setup`` — after the datamodule is set up, before ``configure_model``, before the strategy
moves/wraps the model and before optimizers exist — so that no parameter changes shape inside a running
fit and the optimizer only ever sees the slim parameters. The kept indices are written to ``keep.pt``
(atomically, last): a resumed stage re-applies them instead of re-scoring, so nothing is pruned twice
and the stage's shape never depends on callback state.

Under FSDP2 (``ModelParallelStrategy``) the student arrives on the meta device with its checkpoint
recorded (lightning_slimmoe/loading.py): ``setup`` calls ``configure_model`` early to shard and load it
and the teacher, scores the sharded student, and replaces it by a meta model of the sliced shape that
``configure_model`` then loads from the same checkpoint with the keep indices applied at read time. No
rank ever holds the whole student, sliced or not (docs/design.md §4).
"""

from __future__ import annotations

import gc
import time

from lightning.pytorch import Callback
from lightning.pytorch.utilities import rank_zero_info
from tqdm.auto import tqdm

from lightning_slimmoe import memory_trace
from lightning_slimmoe.config import StageConfig
from lightning_slimmoe.distributed import all_reduce_scores_
from lightning_slimmoe.importance import ImportanceScores, compute_scores, expert_saliency
from lightning_slimmoe.loading import PendingLoad, meta_model, pending_load
from lightning_slimmoe.run_dir import StageDir
from lightning_slimmoe.slimming import (KeepIndices, remove_experts_, resolve_target, select_keep, slim_model_,
                                        widths_of)

def describe_widths(widths: dict) -> str:
    """``expert width 128, 8 experts, heads 8/4`` (+ the shared expert's width where there is one)."""
    shared = f", shared {widths['shared_expert_width']}" if widths.get("shared_expert_width") else ""
    return (f"expert width {widths['expert_width']}{shared}, {widths['num_experts']} experts, "
            f"heads {widths['num_attention_heads']}/{widths['num_key_value_heads']}")


class ExpertSlimming(Callback):
    def __init__(self, stage: StageConfig, stage_dir: StageDir, reference_config, seed: int = 0, step_offset: int = 0,
                 log_scores: bool = True):
        self.stage = stage
        self.stage_dir = stage_dir
        self.reference_config = reference_config  # the original teacher's: fractions are of its widths
        self.seed = seed
        self.step_offset = step_offset
        # The scores' histograms, at the stage's first step; False when the stage resumes from a checkpoint (they
        # were logged before it). A stage restarted from its first step logs them again, from scores.pt if the slice
        # is re-applied: the resumed run rewrites the axis from there (tb.ContinuousTensorBoardLogger.resume_at).
        self.log_scores = log_scores

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit" or not self.stage.prunes:
            return
        # Under ModelParallelStrategy the pipeline hands over the student on the meta device, its weights still
        # on disk (loading.py): it is scored sharded and the slice is applied while loading, never in memory.
        pending = pending_load(pl_module.student)
        # One decision for all ranks (rank 0 may already have written keep.pt when another rank looks).
        if trainer.strategy.broadcast(self.stage_dir.has_keep()):
            self._reapply(pl_module, pending)
            if self.log_scores and trainer.global_rank == 0 and self.stage_dir.scores_file.is_file():
                self._log_histograms(trainer, ImportanceScores.load(str(self.stage_dir.scores_file)))
            return
        with memory_trace.phase("score"):  # the loads inside (configure_model) mark themselves "load"
            self._score_and_slice(trainer, pl_module, pending)

    def _score_and_slice(self, trainer, pl_module, pending: PendingLoad | None) -> None:
        """Score the incoming student, select the kept indices and slice (FSDP2: load the sliced one). The unsliced
        student is referenced from here only (``student``), so that it is freed before its sliced successor loads."""
        student = pl_module.student
        started = time.time()
        target = resolve_target(student.config, expert_width=self.stage.expert_width,
                                attention_groups=self.stage.attention_groups,
                                shared_expert_width=self.stage.shared_expert_width, round_to=self.stage.round_to,
                                reference_config=self.reference_config)
        if pending is None:
            pl_module.to(trainer.strategy.root_device)
        else:
            # Shard and load the unsliced student (and the teacher) now; Lightning's own configure_model call
            # after setup then finds them done and loads the sliced student built below.
            pl_module.configure_model()
        calibration = trainer.datamodule.calibration_batches(self.stage.calibration_tokens,
                                                             self.stage.calibration_batch_size)
        progress = lambda it: tqdm(it, desc=f"[{self.stage.name}] calibration ({self.stage.criterion})",
                                   disable=trainer.global_rank != 0, leave=False)
        kept_experts = None
        # the scoring backward recomputes each layer as training does (memory.py plans the score phase so)
        checkpoint_layers = pl_module.parallel.activation_checkpointing
        if self.stage.remove_experts_to is not None:
            saliency = expert_saliency(student, calibration, progress=progress)
            kept_experts = {layer: s.topk(self.stage.remove_experts_to).indices.sort().values
                            for layer, s in saliency.items()}
            if pending is None:
                remove_experts_(student, kept_experts)
            else:
                student = None  # the unsliced shards are freed before the expert-removed ones are loaded
                student = self._load_student(pl_module, pending, kept_experts=kept_experts, configure=True)
        if self.stage.scores_file:
            scores = ImportanceScores.load(self.stage.scores_file, student)
        elif pending is not None:
            # Sharded student: every rank runs every calibration batch (the same batch on all ranks, so the
            # gradient FSDP2 averages over ranks is that batch's gradient, and |θ ⊙ g| stays per batch), and
            # each rank scores the rows it holds; structure_scores all-reduces the tables (docs/design.md §5).
            scores = compute_scores(student, calibration, self.stage.criterion, teacher=pl_module.teacher,
                                    kd=self.stage.kd, seed=self.seed, progress=progress,
                                    fisher_draws=self.stage.fisher_draws, checkpoint_layers=checkpoint_layers)
        elif self.stage.criterion in ("kd_taylor", "kd_fisher") and trainer.world_size > 1:
            # Each rank scores its share of the calibration batches; the fp64 sums are all-reduced so every
            # rank keeps exactly the neurons a single process would.
            world, rank = trainer.world_size, trainer.global_rank
            slots = -(-len(calibration) // world)  # every rank runs as many batches (the teacher may be sharded)
            mine = [calibration[i] if i < len(calibration) else calibration[0]
                    for i in range(rank, slots * world, world)]
            counted = [i < len(calibration) for i in range(rank, slots * world, world)]
            # kd_fisher's draws are seeded per sequence from its tokens: the same as a single process's.
            scores = compute_scores(student, mine, self.stage.criterion, teacher=pl_module.teacher, kd=self.stage.kd,
                                    seed=self.seed, progress=progress, counted=counted,
                                    fisher_draws=self.stage.fisher_draws, checkpoint_layers=checkpoint_layers)
            all_reduce_scores_([scores.experts, scores.shared, scores.groups])
            scores.num_tokens = sum(int(b["input_ids"].numel()) for b in calibration)
        else:  # activation means, magnitude and random are computed whole on every rank
            scores = compute_scores(student, calibration, self.stage.criterion, teacher=pl_module.teacher,
                                    kd=self.stage.kd, seed=self.seed, progress=progress)
        keep = select_keep(scores, target)
        if trainer.global_rank == 0:
            self.stage_dir.save_scores(scores)
            if self.log_scores:
                self._log_histograms(trainer, scores)
        before = widths_of(student.config)
        if pending is None:
            slim_model_(student, keep)
        else:  # the sliced student, read from the same checkpoint with `keep` applied; loaded by configure_model
            student = None
            student = self._load_student(pl_module, pending, keep=keep, kept_experts=kept_experts or {})
        if trainer.global_rank == 0:
            self.stage_dir.save_keep(keep, kept_experts)
            self.stage_dir.record_slimmed(
                criterion=self.stage.criterion, widths_before=before, widths=widths_of(student.config),
                kept_index_hash=keep.digest(), calibration_tokens=scores.num_tokens,
                scoring_s=round(time.time() - started, 3))
        memory_trace.release_freed_memory()  # scoring's freed blocks, before the optimizer state is allocated
        rank_zero_info(f"[{self.stage.name}] slimmed {describe_widths(before)} -> {describe_widths(widths_of(student.config))} "
                       f"in {time.time() - started:.1f}s (criterion {self.stage.criterion})")

    def _reapply(self, pl_module, pending: PendingLoad | None) -> None:
        keep, kept_experts = self.stage_dir.load_keep()
        if pending is not None:  # straight from the incoming checkpoint with the saved slice, never whole
            student = self._load_student(pl_module, pending, keep=keep, kept_experts=kept_experts)
        else:
            student = pl_module.student
            if kept_experts:
                remove_experts_(student, kept_experts)
            slim_model_(student, keep)
        rank_zero_info(f"[{self.stage.name}] resumed: re-applied the saved slice "
                       f"{describe_widths(widths_of(student.config))} (no re-scoring)")

    @staticmethod
    def _load_student(pl_module, pending: PendingLoad, keep: KeepIndices | None = None,
                      kept_experts: dict | None = None, configure: bool = False):
        """Replace the student by the incoming checkpoint with ``kept_experts`` / ``keep`` applied at read time,
        built on the meta device (the old student is dropped); ``configure``: shard and load it now."""
        dtype = next(pl_module.student.parameters()).dtype
        pl_module.student = None  # drop the unsliced shards before the sliced ones are allocated
        gc.collect()  # FSDP state and hooks form reference cycles: free them now, not at some later collection
        pl_module.student = meta_model(pending.source, dtype, keep=keep, kept_experts=kept_experts)
        if configure:
            pl_module.configure_model()
        return pl_module.student

    def _log_histograms(self, trainer, scores: ImportanceScores) -> None:
        experiment = getattr(trainer.logger, "experiment", None)
        if experiment is None or not hasattr(experiment, "add_histogram"):
            return
        for kind, values in scores.summary().items():
            experiment.add_histogram(f"scores/{self.stage.name}/{kind}", values, global_step=self.step_offset)
