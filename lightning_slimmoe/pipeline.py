"""The SlimMoE stage pipeline — read this file to know what a run does.

    plan everything (config, targets of every stage, memory per rank, teacher, tokenizer, data, schedule)
                                                                                           — before any weight
    for each stage k:
        student = previous stage's export (stage 1: the teacher, or a pretrain stage's random init)
        Trainer.fit(StageModule(student, frozen original teacher), callbacks=[ExpertSlimming, ...])
            ExpertSlimming.setup: score on calibration tokens -> keep indices -> physical slice
        validate, export stage_<k>_<name>/hf (reload-checked), meta.json
    final/ (+ tokenizer, model card), summary.json

SlimMoE §3: every stage distils from the *original* teacher, not from the previous student; each stage
prunes one-shot to an intermediate size and recovers with its own token budget. Finished stages are
skipped on ``--resume``; an interrupted stage continues from its last checkpoint with its saved slice.
Where each file of the run lives and who writes it: run_dir.py. What is decided before any compute:
planning.py.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Callable

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from transformers import AutoModelForCausalLM, AutoTokenizer

from callbacks import (ExpertSlimming, MemoryPhases, ParamAndWidthLogger, StageProgressBar, StudentConfigWriter,
                       TokenThroughput, ValidateAfterSlicing)
from callbacks.preemption import CheckpointOnSignal
from callbacks.teacher_cache import TeacherCacheCallback
from lightning_slimmoe import corpora, memory_trace
from lightning_slimmoe.config import ConfigError, RunConfig
from lightning_slimmoe.data import TextDataModule
from lightning_slimmoe.distributed import gather_fsdp1_model, is_fsdp1_sharded, is_sharded
from lightning_slimmoe.export import TRAINING_FILE, export_hf, export_sharded_hf, model_card, training_file_text
from lightning_slimmoe.memory import check_run_memory, gib_text
from lightning_slimmoe.module import StageModule, model_fingerprint
from lightning_slimmoe.params import count_params
from lightning_slimmoe.planning import RunPlan, StagePlan, lr_window, plan_run, plan_shapes
from lightning_slimmoe.run_dir import RunDir, StageDir
from lightning_slimmoe.slimming import widths_of
from lightning_slimmoe.sources import (check_tokenizers_match, check_weight_files, load_config, load_model,
                                       tokenizer_signature)
from lightning_slimmoe.strategies import checkpoint_global_step, is_complete_checkpoint, latest_complete_checkpoint
from lightning_slimmoe.tb import ContinuousTensorBoardLogger
from lightning_slimmoe.teacher_cache import TeacherCache, TeacherCacheError, cache_key

__all__ = ["ConfigError", "Pipeline", "run_stage"]

# Stage keys that change no result and may differ on --resume (e.g. allow skipping a NaN step after one stopped the run).
RESUME_MAY_CHANGE = ("max_nonfinite_skips",)


@dataclass(frozen=True)
class RunContext:
    """What every stage of one run shares; built once by :meth:`Pipeline.run`."""

    config: RunConfig
    seed: int
    plan: RunPlan
    run_dir: RunDir
    datamodule: TextDataModule
    make_trainer: Callable[..., pl.Trainer]
    logger: ContinuousTensorBoardLogger
    tokenizer: object
    probe_ids: torch.Tensor  # a few validation tokens: each export must reload to the same logits on them
    teacher_cache: TeacherCache | None
    data_change: tuple[str, ...] = ()  # a resume allowed to train on other data: the differences, for meta.json
    resume_command: str | None = None  # the command that continues this run, printed when a signal stops a stage

    @property
    def teacher_source(self) -> str:
        """The original teacher of every stage: `teacher:`, or the export of the pretrain stage (always stage 0,
        see planning.py). Only read once that stage has run."""
        return self.config.teacher if self.config.teacher is not None else str(self.run_dir.stages[0].hf)


@dataclass(frozen=True)
class StageResult:
    summary: dict  # the stage's row of summary.json
    cache_build_s: float = 0.0  # time this stage spent building the teacher cache (a one-off, not its speed)


class Pipeline:
    def __init__(self, config: RunConfig, datamodule: TextDataModule, make_trainer: Callable[..., pl.Trainer],
                 seed: int = 0, resume_command: str | None = None, hparams: dict | None = None):
        """``hparams``: the run's whole configuration as the user gave it (the CLI's parsed config: trainer, data,
        stages, ...), logged once per run to TensorBoard; None = this RunConfig and the data module's arguments."""
        self.config = config
        self.dm = datamodule
        self.make_trainer = make_trainer
        self.seed = seed
        self.resume_command = resume_command
        self.hparams = hparams

    def run(self) -> dict:
        config, dm = self.config, self.dm
        # The CLI seeded already and said so; seeded again here (quietly) for a Pipeline run without the CLI
        pl.seed_everything(self.seed, workers=True, verbose=False)
        memory_trace.trace()  # SLIMMOE_MEMORY_TRACE: its baseline, before any model (memory_trace.py)
        shapes = plan_shapes(config, seq_len=dm.hparams.seq_len)  # configs, targets, scores files: no weights
        for field in ("teacher", "student_init"):
            check_weight_files(field, getattr(config, field))
        run_dir = RunDir(config.output_dir, [s.name for s in config.stages])
        if rank_zero_only.rank == 0:  # the other ranks run the same script; rank 0 owns run.json
            run_dir.check(run_record(config), config.resume)
        eval_trainer = self.make_trainer(default_root_dir=str(run_dir.path), logger=False, enable_checkpointing=False)
        # every phase of every stage against the devices' memory, before the data is read or any weight loaded
        memory = check_run_memory(config, shapes, eval_trainer, dm.hparams)
        if memory is not None:
            worst = max(memory.stages, key=lambda s: s.peak_gib)
            rank_zero_info(f"memory plan: peak {gib_text(worst.peak_gib)} GiB per rank ({worst.name}, {worst.peak_phase}) "
                           f"of {gib_text(memory.limit_gib)} GiB usable; {memory.inputs.setup.describe()}")
        tokenizer, new_tokenizer = prepare_data(config, dm, run_dir, shapes.teacher_config)  # still no writes
        plan = plan_run(config, shapes, dm, eval_trainer)
        cache = open_teacher_cache(config, dm, plan, tokenizer, eval_trainer.precision)
        record = run_record(config, plan.batch, data_identity(dm, tokenizer), numerics(plan, eval_trainer))
        try:
            data_change = []  # on --resume with resume_allow_data_change: how the data differs (recorded in meta.json)
            if rank_zero_only.rank == 0:  # the first write: everything above passed
                data_change = run_dir.start(record, config.resume, tokenizer=new_tokenizer,
                                            allow_data_change=config.resume_allow_data_change)
            ctx = RunContext(config=config, seed=self.seed, plan=plan, run_dir=run_dir, datamodule=dm,
                             make_trainer=self.make_trainer, logger=ContinuousTensorBoardLogger(str(run_dir.tb_dir)),
                             tokenizer=tokenizer, probe_ids=dm.val_blocks[:1, : min(32, plan.seq_len)].clone(),
                             teacher_cache=cache, data_change=tuple(data_change),
                             resume_command=self.resume_command)
            if not config.resume:  # once per run: a resume continues the run that logged them (run.json: the same run)
                hparams = self.hparams if self.hparams is not None else {
                    "seed_everything": self.seed, **dataclasses.asdict(config), "data": dict(dm.hparams)}
                ctx.logger.log_hyperparams(hparams)
            return self._run_stages(ctx, eval_trainer)
        except BaseException:
            # A new run that fails before any stage has written a file (a width that only resolves wrongly once the
            # weights are loaded, a teacher that fails to load, Ctrl-C while it loads) holds nothing worth keeping,
            # but its run.json would refuse the retry of the same command ("already holds a run"): rank 0, which
            # wrote it, removes what this run created (never what was there before, never on --resume). Accepting
            # such a dir in the new-run check instead would also cover a killed run, but it cannot tell a dead run
            # from one still loading its teacher in another process, which a second launch would then overwrite.
            if rank_zero_only.rank == 0 and not config.resume:
                run_dir.discard_unstarted()
            raise

    def _run_stages(self, ctx: RunContext, eval_trainer: pl.Trainer) -> dict:
        """Every stage not complete yet, then ``final/`` and ``summary.json``."""
        plan, run_dir, cache = ctx.plan, ctx.run_dir, ctx.teacher_cache
        teacher, teacher_summary, results = None, None, []
        for stage_plan, stage_dir in zip(plan.stages, run_dir.stages):
            if stage_dir.is_complete():
                rank_zero_info(f"[{stage_plan.stage.name}] complete, skipped (resume)")
                if rank_zero_only.rank == 0:  # a kill may have come between its completion and this
                    keep_one_checkpoint(stage_dir)
                results.append(StageResult(stage_dir.read_meta()["summary"]))
                continue
            memory_trace.set_stage(stage_plan.stage.name)
            if stage_plan.distils and teacher is None:
                with memory_trace.phase("load"):
                    teacher = load_teacher(ctx)
                if teacher_summary is None:
                    memory_trace.set_stage("teacher")
                    with memory_trace.phase("validate"):
                        teacher_summary = summarize_teacher(ctx, teacher, eval_trainer)
                    memory_trace.set_stage(stage_plan.stage.name)
            with memory_trace.phase("load"):
                student = incoming_student(ctx, stage_plan)
            results.append(run_stage(ctx, stage_plan, stage_dir, student, teacher if stage_plan.distils else None))
        if teacher_summary is None:
            teacher_summary = summarize_teacher(ctx, teacher or load_teacher(ctx), eval_trainer)
        memory_trace.set_stage(None)  # the last phase's line

        summary = {"teacher": teacher_summary, "stages": [r.summary for r in results],
                   "final_dir": str(run_dir.final_dir)}
        from lightning_slimmoe.export import dropped_parts  # e.g. {"mtp": "dropped"}: hub MTP layers not exported
        summary.update(dropped_parts(plan.teacher_config))
        if cache is not None:
            summary["teacher_cache"] = {**cache.info(), "build_s": round(sum(r.cache_build_s for r in results), 3)}
        if eval_trainer.global_rank == 0:
            run_dir.write_final(run_dir.stages[-1].hf, model_card(summary, ctx.config.stages, plan.seq_len))
            run_dir.write_summary(summary)
        ctx.logger.finalize("success")
        return summary


# ---------------------------------------------------------------------------------------------------
# One stage
# ---------------------------------------------------------------------------------------------------
def run_stage(ctx: RunContext, stage_plan: StagePlan, stage_dir: StageDir, student, teacher) -> StageResult:
    """Fit one stage (slimmed at its start by ExpertSlimming), validate it, export ``hf/``, record ``meta.json``."""
    stage, span = stage_plan.stage, stage_plan.span
    started = time.time()
    stage_dir.path.mkdir(parents=True, exist_ok=True)
    resume_from = (latest_complete_checkpoint(stage_dir.checkpoints)
                   if ctx.config.resume and stage_dir.checkpoints.is_dir() else None)
    ckpt_path = str(resume_from) if resume_from else None
    start_step = checkpoint_global_step(resume_from) if resume_from else 0  # this stage's, where the fit starts
    val_every = min(span.steps, stage.val_every_n_steps or max(1, span.steps // 4))
    ckpt_every = min(span.steps, stage.checkpoint_every_n_steps or val_every)
    ctx.logger.step_offset = span.step_offset
    if ctx.config.resume:  # the first stage this process runs: the TensorBoard curves continue from here
        ctx.logger.resume_at(span.step_offset + start_step)
    ctx.datamodule.stream_offset = span.first_sample
    # A KD stage's first val/ point: the sliced student before any update (skipped by Lightning on a resume from a
    # checkpoint). A pretrain stage's random init has nothing to show.
    first_validation = ValidateAfterSlicing() if stage_plan.distils else None
    callbacks = [
        ExpertSlimming(stage, stage_dir, reference_config=ctx.plan.teacher_config, seed=ctx.seed,
                       step_offset=span.step_offset, log_scores=resume_from is None),
        ParamAndWidthLogger(),
        TokenThroughput(tokens_per_batch=ctx.plan.batch_size * ctx.plan.seq_len),
        LearningRateMonitor(logging_interval="step"),
        ModelCheckpoint(dirpath=str(stage_dir.checkpoints), filename="step{step:07d}", auto_insert_metric_name=False,
                        every_n_train_steps=ckpt_every, save_last=True, save_top_k=1,
                        monitor="step", mode="max", enable_version_counter=False),  # last.ckpt, never last-v1
        # Ctrl-C / SIGTERM: finish the step, write last.ckpt, print the resume command, exit 130 / 143
        CheckpointOnSignal(str(stage_dir.last_checkpoint), ctx.resume_command),
        StudentConfigWriter(stage_dir),  # <stage_dir>/config.json: a sharded checkpoint's architecture
        MemoryPhases(),  # SLIMMOE_MEMORY_TRACE: the measured memory of the KD steps and validations (memory_trace.py)
        *([first_validation] if first_validation is not None else []),
    ]
    cache_callback = None  # KD stages with `teacher_cache:` build it (first one) and read their targets from it
    if teacher is not None and ctx.teacher_cache is not None:
        cache_callback = TeacherCacheCallback(ctx.teacher_cache, stage.name)
        callbacks.append(cache_callback)
    trainer = ctx.make_trainer(default_root_dir=str(stage_dir.path), logger=ctx.logger, max_steps=span.steps,
                               val_check_interval=val_every, check_val_every_n_epoch=None, extra_callbacks=callbacks,
                               progress_bar=StageProgressBar(stage.name, span.steps),
                               enable_autolog_hparams=False,  # the run's are logged once (Pipeline.run), not the stage's
                               **({"num_sanity_val_steps": -1} if first_validation is not None else {}))
    module = StageModule(student, teacher, kd=stage.kd, optimizer=stage.optimizer, parallel=ctx.config.parallel,
                         max_nonfinite_skips=stage.max_nonfinite_skips,
                         experts_implementation=ctx.config.experts_implementation,
                         lr_window=lr_window(ctx.plan, stage_plan.index, ctx.config.lr_schedule))
    module.apply_experts_kernel(trainer.strategy.root_device)  # before scoring (ExpertSlimming.setup), logged once
    if cache_callback is not None:
        try:  # a complete cache of another teacher fails here, before scoring or any step
            ctx.teacher_cache.check_teacher(module.teacher_fingerprint)
        except TeacherCacheError as err:
            raise ConfigError(str(err)) from err
    tokens = span.steps * ctx.plan.tokens_per_step
    rank_zero_info(f"[{stage.name}] stage {stage_plan.index}: {span.steps} steps, {tokens:,} tokens"
                   + (f", resuming from {ckpt_path}" if ckpt_path else ""))
    fit_started = time.time()
    trainer.fit(module, datamodule=ctx.datamodule, ckpt_path=ckpt_path)
    fit_s = time.time() - fit_started
    build_s = cache_callback.build_s if cache_callback is not None else 0.0
    first_validation_s = first_validation.seconds if first_validation is not None else 0.0
    if trainer.interrupted:
        raise KeyboardInterrupt(f"[{stage.name}] interrupted; continue with --resume true")
    # The fit is over and its last checkpoint written: the optimizer state (two moments per weight) and the last
    # step's gradients are dead weight for the validation and the export below (memory.py plans them without).
    trainer.strategy.optimizers, trainer.strategy.lr_scheduler_configs = [], []
    module.student.zero_grad(set_to_none=True)
    memory_trace.release_freed_memory()
    # The stage's result (summary.json) is a validation of the weights the fit's last step left. Lightning would log
    # this stand-alone validation one step late, on the next stage's first step, where that stage's first point
    # goes; so it is logged here, at the last step, unless the fit validated there already (the same numbers) or
    # the stage resumed from its last step's checkpoint (the killed run logged it).
    trainer.loggers = []
    metrics = trainer.validate(module, datamodule=ctx.datamodule, verbose=False)[0]
    if span.steps % val_every and start_step < span.steps:
        ctx.logger.log_metrics({k: v for k, v in metrics.items() if k.startswith("val/")}, step=span.steps - 1)
        ctx.logger.save()
    with memory_trace.phase("export"):  # gathering or streaming the student, writing and reload-checking hf/
        sharded = is_sharded(module.student)
        if is_fsdp1_sharded(module.student):  # collective: rank 0 gets a plain copy, gathered unit by unit
            student = gather_fsdp1_model(module.student)
        else:
            student = None if sharded else module.student.to("cpu")
        counts = count_params(module.student)
        meta = stage_dir.read_meta()
        summary = {
            "name": stage.name, "model_type": module.student.config.model_type, **widths_of(module.student.config),
            "total_params": counts.total, "active_params": counts.active,
            "tokens": tokens, "val_loss": metrics["val/loss"], "val_ppl": metrics["val/ppl"],
            "teacher_top1_agreement": metrics.get("val/teacher_agreement"),
            "tokens_per_s": (round(tokens / max(fit_s - build_s - first_validation_s, 1e-9), 1)
                             if ckpt_path is None else None),
            "wall_s": round(time.time() - started + meta.get("scoring_s", 0.0), 3),
            "kept_index_hash": meta.get("kept_index_hash"), "criterion": stage.criterion if stage.prunes else None,
        }
        extra_files = {TRAINING_FILE: training_file_text(ctx.plan.seq_len, stage.name)}  # eval's default window
        if sharded:  # collective, streamed tensor by tensor: no rank gathers the whole student
            export_sharded_hf(module.student, stage_dir.hf, tokenizer=ctx.tokenizer, extra_files=extra_files)
        if trainer.global_rank == 0:
            if not sharded:
                export_hf(student, stage_dir.hf, tokenizer=ctx.tokenizer, probe_ids=ctx.probe_ids,
                          extra_files=extra_files)
            changed = {"resumed_with_data_change": list(ctx.data_change)} if ctx.data_change else {}
            stage_dir.record_complete(widths=widths_of(module.student.config), steps=span.steps, tokens=tokens,
                                      fit_s=round(fit_s, 3), summary=summary, teacher_cache_build_s=round(build_s, 3),
                                      **changed)
            keep_one_checkpoint(stage_dir)  # only now: hf/ is verified and meta.json says complete
    trainer.strategy.barrier()
    rank_zero_info(f"[{stage.name}] done: val ppl {summary['val_ppl']:.3f}, "
                   f"{counts.total:,} params ({counts.active:,} active)")
    return StageResult(summary, build_s)


def keep_one_checkpoint(stage_dir: StageDir) -> None:
    """A complete stage keeps ``last.ckpt`` alone (StageDir.remove_step_checkpoints), if it is complete."""
    if is_complete_checkpoint(stage_dir.last_checkpoint):
        stage_dir.remove_step_checkpoints()


# ---------------------------------------------------------------------------------------------------
# What goes into a stage: data, teacher, student
# ---------------------------------------------------------------------------------------------------
def run_record(config: RunConfig, batch: dict | None = None, data: dict | None = None,
               precision: dict | None = None) -> dict:
    """What ``run.json`` holds and ``--resume`` compares: the stages, the sources, the data-stream geometry, the
    identity of the data (:func:`data_identity`) and the numerics (:func:`numerics`)."""
    stages = [{k: v for k, v in dataclasses.asdict(s).items() if k not in RESUME_MAY_CHANGE} for s in config.stages]
    record = {"stages": stages, "teacher": config.teacher, "student_init": config.student_init}
    for key, value in (("batch", batch), ("data", data), ("precision", precision)):
        if value is not None:
            record[key] = value
    return json.loads(json.dumps(record))


def numerics(plan: RunPlan, trainer: pl.Trainer) -> dict:
    """The Trainer's precision and the weights' dtypes: a resume at another precision trains against another
    teacher (its weights in another dtype), so it is refused naming the precision, not a fingerprint."""
    dtype = lambda d: str(d).removeprefix("torch.")
    return {"trainer": str(trainer.precision), "student_dtype": dtype(plan.student_dtype),
            "teacher_dtype": dtype(plan.teacher_dtype)}


def data_identity(dm: TextDataModule, tokenizer) -> dict:
    """What the run trains on: the source (files with their sizes, or the hub dataset's name, config and split), a
    sha256 of the packed training and validation blocks (which the corpus, the tokenizer, ``seq_len`` and the data
    seed decide) and the tokenizer's signature. A resume that trains on other data is refused (run_dir.py)."""
    hp = dm.hparams
    if hp.files is not None:
        source = {"files": [{"path": str(path), "bytes": path.stat().st_size} for path in corpora.expand_files(hp.files)]}
    elif hp.hub_dataset is not None:
        source = {"hub": {"name": hp.hub_dataset, "config": hp.hub_config, "split": hp.hub_split}}
    else:  # where this Python keeps its stdlib may differ between machines; the blocks' hash says what it holds
        source = {"stdlib": True}
    digest = hashlib.sha256()
    for blocks in (dm.train_blocks, dm.val_blocks):
        digest.update(f"{tuple(blocks.shape)}".encode())
        digest.update(blocks.to(torch.int64).contiguous().numpy().tobytes())
    return {"source": source, "blocks_sha256": digest.hexdigest(), "tokenizer": tokenizer_signature(tokenizer)}


def prepare_data(config: RunConfig, dm: TextDataModule, run_dir: RunDir, teacher_config):
    """The run's tokenizer, checked against the teacher's, and the packed data (a too-short corpus fails here,
    before any weight is loaded). Returns ``(tokenizer, new_tokenizer)``: the second is a tokenizer trained now
    (a pretrain run's), which ``RunDir.start`` saves once the whole run is validated, else None."""
    new_tokenizer = None
    if config.teacher is None:
        if dm.tokenizer is None and dm.hparams.tokenizer is None:
            if (run_dir.tokenizer_dir / "tokenizer.json").exists():
                dm.set_tokenizer(AutoTokenizer.from_pretrained(run_dir.tokenizer_dir))
            else:  # trained in memory now, saved with run.json
                with tempfile.TemporaryDirectory() as scratch:
                    new_tokenizer = dm.train_tokenizer(config.stages[0].pretrain.tokenizer_vocab_size, scratch)
    else:
        teacher_tok = AutoTokenizer.from_pretrained(config.teacher, trust_remote_code=config.trust_remote_code)
        if dm.hparams.tokenizer is not None:
            check_tokenizers_match(f"data.tokenizer={dm.hparams.tokenizer!r} vs teacher={config.teacher!r}",
                                   AutoTokenizer.from_pretrained(dm.hparams.tokenizer), teacher_tok)
        if config.student_init and os.path.exists(os.path.join(config.student_init, "tokenizer_config.json")):
            check_tokenizers_match(f"student_init={config.student_init!r} vs teacher={config.teacher!r}",
                                   AutoTokenizer.from_pretrained(config.student_init), teacher_tok)
        if len(teacher_tok) > teacher_config.vocab_size:
            raise ConfigError(f"teacher tokenizer has {len(teacher_tok)} tokens but the model's vocab_size is "
                              f"{teacher_config.vocab_size}")
        dm.set_tokenizer(teacher_tok)
    dm.setup("fit")
    return dm.tokenizer, new_tokenizer


def open_teacher_cache(config: RunConfig, dm: TextDataModule, plan: RunPlan, tokenizer,
                       precision) -> TeacherCache | None:
    """``teacher_cache:`` checked before any weight: the KD stages agree on what it holds, the directory can
    be written, and a complete cache matches this run in everything but the teacher's fingerprint (checked
    once the teacher is loaded). It covers the training blocks that the run's KD stages read."""
    if config.teacher_cache is None:
        return None
    stream = dm.train_stream()
    needed = [stream.block_indices(s.span.first_sample, s.span.num_samples) for s in plan.stages if s.distils]
    # A pretrain stage's teacher gets the tokenizer's vocabulary (incoming_student).
    vocab_size = plan.teacher_config.vocab_size if config.teacher is not None else len(tokenizer)
    try:
        key = cache_key([(s.stage.name, s.stage.kd) for s in plan.stages if s.distils], seq_len=plan.seq_len,
                        vocab_size=vocab_size, value_dtype=config.teacher_cache_dtype,
                        teacher_dtype=str(plan.teacher_dtype).removeprefix("torch."), precision=str(precision))
        cache = TeacherCache(config.teacher_cache, key, dm.train_blocks, torch.cat(needed) if needed else [])
        status = cache.check()
    except TeacherCacheError as err:
        raise ConfigError(str(err)) from err
    rank_zero_info(f"teacher cache {config.teacher_cache}: {status}; {len(cache.needed):,} training blocks, "
                   f"{len(cache.needed) * key.seq_len * key.bytes_per_token / 2**20:,.1f} MiB "
                   f"({key.bytes_per_token} B/token)")
    return cache


def load_teacher(ctx: RunContext):
    config, dtype = ctx.config, ctx.plan.teacher_dtype
    if config.teacher_8bit:  # checked by planning.plan_run: bitsandbytes present, not sharded, no true-half precision
        from lightning_slimmoe.quantize import load_teacher_8bit, quantized_bytes
        teacher = load_teacher_8bit(ctx.teacher_source, dtype, config.trust_remote_code)
        b = quantized_bytes(teacher)
        rank_zero_info(f"teacher in 8-bit: {b['int8_bytes'] / 2**20:,.1f} of {b['total_bytes'] / 2**20:,.1f} MiB "
                       f"int8 ({b['fused_expert_bytes'] / 2**20:,.1f} MiB of fused experts stay {dtype})")
    else:
        teacher = load_model(ctx.teacher_source, dtype, config.trust_remote_code, sharded=ctx.plan.sharded)
    # Before any sharding changes state_dict(); a meta-built teacher's is read from its checkpoint and is the
    # one a single process records, so resume and the teacher cache see the same teacher either way.
    teacher.slimmoe_fingerprint = model_fingerprint(teacher)
    # Frozen from the start: the teacher's own validation (summarize_teacher) wraps it as a module's model, and FSDP2
    # requires one dtype among a unit's *trainable* parameters, which a bf16 teacher with fp32-kept parameters (ERNIE's
    # moe_statics) does not have.
    teacher.requires_grad_(False)
    return teacher


def incoming_student(ctx: RunContext, stage_plan: StagePlan):
    """The student a stage starts from: a pretrain stage's random init, else the previous KD stage's export (or
    ``student_init`` / the teacher for the first one)."""
    config, dtype = ctx.config, ctx.plan.student_dtype
    stage = stage_plan.stage
    if stage.pretrain is not None:
        model_config = load_config("pretrain.model_config", stage.pretrain.model_config)
        model_config.vocab_size = len(ctx.tokenizer)
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            setattr(model_config, name, getattr(ctx.tokenizer, name))
        pl.seed_everything(ctx.seed + stage_plan.index, workers=True, verbose=False)  # the run's seed was said once
        return AutoModelForCausalLM.from_config(model_config, dtype=dtype)
    k = stage_plan.index
    previous = next((d.hf for p, d in zip(reversed(ctx.plan.stages[:k]), reversed(ctx.run_dir.stages[:k]))
                     if p.distils), None)
    source = str(previous) if previous else (config.student_init or ctx.teacher_source)
    return load_model(source, dtype, config.trust_remote_code, sharded=ctx.plan.sharded)


def summarize_teacher(ctx: RunContext, teacher, trainer) -> dict:
    metrics = trainer.validate(StageModule(teacher, parallel=ctx.config.parallel,
                                           experts_implementation=ctx.config.experts_implementation),
                               datamodule=ctx.datamodule,
                               verbose=False)[0]
    counts = count_params(teacher)
    return {"source": ctx.teacher_source, "model_type": teacher.config.model_type, **widths_of(teacher.config),
            "total_params": counts.total, "active_params": counts.active,
            "val_loss": metrics["val/lm_loss"], "val_ppl": metrics["val/ppl"]}
