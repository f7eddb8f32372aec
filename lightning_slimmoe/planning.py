"""Planning a run: the recipe (plus, for the schedule, the packed data and the Trainer) -> everything the run will do.

Pure: nothing is written and no weight is read, so every bad target, shape or combination fails here in seconds.

* :func:`plan_shapes` — the teacher's config and the student's config after every stage (what ``plan`` prints,
  :func:`plan_summary`), validating each stage's targets against the model it receives.
* :func:`plan_run` — adds the schedule (each stage's steps, where it starts in the data stream and on the step
  axis), the weight dtypes and whether models are built sharded, from the data module and the Trainer.
"""

from __future__ import annotations

import pickle
import re
from dataclasses import dataclass

import torch
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

from lightning_slimmoe.config import ConfigError, RunConfig, StageConfig
from lightning_slimmoe.checkpoint_layout import sharded_read_problem
from lightning_slimmoe.families import get_family, language_config
from lightning_slimmoe.importance import ImportanceScores
from lightning_slimmoe.params import count_config_params
from lightning_slimmoe.serving import enforce_serving
from lightning_slimmoe.slimming import check_expert_count, resolve_target, slim_config, widths_of, with_num_experts
from lightning_slimmoe.sources import load_config, offline_config, quantization_of


@dataclass(frozen=True)
class Shapes:
    teacher_config: object
    configs: tuple  # the student's config after each stage
    initial_config: object = None  # the student before the first stage: student_init's config (None: the teacher's)


@dataclass(frozen=True)
class StageSpan:
    steps: int
    step_offset: int  # global steps of the earlier stages (TensorBoard's step axis continues)
    first_sample: int  # global sample index where the stage's part of the data stream starts
    num_samples: int


@dataclass(frozen=True)
class StagePlan:
    index: int
    stage: StageConfig
    config: object  # the student's config at the end of the stage
    span: StageSpan

    @property
    def distils(self) -> bool:
        """A KD stage (every stage but a leading ``pretrain`` one) runs against the frozen teacher."""
        return self.stage.pretrain is None


@dataclass(frozen=True)
class RunPlan:
    teacher_config: object
    stages: tuple[StagePlan, ...]
    student_dtype: torch.dtype
    teacher_dtype: torch.dtype
    sharded: bool  # FSDP2: teacher and students are built on the meta device and loaded shard by shard
    world_size: int
    accumulate: int
    batch_size: int
    seq_len: int
    data_seed: int

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.accumulate * self.world_size * self.seq_len

    @property
    def batch(self) -> dict:
        """The data-stream geometry (recorded in run.json: a resume with another one would skip or repeat samples)."""
        return {"world_size": self.world_size, "accumulate_grad_batches": self.accumulate,
                "batch_size": self.batch_size, "seq_len": self.seq_len, "data_seed": self.data_seed}


def plan_shapes(config: RunConfig, seq_len: int | None = None) -> Shapes:
    """Teacher config and the config after every stage; raises :class:`ConfigError` on any bad target, and on a
    ``seq_len`` (the data's, where given) longer than the teacher or ``student_init`` was trained for."""
    stages = config.stages
    if not stages:
        raise ConfigError("stages: empty; give at least one stage")
    names = [s.name for s in stages]
    if len(set(names)) != len(names):
        raise ConfigError(f"stages[].name: {names} has duplicates; stage names must be unique")
    pretrain = [k for k, s in enumerate(stages) if s.pretrain is not None]
    if config.teacher is None:
        if pretrain != [0]:
            raise ConfigError("teacher: missing. Give a hub id or local HF dir, or make the first stage a "
                              "`pretrain:` stage that trains the teacher")
        teacher_config = load_config("stages[0].pretrain.model_config", stages[0].pretrain.model_config)
    else:
        if pretrain:
            raise ConfigError(f"stages[{pretrain[0]}].pretrain: a pretrain stage only makes sense without `teacher:`")
        teacher_config = _teacher_config(config)
    # A multimodal wrapper (Qwen3.5-MoE) is planned as the text-only causal LM that is slimmed and exported.
    teacher_config = language_config(teacher_config)
    check_seq_len(seq_len, f"teacher={config.teacher!r}" if config.teacher is not None
                  else f"stages[0].pretrain.model_config={stages[0].pretrain.model_config!r}", teacher_config)
    model, initial = teacher_config, None
    if config.student_init:
        model = language_config(load_config("student_init", config.student_init, config.trust_remote_code))
        if model.vocab_size != teacher_config.vocab_size:
            raise ConfigError(f"student_init vocab_size={model.vocab_size} != teacher vocab_size="
                              f"{teacher_config.vocab_size}: KD needs the same vocabulary")
        check_seq_len(seq_len, f"student_init={config.student_init!r}", model)
        initial = model
    configs = []
    for k, stage in enumerate(stages):
        if stage.prunes:
            model = _slimmed(k, stage, model, teacher_config)
        configs.append(model)
    return Shapes(teacher_config, tuple(configs), initial)


def _teacher_config(config: RunConfig):
    """The teacher's config. ``teacher_config`` (a config-only JSON) lets ``plan`` run before the weights are there,
    but where the teacher's own config can be read without the network (a local dir, a hub id already in the cache)
    that one is what ``train`` loads, so it is authoritative: a ``teacher_config`` that disagrees with it (one left
    in a copied recipe) would plan another model's shapes and fail only once the weights are loaded, so it is
    refused here, naming both."""
    if not config.teacher_config:
        return load_config("teacher", config.teacher, config.trust_remote_code)
    given = load_config("teacher_config", config.teacher_config)
    own = offline_config("teacher", config.teacher, config.trust_remote_code)
    if own is None:  # a hub id not downloaded yet: teacher_config is all there is to plan from
        return given
    ours, theirs = model_identity(given), model_identity(own)
    diff = [f"{k}: {ours.get(k)} vs {theirs.get(k)}" for k in ours | theirs if ours.get(k) != theirs.get(k)]
    if diff:
        raise ConfigError(
            f"teacher_config={config.teacher_config!r} does not describe teacher={config.teacher!r} "
            f"(teacher_config vs teacher): {'; '.join(diff)}. The teacher's own config is the one trained from: "
            "remove `teacher_config` from the recipe (or pass `--teacher_config null`), or make it match the teacher")
    return own


def model_identity(config) -> dict:
    """What two configs of one model must share: the architecture and every shape the plan and the weights
    depend on (layers, widths, expert count, heads, head dims, vocabulary), read through the family record."""
    config = language_config(config)
    return {"model_type": config.model_type,
            **{k: getattr(config, k, None) for k in ("hidden_size", "num_hidden_layers", "vocab_size")},
            **widths_of(config), **mla_head_dims(config)}


def check_seq_len(seq_len: int | None, what: str, model_config) -> None:
    """A ``seq_len`` past the model's ``max_position_embeddings`` would distil on positions (RoPE rotations) the model
    was not made for, silently: refused, saying whether its config already scales RoPE or what scaling would do."""
    limit = getattr(model_config, "max_position_embeddings", None)
    if seq_len is None or limit is None or seq_len <= limit:
        return
    rope = getattr(model_config, "rope_parameters", None) or getattr(model_config, "rope_scaling", None) or {}
    # rope_parameters is one dict, or one per layer type (e.g. full / sliding attention)
    per_type = list(rope.values()) if rope and all(isinstance(v, dict) for v in rope.values()) else [rope]
    scaled = sorted({str(r.get("rope_type", r.get("type"))) for r in per_type} - {"None", "default"})
    raise ConfigError(
        f"data.init_args.seq_len={seq_len} exceeds the max_position_embeddings={limit} of {what} "
        f"({model_config.model_type}): the model is not made for positions past {limit}. "
        + (f"Its config already scales RoPE ({', '.join(scaled)}) up to that length. " if scaled else
           "A longer context would need RoPE scaling (e.g. rope_parameters {rope_type: yarn, factor: "
           f"{-(-seq_len // limit)}, original_max_position_embeddings: {limit}}}) in its config, which "
           "changes the model the student learns from. ")
        + f"Set data.init_args.seq_len <= {limit}")


def _slimmed(k: int, stage: StageConfig, model, teacher_config):
    """The config after stage ``k`` prunes ``model``; its expert removal, scores file and targets checked."""
    if stage.remove_experts_to is not None:
        family = get_family(model)
        if not 0 < stage.remove_experts_to <= family.num_experts(model):
            raise ConfigError(f"stages.{k}.remove_experts_to={stage.remove_experts_to}: must lie "
                              f"in [1, {family.num_experts(model)}] [stage {stage.name!r}]")
        try:
            check_expert_count(model, stage.remove_experts_to)
        except ValueError as err:
            raise ConfigError(f"stages.{k}.remove_experts_to: {err} [stage {stage.name!r}]") from err
        model = with_num_experts(model, stage.remove_experts_to)
    if stage.scores_file:  # read weights_only and shape-checked against the planned model, now
        try:
            ImportanceScores.load(stage.scores_file, model)
        except (OSError, ValueError, KeyError, RuntimeError, pickle.UnpicklingError) as err:
            raise ConfigError(f"stages.{k}.scores_file={stage.scores_file!r}: {err} [stage {stage.name!r}]") from err
    try:
        target = resolve_target(model, expert_width=stage.expert_width, attention_groups=stage.attention_groups,
                                shared_expert_width=stage.shared_expert_width, round_to=stage.round_to,
                                reference_config=teacher_config)
    except ValueError as err:  # "<key>=<value>: <rule>": named as the recipe key to change (stages.<k>.<key>)
        where = f"stages.{k}." if re.match(r"[a-z_]+=", str(err)) else f"stages.{k}: "
        raise ConfigError(f"{where}{err} [stage {stage.name!r}]") from err
    return slim_config(model, target)


def precision_dtypes(precision: str) -> tuple[torch.dtype, torch.dtype]:
    """(student, teacher) weight dtypes for a Lightning precision string."""
    precision = str(precision)
    if precision.startswith("bf16"):
        return (torch.bfloat16 if "true" in precision else torch.float32), torch.bfloat16
    if precision.startswith("16"):
        return (torch.float16 if "true" in precision else torch.float32), torch.float16
    return torch.float32, torch.float32


def plan_run(config: RunConfig, shapes: Shapes, datamodule, trainer) -> RunPlan:
    """The whole run, from the shapes, the set-up data module (steps per token budget) and a Trainer built from the
    recipe's ``trainer`` section (world size, gradient accumulation, precision, strategy)."""
    # serving.tp: a final stage that vLLM / SGLang would refuse warns (serving.strict: fails) before any compute
    enforce_serving(config.serving, config.stages[-1].name, shapes.configs[-1], shapes.teacher_config)
    sharded = isinstance(trainer.strategy, ModelParallelStrategy)
    fsdp1 = isinstance(trainer.strategy, FSDPStrategy)  # shards too, but loads whole models first
    teacher_config = shapes.teacher_config
    for field in ("teacher", "student_init") if sharded else ():
        source = getattr(config, field)
        if source and (problem := sharded_read_problem(source, teacher_config)):
            raise ConfigError(f"trainer.strategy=ModelParallelStrategy with {field}: {problem}")
    if fsdp1 and getattr(teacher_config, "tie_word_embeddings", False):
        raise ConfigError(f"trainer.strategy=FSDPStrategy: the teacher ({teacher_config.model_type}) ties its input "
                          "and output embeddings, one parameter that FSDP1's per-module units cannot split; use "
                          "trainer.strategy=ModelParallelStrategy (FSDP2)")
    if config.teacher_8bit:  # bitsandbytes present, and not a combination that would corrupt the teacher
        from lightning_slimmoe.quantize import check_teacher_8bit
        try:
            check_teacher_8bit(sharded or fsdp1, trainer.precision)
        except ValueError as err:
            raise ConfigError(str(err)) from err
        if config.teacher is not None and quantization_of("teacher", config.teacher, None, config.trust_remote_code):
            # bitsandbytes would quantize the float8 weights as they are, without their block scales
            raise ConfigError(f"teacher_8bit: true with teacher={config.teacher!r}: its weights are block FP8 or "
                              "MXFP4, which is dequantized on load but not re-quantized to 8-bit; use "
                              "teacher_8bit: false")
    world, accumulate = trainer.world_size, trainer.accumulate_grad_batches
    hp = datamodule.hparams
    samples_per_step = hp.batch_size * accumulate * world
    stages, step_offset = [], 0
    for k, (stage, stage_config) in enumerate(zip(config.stages, shapes.configs)):
        steps = datamodule.steps_for_tokens(stage.max_tokens, accumulate, world)
        span = StageSpan(steps, step_offset, step_offset * samples_per_step, steps * samples_per_step)
        stages.append(StagePlan(k, stage, stage_config, span))
        step_offset += steps
    student_dtype, teacher_dtype = precision_dtypes(trainer.precision)
    teacher_dtype = config.parallel.dtype("param_dtype") or teacher_dtype  # the frozen teacher needs no fp32 master
    return RunPlan(teacher_config=teacher_config, stages=tuple(stages), student_dtype=student_dtype,
                   teacher_dtype=teacher_dtype, sharded=sharded, world_size=world, accumulate=accumulate,
                   batch_size=hp.batch_size, seq_len=hp.seq_len, data_seed=hp.seed)


@dataclass(frozen=True)
class LRWindow:
    """A KD stage's place on one learning-rate curve over the whole run (``lr_schedule: run``)."""

    offset: int  # optimizer steps of the earlier KD stages
    total: int  # optimizer steps of all KD stages
    warmup_ratio: float  # of ``total``; the first KD stage's
    min_lr_ratio: float  # the first KD stage's


def lr_window(plan: RunPlan, index: int, schedule: str) -> LRWindow | None:
    """Stage ``index``'s :class:`LRWindow` under ``lr_schedule: run``; None (its own warm-up and decay) under
    ``stage`` and for a ``pretrain`` stage, which trains another model and keeps its own curve."""
    if schedule == "stage" or not plan.stages[index].distils:
        return None
    kd = [s for s in plan.stages if s.distils]
    first = kd[0].stage.optimizer
    return LRWindow(offset=sum(s.span.steps for s in kd if s.index < index), total=sum(s.span.steps for s in kd),
                    warmup_ratio=first.warmup_ratio, min_lr_ratio=first.min_lr_ratio)


def mla_head_dims(config) -> dict[str, int]:
    """An MLA config's per-head widths, ``{"qk_head_dim": nope + rope, "v_head_dim": v}`` (empty for other
    attention): its ``head_dim`` is the rope part only (glm4_moe_lite aliases it to ``qk_rope_head_dim``)."""
    nope, rope, v = (getattr(config, k, None) for k in ("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"))
    if nope is None or rope is None or v is None:
        return {}
    return {"qk_head_dim": int(nope) + int(rope), "v_head_dim": int(v)}


def plan_summary(shapes: Shapes, stages: list[StageConfig]) -> dict:
    """What ``plan`` prints: shapes and parameter counts per stage."""
    def describe(config):
        counts = count_config_params(config)
        return {**widths_of(config), **mla_head_dims(config), "total_params": counts.total,
                "active_params": counts.active}
    return {"teacher": describe(shapes.teacher_config),
            "stages": [{"name": s.name, **describe(c)} for s, c in zip(stages, shapes.configs)]}
