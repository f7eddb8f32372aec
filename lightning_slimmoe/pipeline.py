"""The SlimMoE stage pipeline — read this file to know what a run does.

    validate everything (config, targets of every stage, teacher, tokenizer, data)  — before any weight
    for each stage k:
        student = previous stage's export (stage 1: the teacher, or a pretrain stage's random init)
        Trainer.fit(StageModule(student, frozen original teacher), callbacks=[ExpertSlimming, ...])
            ExpertSlimming.setup: score on calibration tokens -> keep indices -> physical slice
        validate, export stage_<k>_<name>/hf (reload-checked), meta.json
    final/ (+ tokenizer, model card), summary.json

SlimMoE §3: every stage distils from the *original* teacher, not from the previous student; each stage
prunes one-shot to an intermediate size and recovers with its own token budget. Finished stages are
skipped on ``--resume``; an interrupted stage continues from its last checkpoint with its saved slice.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import pickle
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from callbacks import ExpertSlimming, ParamAndWidthLogger, ThroughputMonitor
from callbacks.expert_slimming import widths_of
from callbacks.preemption import CheckpointOnSigterm
from callbacks.teacher_cache import TeacherCacheCallback
from lightning_slimmoe.checkpoint_io import write_json_atomic
from lightning_slimmoe.config import StageConfig
from lightning_slimmoe.consolidate import StudentConfigWriter
from lightning_slimmoe.data import TextDataModule
from lightning_slimmoe.distributed import ParallelConfig, gather_fsdp1_model, is_fsdp1_sharded, is_sharded
from lightning_slimmoe.export import export_hf, export_sharded_hf, model_card, replace_dir
from lightning_slimmoe.families import get_family
from lightning_slimmoe.importance import ImportanceScores
from lightning_slimmoe.loading import meta_model
from lightning_slimmoe.module import StageModule, model_fingerprint
from lightning_slimmoe.params import count_config_params, count_params
from lightning_slimmoe.slimming import resolve_target, slim_config, with_num_experts
from lightning_slimmoe.strategies import latest_complete_checkpoint
from lightning_slimmoe.tb import ContinuousTensorBoardLogger
from lightning_slimmoe.teacher_cache import TeacherCache, TeacherCacheError, cache_key

RUN_FILE = "run.json"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


# Stage keys that change no result and may differ on --resume (e.g. allow skipping a NaN step after one stopped the run).
RESUME_MAY_CHANGE = ("max_nonfinite_skips",)


class StageSpan(NamedTuple):
    steps: int
    step_offset: int  # global steps of the earlier stages (TensorBoard's step axis continues)
    first_sample: int  # global sample index where the stage's part of the data stream starts
    num_samples: int


class ConfigError(ValueError):
    """A run configuration that cannot work, found before any compute."""


@dataclass
class RunSpec:
    output_dir: str
    stages: list[StageConfig]
    teacher: str | None = None  # hub id / local HF dir; None = made by a leading pretrain stage
    teacher_config: str | None = None  # config-only JSON of the teacher, for planning without weights
    student_init: str | None = None  # start the first slimming stage from this HF dir instead of the teacher
    resume: bool = False
    trust_remote_code: bool = False
    teacher_8bit: bool = False  # frozen teacher in 8-bit: Linear8bitLt + int8 fused experts (quantize.py)
    seed: int = 0
    parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)  # FSDP2 settings
    teacher_cache: str | None = None  # directory of the teacher top-k cache (teacher_cache.py); None = live teacher
    teacher_cache_dtype: str = "float32"  # cached values: float32 (= live losses) or bfloat16 (half the size)


# ---------------------------------------------------------------------------------------------------
# Loading (config first, weights only once everything is known to be valid)
# ---------------------------------------------------------------------------------------------------
def _check_source(field: str, source: str) -> None:
    if os.path.exists(source):
        if not os.path.isfile(os.path.join(source, "config.json")):
            raise ConfigError(f"{field}={source!r}: directory has no config.json (not a Hugging Face model dir)")
        return
    if source.startswith((".", "/", "~")) or not _HUB_ID.match(source):
        raise FileNotFoundError(f"{field}={source!r}: no such local path, and not a hub id of the form 'org/name'")


def load_config(field: str, source: str, trust_remote_code: bool = False):
    if source.endswith(".json"):
        if not os.path.isfile(source):
            raise FileNotFoundError(f"{field}={source!r}: config file not found")
    else:
        _check_source(field, source)
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except ValueError as err:
        if "trust_remote_code" in str(err):
            raise ConfigError(
                f"{field}={source!r} ships custom modelling code (as the released Phi-mini/tiny-MoE checkpoints "
                "do); loading it runs that code, so it is off by default. Set `trust_remote_code: true` in the "
                "YAML only if you trust the source.") from err
        raise
    get_family(config)  # unsupported / dense model_type fails here
    return config


def load_model(source: str, dtype: torch.dtype, trust_remote_code: bool = False, sharded: bool = False):
    """The model in ``source``, whole (``from_pretrained``) — or, for a sharded run, on the meta device with
    its load pending: ``StageModule.configure_model`` shards it and each rank reads only its own rows of every
    tensor (loading.py), so no rank ever holds the whole model (design.md §4)."""
    if sharded:
        return meta_model(source, dtype, trust_remote_code=trust_remote_code)
    return AutoModelForCausalLM.from_pretrained(source, dtype=dtype, trust_remote_code=trust_remote_code,
                                                use_safetensors=True)


def tokenizer_signature(tokenizer) -> dict:
    vocab = sorted(tokenizer.get_vocab().items())
    return {"vocab_hash": hashlib.sha256(json.dumps(vocab).encode()).hexdigest(), "size": len(tokenizer),
            "special": {k: v for k, v in sorted(tokenizer.special_tokens_map.items()) if isinstance(v, str)},
            "eos_token_id": tokenizer.eos_token_id, "bos_token_id": tokenizer.bos_token_id}


def check_tokenizers_match(what: str, ours, theirs) -> None:
    a, b = tokenizer_signature(ours), tokenizer_signature(theirs)
    if a != b:
        diff = {k: (a[k], b[k]) for k in a if a[k] != b[k]}
        raise ConfigError(f"{what}: tokenizers differ (a different tokenizer, even with the same vocab size, makes "
                          f"KD compare unrelated tokens): {diff}")


def _precision_dtypes(precision: str) -> tuple[torch.dtype, torch.dtype]:
    """(student, teacher) weight dtypes for a Lightning precision string."""
    precision = str(precision)
    if precision.startswith("bf16"):
        return (torch.bfloat16 if "true" in precision else torch.float32), torch.bfloat16
    if precision.startswith("16"):
        return (torch.float16 if "true" in precision else torch.float32), torch.float16
    return torch.float32, torch.float32


# ---------------------------------------------------------------------------------------------------
class Pipeline:
    def __init__(self, spec: RunSpec, datamodule: TextDataModule, make_trainer: Callable[..., pl.Trainer]):
        self.spec = spec
        self.dm = datamodule
        self.make_trainer = make_trainer
        self.out = Path(spec.output_dir)
        self.stage_dirs = [self.out / f"stage_{k}_{s.name}" for k, s in enumerate(spec.stages)]
        self._unsaved_tokenizer: Path | None = None  # a pretrain run's new tokenizer, written by _start_run
        self.teacher_cache: TeacherCache | None = None  # checked before weights (_prepare_teacher_cache)
        self._cache_build_s = 0.0
        self.sharded = False  # set by run() from the trainer's strategy (ModelParallelStrategy: FSDP2)

    # ---- validation: everything that can be checked without weights -----------------------------
    def plan(self) -> tuple[object, list]:
        """Teacher config and the config after every stage; raises on any bad target."""
        spec = self.spec
        if not spec.stages:
            raise ConfigError("stages: empty; give at least one stage")
        names = [s.name for s in spec.stages]
        if len(set(names)) != len(names):
            raise ConfigError(f"stages[].name: {names} has duplicates; stage names must be unique")
        pretrain = [k for k, s in enumerate(spec.stages) if s.pretrain is not None]
        if spec.teacher is None:
            if pretrain != [0]:
                raise ConfigError("teacher: missing. Give a hub id or local HF dir, or make the first stage a "
                                  "`pretrain:` stage that trains the teacher")
            teacher_config = load_config("stages[0].pretrain.model_config", spec.stages[0].pretrain.model_config)
        else:
            if pretrain:
                raise ConfigError(f"stages[{pretrain[0]}].pretrain: a pretrain stage only makes sense without `teacher:`")
            teacher_config = (load_config("teacher_config", spec.teacher_config) if spec.teacher_config
                              else load_config("teacher", spec.teacher, spec.trust_remote_code))
        config = teacher_config
        if spec.student_init:
            config = load_config("student_init", spec.student_init, spec.trust_remote_code)
            if config.vocab_size != teacher_config.vocab_size:
                raise ConfigError(f"student_init vocab_size={config.vocab_size} != teacher vocab_size="
                                  f"{teacher_config.vocab_size}: KD needs the same vocabulary")
        configs = []
        for k, stage in enumerate(spec.stages):
            if stage.prunes:
                if stage.remove_experts_to is not None:
                    family = get_family(config)
                    if not 0 < stage.remove_experts_to <= family.num_experts(config):
                        raise ConfigError(f"stages[{stage.name}].remove_experts_to={stage.remove_experts_to}: must lie "
                                          f"in [1, {family.num_experts(config)}]")
                    config = with_num_experts(config, stage.remove_experts_to)
                if stage.scores_file:  # read weights_only and shape-checked against the planned model, now
                    try:
                        ImportanceScores.load(stage.scores_file, config)
                    except (OSError, ValueError, KeyError, RuntimeError, pickle.UnpicklingError) as err:
                        raise ConfigError(f"stages[{k}] ({stage.name}).scores_file={stage.scores_file!r}: "
                                          f"{err}") from err
                try:
                    target = resolve_target(config, expert_width=stage.expert_width,
                                            attention_groups=stage.attention_groups,
                                            shared_expert_width=stage.shared_expert_width, round_to=stage.round_to,
                                            reference_config=teacher_config)
                except ValueError as err:
                    raise ConfigError(f"stages[{k}] ({stage.name}): {err}") from err
                config = slim_config(config, target)
            configs.append(config)
        return teacher_config, configs

    def _check_weight_files(self) -> None:
        """Weights are read from safetensors only: a pickled ``pytorch_model.bin`` can run code when loaded."""
        for field, source in (("teacher", self.spec.teacher), ("student_init", self.spec.student_init)):
            if not source or not os.path.isdir(source):
                continue  # hub ids: from_pretrained(use_safetensors=True) refuses pickled weights itself
            files = os.listdir(source)
            if not any(f.endswith(".safetensors") or f.endswith(".safetensors.index.json") for f in files):
                pickled = sorted(f for f in files if f.endswith((".bin", ".pt", ".pth", ".ckpt", ".pkl")))
                raise ConfigError(
                    f"{field}={source!r}: no *.safetensors weights in the directory"
                    + (f" (found {pickled}: pickle-based weights are refused because loading them can run code; "
                       "convert them once, in a process you trust, with "
                       "`AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)`)"
                       if pickled else ""))

    def _run_record(self, batch: dict | None = None) -> dict:
        stages = [{k: v for k, v in dataclasses.asdict(s).items() if k not in RESUME_MAY_CHANGE} for s in self.spec.stages]
        record = {"stages": stages, "teacher": self.spec.teacher, "student_init": self.spec.student_init}
        if batch is not None:  # the data-stream geometry: a resume with another one would skip or repeat samples
            record["batch"] = batch
        return json.loads(json.dumps(record))

    def _check_run_dir(self, batch: dict | None = None) -> None:
        """Read-only: a bad ``--resume`` or an output_dir holding another run fails before any work."""
        if rank_zero_only.rank != 0:
            # Other ranks (re-launched by Lightning's script launcher, or started by torchrun) run the same
            # script; rank 0 owns run.json and has checked it.
            return
        run_file = self.out / RUN_FILE
        current = self._run_record(batch)
        if self.spec.resume:
            if not run_file.exists():
                raise ConfigError(f"--resume: no run to resume in output_dir={str(self.out)!r} (no {RUN_FILE})")
            saved = json.loads(run_file.read_text())
            if batch is None:
                saved.pop("batch", None)
            diff = config_diff(saved, current)
            if diff:
                raise ConfigError(f"--resume: the configuration differs from the run in {self.out} "
                                  f"(saved -> now): {'; '.join(diff[:20])}. Resume with the same stages, or start "
                                  "a new output_dir")
        elif run_file.exists():
            raise ConfigError(f"output_dir={str(self.out)!r} already holds a run; pass `--resume true` to continue "
                              "it, or choose another output_dir (nothing is overwritten)")

    def _start_run(self, batch: dict) -> None:
        """The first write of a run: only after config, targets, scores files, tokenizers and data all passed."""
        self._check_run_dir(batch)
        if rank_zero_only.rank != 0:
            return
        if not self.spec.resume:
            self.out.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.out / RUN_FILE, self._run_record(batch))
        if self._unsaved_tokenizer is not None:
            self.dm.tokenizer.save_pretrained(self._unsaved_tokenizer)

    # ---- the run ------------------------------------------------------------------------------------
    def run(self) -> dict:
        spec = self.spec
        pl.seed_everything(spec.seed, workers=True)
        teacher_config, planned = self.plan()  # configs, targets, scores files: no weights
        self._check_weight_files()
        self._check_run_dir()
        tokenizer = self._setup_tokenizer_and_data(teacher_config)  # tokenizers match, data packs: still no writes
        eval_trainer = self.make_trainer(default_root_dir=str(self.out), logger=False, enable_checkpointing=False)
        # FSDP2 runs build teacher and students on the meta device and load them shard by shard (loading.py);
        # single-process and DDP runs hold whole models on each device by definition and load them whole.
        self.sharded = isinstance(eval_trainer.strategy, ModelParallelStrategy)
        fsdp1 = isinstance(eval_trainer.strategy, FSDPStrategy)  # shards too, but loads whole models first
        if fsdp1 and getattr(teacher_config, "tie_word_embeddings", False):
            raise ConfigError(f"trainer.strategy=FSDPStrategy: the teacher ({teacher_config.model_type}) ties its input "
                              "and output embeddings, one parameter that FSDP1's per-module units cannot split; use "
                              "trainer.strategy=ModelParallelStrategy (FSDP2)")
        if spec.teacher_8bit:  # bitsandbytes present, and not a combination that would corrupt the teacher
            from lightning_slimmoe.quantize import check_teacher_8bit
            try:
                check_teacher_8bit(self.sharded or fsdp1, eval_trainer.precision)
            except ValueError as err:
                raise ConfigError(str(err)) from err
        world, accumulate = eval_trainer.world_size, eval_trainer.accumulate_grad_batches
        schedule = self._schedule(world, accumulate)
        student_dtype, teacher_dtype = _precision_dtypes(eval_trainer.precision)
        teacher_dtype = spec.parallel.dtype("param_dtype") or teacher_dtype  # the frozen teacher needs no fp32 master
        self.teacher_cache = self._prepare_teacher_cache(teacher_config, tokenizer, eval_trainer, schedule,
                                                         teacher_dtype)
        self._start_run({"world_size": world, "accumulate_grad_batches": accumulate,
                         "batch_size": self.dm.hparams.batch_size, "seq_len": self.dm.hparams.seq_len,
                         "data_seed": self.dm.hparams.seed})
        logger = ContinuousTensorBoardLogger(str(self.out / "tb"))
        tokens_per_step = self.dm.hparams.batch_size * accumulate * world * self.dm.hparams.seq_len
        probe_ids = self.dm.val_blocks[:1, : min(32, self.dm.hparams.seq_len)].clone()

        teacher = None
        summary = {"teacher": {}, "stages": [], "final_dir": None}
        for k, (stage, stage_dir, span) in enumerate(zip(spec.stages, self.stage_dirs, schedule)):
            meta_path = stage_dir / "meta.json"
            meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
            if meta.get("status") == "complete" and (stage_dir / "hf").is_dir():
                rank_zero_info(f"[{stage.name}] complete, skipped (resume)")
                summary["stages"].append(meta["summary"])
            else:
                if stage.pretrain is None and teacher is None:
                    teacher = self._load_teacher(teacher_dtype)
                    if not summary["teacher"]:
                        summary["teacher"] = self._teacher_summary(teacher, self.teacher_source, eval_trainer)
                student = self._incoming_student(k, stage, tokenizer, student_dtype, teacher_config)
                stage_summary = self._run_stage(k, stage, stage_dir, student, None if stage.pretrain else teacher,
                                                span.steps, span.step_offset, span.first_sample, logger,
                                                tokens_per_step, teacher_config, tokenizer, probe_ids)
                summary["stages"].append(stage_summary)
        if not summary["teacher"]:
            teacher = teacher or self._load_teacher(teacher_dtype)
            summary["teacher"] = self._teacher_summary(teacher, self.teacher_source, eval_trainer)
        summary["final_dir"] = str(self.out / "final")
        if self.teacher_cache is not None:
            summary["teacher_cache"] = {**self.teacher_cache.info(), "build_s": round(self._cache_build_s, 3)}
        if eval_trainer.global_rank == 0:
            final_src = self.stage_dirs[-1] / "hf"
            tmp = self.out / "final.tmp"
            if tmp.exists():
                shutil.rmtree(tmp)
            shutil.copytree(final_src, tmp)
            (tmp / "README.md").write_text(model_card(summary))
            replace_dir(tmp, self.out / "final")
            write_json_atomic(self.out / "summary.json", summary)
        logger.finalize("success")
        return summary

    # ---- pieces ------------------------------------------------------------------------------------
    def _setup_tokenizer_and_data(self, teacher_config):
        spec, dm = self.spec, self.dm
        if spec.teacher is None:
            tok_dir = self.out / "tokenizer"
            if dm.tokenizer is None and dm.hparams.tokenizer is None:
                if (tok_dir / "tokenizer.json").exists():
                    dm.set_tokenizer(AutoTokenizer.from_pretrained(tok_dir))
                else:  # trained in memory now, saved by _start_run once the whole run is validated
                    with tempfile.TemporaryDirectory() as scratch:
                        dm.train_tokenizer(spec.stages[0].pretrain.tokenizer_vocab_size, scratch)
                    self._unsaved_tokenizer = tok_dir
        else:
            teacher_tok = AutoTokenizer.from_pretrained(spec.teacher, trust_remote_code=spec.trust_remote_code)
            if dm.hparams.tokenizer is not None:
                check_tokenizers_match(f"data.tokenizer={dm.hparams.tokenizer!r} vs teacher={spec.teacher!r}",
                                       AutoTokenizer.from_pretrained(dm.hparams.tokenizer), teacher_tok)
            if spec.student_init and os.path.exists(os.path.join(spec.student_init, "tokenizer_config.json")):
                check_tokenizers_match(f"student_init={spec.student_init!r} vs teacher={spec.teacher!r}",
                                       AutoTokenizer.from_pretrained(spec.student_init), teacher_tok)
            if len(teacher_tok) > teacher_config.vocab_size:
                raise ConfigError(f"teacher tokenizer has {len(teacher_tok)} tokens but the model's vocab_size is "
                                  f"{teacher_config.vocab_size}")
            dm.set_tokenizer(teacher_tok)
        dm.setup("fit")  # tokenise + pack now: a too-short corpus fails before any weight is loaded
        return dm.tokenizer

    def _schedule(self, world: int, accumulate: int) -> list[StageSpan]:
        """Each stage's steps and where it starts: the stages continue one data stream (and one step axis)."""
        samples_per_step = self.dm.hparams.batch_size * accumulate * world
        spans, step_offset = [], 0
        for stage in self.spec.stages:
            steps = self.dm.steps_for_tokens(stage.max_tokens, accumulate, world)
            spans.append(StageSpan(steps, step_offset, step_offset * samples_per_step, steps * samples_per_step))
            step_offset += steps
        return spans

    def _prepare_teacher_cache(self, teacher_config, tokenizer, eval_trainer, schedule: list[StageSpan],
                               teacher_dtype: torch.dtype) -> TeacherCache | None:
        """``teacher_cache:`` checked before any weight: the KD stages agree on what it holds, the directory can
        be written, and a complete cache matches this run in everything but the teacher's fingerprint (checked
        once the teacher is loaded). It covers the training blocks that the run's KD stages read."""
        spec, dm = self.spec, self.dm
        if spec.teacher_cache is None:
            return None
        stream = dm.train_stream()
        needed = [stream.block_indices(span.first_sample, span.num_samples)
                  for stage, span in zip(spec.stages, schedule) if stage.pretrain is None]
        # A pretrain stage's teacher gets the tokenizer's vocabulary (_incoming_student).
        vocab_size = teacher_config.vocab_size if spec.teacher is not None else len(tokenizer)
        try:
            key = cache_key([(s.name, s.kd) for s in spec.stages if s.pretrain is None], seq_len=dm.hparams.seq_len,
                            vocab_size=vocab_size, value_dtype=spec.teacher_cache_dtype,
                            teacher_dtype=str(teacher_dtype).removeprefix("torch."),
                            precision=str(eval_trainer.precision))
            cache = TeacherCache(spec.teacher_cache, key, dm.train_blocks, torch.cat(needed) if needed else [])
            status = cache.check()
        except TeacherCacheError as err:
            raise ConfigError(str(err)) from err
        rank_zero_info(f"teacher cache {spec.teacher_cache}: {status}; {len(cache.needed):,} training blocks, "
                       f"{len(cache.needed) * key.seq_len * key.bytes_per_token / 2**20:,.1f} MiB "
                       f"({key.bytes_per_token} B/token)")
        return cache

    def _incoming_student(self, k, stage, tokenizer, dtype, teacher_config):
        spec = self.spec
        if stage.pretrain is not None:
            config = load_config("pretrain.model_config", stage.pretrain.model_config)
            config.vocab_size = len(tokenizer)
            for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
                setattr(config, name, getattr(tokenizer, name))
            pl.seed_everything(spec.seed + k, workers=True)
            return AutoModelForCausalLM.from_config(config, dtype=dtype)
        previous = next((d / "hf" for s, d in zip(reversed(spec.stages[:k]), reversed(self.stage_dirs[:k]))
                         if s.pretrain is None), None)
        source = str(previous) if previous else (spec.student_init or self.teacher_source)
        return load_model(source, dtype, spec.trust_remote_code, sharded=self.sharded)

    def _load_teacher(self, dtype: torch.dtype):
        if self.spec.teacher_8bit:  # checked in run(): bitsandbytes present, not sharded, no true-half precision
            from lightning_slimmoe.quantize import load_teacher_8bit, quantized_bytes
            teacher = load_teacher_8bit(self.teacher_source, dtype, self.spec.trust_remote_code)
            b = quantized_bytes(teacher)
            rank_zero_info(f"teacher in 8-bit: {b['int8_bytes'] / 2**20:,.1f} of {b['total_bytes'] / 2**20:,.1f} MiB "
                           f"int8 ({b['fused_expert_bytes'] / 2**20:,.1f} MiB of fused experts stay {dtype})")
        else:
            teacher = load_model(self.teacher_source, dtype, self.spec.trust_remote_code, sharded=self.sharded)
        # Before any sharding changes state_dict(); a meta-built teacher's is read from its checkpoint and is the
        # one a single process records, so resume and the teacher cache see the same teacher either way.
        teacher.slimmoe_fingerprint = model_fingerprint(teacher)
        return teacher

    @property
    def teacher_source(self) -> str:
        """The original teacher of every stage: `teacher:`, or the export of the pretrain stage (always
        stage 0, see `plan`). Only read once that stage has run."""
        if self.spec.teacher is not None:
            return self.spec.teacher
        return str(self.stage_dirs[0] / "hf")

    def _teacher_summary(self, teacher, source, trainer) -> dict:
        metrics = trainer.validate(StageModule(teacher, parallel=self.spec.parallel), datamodule=self.dm,
                                   verbose=False)[0]
        counts = count_params(teacher)
        return {"source": source, "model_type": teacher.config.model_type, **widths_of(teacher.config),
                "total_params": counts.total, "active_params": counts.active,
                "val_loss": metrics["val/lm_loss"], "val_ppl": metrics["val/ppl"]}

    def _run_stage(self, k, stage, stage_dir, student, teacher, steps, step_offset, sample_offset, logger,
                   tokens_per_step, teacher_config, tokenizer, probe_ids) -> dict:
        started = time.time()
        stage_dir.mkdir(parents=True, exist_ok=True)
        ckpt_dir = stage_dir / "checkpoints"
        last = ckpt_dir / "last.ckpt"
        resume_from = latest_complete_checkpoint(ckpt_dir) if self.spec.resume and ckpt_dir.is_dir() else None
        ckpt_path = str(resume_from) if resume_from else None
        val_every = min(steps, stage.val_every_n_steps or max(1, steps // 4))
        ckpt_every = min(steps, stage.checkpoint_every_n_steps or val_every)
        logger.step_offset = step_offset
        self.dm.stream_offset = sample_offset
        callbacks = [
            ExpertSlimming(stage, str(stage_dir), reference_config=teacher_config, seed=self.spec.seed,
                           step_offset=step_offset),
            ParamAndWidthLogger(),
            ThroughputMonitor(tokens_per_batch=self.dm.hparams.batch_size * self.dm.hparams.seq_len),
            ModelCheckpoint(dirpath=str(ckpt_dir), filename="step{step:07d}", auto_insert_metric_name=False,
                            every_n_train_steps=ckpt_every, save_last=True, save_top_k=1,
                            monitor="step", mode="max", enable_version_counter=False),  # last.ckpt, never last-v1
            CheckpointOnSigterm(str(last)),  # SIGTERM: finish the step, write last.ckpt, exit 143
            StudentConfigWriter(stage_dir),  # <stage_dir>/config.json: a sharded checkpoint's architecture
        ]
        cache_callback = None  # KD stages with `teacher_cache:` build it (first one) and read their targets from it
        if teacher is not None and self.teacher_cache is not None:
            cache_callback = TeacherCacheCallback(self.teacher_cache, stage.name)
            callbacks.append(cache_callback)
        trainer = self.make_trainer(default_root_dir=str(stage_dir), logger=logger, max_steps=steps,
                                    val_check_interval=val_every, check_val_every_n_epoch=None,
                                    extra_callbacks=callbacks)
        module = StageModule(student, teacher, kd=stage.kd, optimizer=stage.optimizer, parallel=self.spec.parallel,
                             max_nonfinite_skips=stage.max_nonfinite_skips)
        if cache_callback is not None:
            try:  # a complete cache of another teacher fails here, before scoring or any step
                self.teacher_cache.check_teacher(module.teacher_fingerprint)
            except TeacherCacheError as err:
                raise ConfigError(str(err)) from err
        rank_zero_info(f"[{stage.name}] stage {k}: {steps} steps, {steps * tokens_per_step:,} tokens"
                       + (f", resuming from {ckpt_path}" if ckpt_path else ""))
        fit_started = time.time()
        trainer.fit(module, datamodule=self.dm, ckpt_path=ckpt_path)
        fit_s = time.time() - fit_started
        build_s = cache_callback.build_s if cache_callback is not None else 0.0  # a one-off, not this stage's speed
        self._cache_build_s += build_s
        if trainer.interrupted:
            raise KeyboardInterrupt(f"[{stage.name}] interrupted; continue with --resume true")
        metrics = trainer.validate(module, datamodule=self.dm, verbose=False)[0]
        sharded = is_sharded(module.student)
        if is_fsdp1_sharded(module.student):  # collective: rank 0 gets a plain copy, gathered unit by unit
            student = gather_fsdp1_model(module.student)
        else:
            student = None if sharded else module.student.to("cpu")
        counts = count_params(module.student)
        meta_path = stage_dir / "meta.json"
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else {"stage": stage.name}
        stage_summary = {
            "name": stage.name, "model_type": module.student.config.model_type, **widths_of(module.student.config),
            "total_params": counts.total, "active_params": counts.active,
            "tokens": steps * tokens_per_step, "val_loss": metrics["val/loss"], "val_ppl": metrics["val/ppl"],
            "teacher_top1_agreement": metrics.get("val/teacher_agreement"),
            "tokens_per_s": round(steps * tokens_per_step / max(fit_s - build_s, 1e-9), 1) if ckpt_path is None else None,
            "wall_s": round(time.time() - started + meta.get("scoring_s", 0.0), 3),
            "kept_index_hash": meta.get("kept_index_hash"), "criterion": stage.criterion if stage.prunes else None,
        }
        if sharded:  # collective, streamed tensor by tensor: no rank gathers the whole student
            export_sharded_hf(module.student, stage_dir / "hf", tokenizer=tokenizer)
        if trainer.global_rank == 0:
            if not sharded:
                export_hf(student, stage_dir / "hf", tokenizer=tokenizer, probe_ids=probe_ids)
            meta.update({"status": "complete", "widths": widths_of(module.student.config), "steps": steps,
                         "tokens": steps * tokens_per_step, "fit_s": round(fit_s, 3), "summary": stage_summary,
                         "teacher_cache_build_s": round(build_s, 3)})
            write_json_atomic(meta_path, meta)
        trainer.strategy.barrier()
        rank_zero_info(f"[{stage.name}] done: val ppl {stage_summary['val_ppl']:.3f}, "
                       f"{counts.total:,} params ({counts.active:,} active)")
        return stage_summary


def config_diff(saved, now, path: str = "") -> list[str]:
    """Leaf-by-leaf differences, e.g. ``stages[1].max_tokens: 512 -> 1024``."""
    if isinstance(saved, dict) and isinstance(now, dict):
        return [d for k in sorted(set(saved) | set(now), key=str)
                for d in config_diff(saved.get(k), now.get(k), f"{path}.{k}" if path else str(k))]
    if isinstance(saved, list) and isinstance(now, list):  # e.g. a stage added or removed: name it, no dump
        brief = lambda x: f"stage {x['name']!r}" if isinstance(x, dict) and "name" in x else json.dumps(x)
        return ([d for i, (a, b) in enumerate(zip(saved, now)) for d in config_diff(a, b, f"{path}[{i}]")]
                + [f"{path}[{i}]: {brief(saved[i])} -> (removed)" for i in range(len(now), len(saved))]
                + [f"{path}[{i}]: (none) -> {brief(now[i])} (added)" for i in range(len(saved), len(now))])
    return [] if saved == now else [f"{path}: {json.dumps(saved)} -> {json.dumps(now)}"]


def plan_summary(teacher_config, configs, stages) -> dict:
    """What ``python -m lightning_slimmoe plan`` prints: shapes and parameter counts per stage."""
    def describe(config):
        counts = count_config_params(config)
        return {**widths_of(config), "total_params": counts.total, "active_params": counts.active}
    return {"teacher": describe(teacher_config),
            "stages": [{"name": s.name, **describe(c)} for s, c in zip(stages, configs)]}
