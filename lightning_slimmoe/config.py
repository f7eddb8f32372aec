"""The recipe's schema: every key a YAML may hold besides ``trainer`` and ``data``, declared once, typed.

LightningCLI (jsonargparse) builds these dataclasses from YAML and ``--key value`` overrides, so a typo in any key
fails at parse time naming the key. :class:`RunConfig` holds the top-level keys; its attribute docstrings are the
``--help`` text and the README's config reference (:func:`config_reference`). A stage is a :class:`StageConfig`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal, Optional, Union

import torch

from lightning_slimmoe.distill import KDConfig
from lightning_slimmoe.errors import ConfigError

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _check(cond: bool, name: str, value, rule: str) -> None:
    if not cond:
        raise ConfigError(f"{name}={value!r}: {rule}")


@dataclass
class OptimizerConfig:
    """The student's optimizer and learning-rate schedule of one stage."""

    name: Literal["adamw", "adamw8bit"] = "adamw"
    """`adamw` (torch, fused on CUDA) or `adamw8bit` (bitsandbytes AdamW8bit: optimizer state in 8 bit)"""
    lr: float = 3e-4
    """peak learning rate"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas"""
    eps: float = 1e-8
    """AdamW epsilon"""
    warmup_ratio: float = 0.05
    """linear warm-up over this fraction of the stage's steps (of the run's, with `lr_schedule: run`)"""
    min_lr_ratio: float = 0.1
    """cosine decay down to lr x min_lr_ratio"""
    grad_clip: Optional[float] = 1.0
    """gradient norm clipping (null = none)"""

    def __post_init__(self):
        _check(self.lr > 0, "optimizer.lr", self.lr, "must be > 0")
        _check(0 <= self.warmup_ratio < 1, "optimizer.warmup_ratio", self.warmup_ratio, "must lie in [0, 1)")
        _check(0 <= self.min_lr_ratio <= 1, "optimizer.min_lr_ratio", self.min_lr_ratio, "must lie in [0, 1]")


@dataclass
class PretrainConfig:
    """A stage with no teacher: plain LM training of a model built from a config (the demo makes its
    teacher this way). ``vocab_size`` is taken from the tokenizer."""

    model_config: str
    """path to a Hugging Face config.json of a supported MoE family"""
    tokenizer_vocab_size: int = 4096
    """size of the BPE tokenizer trained on the data when none is given"""


@dataclass
class StageConfig:
    """One stage: prune the incoming student to its targets (SlimMoE §1), chosen by its criterion (§2), then recover
    it by KD from the original teacher on its own token budget (§3). A target left out is unchanged."""

    name: str
    """stage directory `stage_<k>_<name>`"""
    expert_width: Optional[Union[int, float]] = None
    """target width of every expert: an int, or a fraction (0, 1] of the teacher's width; multiples of 8"""
    attention_groups: Optional[int] = None
    """KV groups (GQA) kept per layer; must divide the current count"""
    shared_expert_width: Optional[Union[int, float]] = None
    """shared expert width (int or fraction), where the family has one with its own width"""
    round_to: Optional[int] = None
    """round fractional widths down to a multiple (e.g. 64)"""
    remove_experts_to: Optional[int] = None
    """baseline: drop whole experts (REAP saliency) down to this many per layer"""
    criterion: Literal["kd_taylor", "kd_fisher", "activation", "magnitude", "random"] = "kd_taylor"
    """what scores the neurons and groups; kd_fisher: estimated rise of the stage's KD loss on removal"""
    fisher_draws: int = 1
    """kd_fisher: Gaussian Fisher sketches per calibration sequence (one student forward + backward each; the
    second-order term's noise falls as 1/sqrt(sequences x draws), importance.py)"""
    calibration_tokens: int = 2_000_000
    """tokens used to score"""
    calibration_batch_size: int = 8
    """sequences per scoring batch (fixed, so scores do not depend on the device count)"""
    scores_file: Optional[str] = None
    """reuse a saved `scores.pt` instead of calibrating (must match the model's shape)"""
    max_tokens: int = 50_000_000
    """KD token budget of this stage (sets the number of steps)"""
    kd: KDConfig = field(default_factory=KDConfig)
    """distillation loss settings (`--stages.help KDConfig`)"""
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    """optimizer and schedule (`--stages.help OptimizerConfig`)"""
    val_every_n_steps: Optional[int] = None
    """validation interval (default: 4 validations per stage)"""
    checkpoint_every_n_steps: Optional[int] = None
    """checkpoint interval (default: with each validation; `last.ckpt` always kept)"""
    max_nonfinite_skips: int = 0
    """a step whose loss is NaN/Inf on any rank stops the run (0, torchtitan's rule); N > 0 skips up to N such steps
    of this stage (no update) and stops at the next; may change on `--resume`"""
    pretrain: Optional[PretrainConfig] = None
    """train a model from scratch with LM loss, no teacher (`--stages.help PretrainConfig`)"""

    def __post_init__(self):
        _check(bool(self.name) and "/" not in self.name, "stages[].name", self.name, "must be a non-empty name without '/'")
        _check(self.max_tokens > 0, f"stages[{self.name}].max_tokens", self.max_tokens, "must be > 0")
        _check(self.calibration_tokens > 0, f"stages[{self.name}].calibration_tokens", self.calibration_tokens,
               "must be > 0")
        _check(not isinstance(self.fisher_draws, bool) and isinstance(self.fisher_draws, int) and self.fisher_draws >= 1,
               f"stages[{self.name}].fisher_draws", self.fisher_draws, "must be an integer >= 1")
        _check(self.max_nonfinite_skips >= 0, f"stages[{self.name}].max_nonfinite_skips", self.max_nonfinite_skips,
               "must be >= 0")
        if self.pretrain is not None:
            pruning = [k for k in ("expert_width", "attention_groups", "shared_expert_width", "remove_experts_to")
                       if getattr(self, k) is not None]
            _check(not pruning, f"stages[{self.name}]", pruning, "a pretrain stage trains from scratch and prunes nothing")

    @property
    def prunes(self) -> bool:
        return self.pretrain is None and any(
            getattr(self, k) is not None
            for k in ("expert_width", "attention_groups", "shared_expert_width", "remove_experts_to"))


@dataclass
class ParallelConfig:
    """FSDP settings of teacher and student (used with ``trainer.strategy`` ModelParallelStrategy or FSDPStrategy)."""

    param_dtype: Optional[str] = None
    """FSDP compute dtype of the all-gathered params, e.g. bfloat16"""
    reduce_dtype: Optional[str] = "float32"
    """gradient reduce-scatter dtype"""
    activation_checkpointing: bool = False
    """recompute each student decoder layer in backward: the KD step (FSDP2 and FSDP1) and, under any strategy, the backward of `kd_taylor` / `kd_fisher` scoring"""
    reshard_after_forward: bool = True
    """FSDP2: ZeRO-3 (true) or keep gathered params until backward (ZeRO-2)"""

    def __post_init__(self):
        for name in ("param_dtype", "reduce_dtype"):
            value = getattr(self, name)
            if value is not None and value not in _DTYPES:
                raise ConfigError(f"parallel.{name}={value!r}: must be one of {sorted(_DTYPES)} or null")

    def dtype(self, name: str) -> torch.dtype | None:
        value = getattr(self, name)
        return None if value is None else _DTYPES[value]


@dataclass
class ServingConfig:
    """The serving check of the final stage (vLLM / SGLang fused-MoE and tensor-parallel rules,
    ``lightning_slimmoe/serving.py``, docs/families-2026.md "Serving constraints"; with ``engine``, that engine's
    support table, ``lightning_slimmoe/engines.py``)."""

    engine: Optional[Literal["vllm", "sglang", "llamacpp"]] = None
    """the engine to serve with: its support table (family x what was pruned x dtype) is checked too; null = the generic vLLM / SGLang width rules at `tp`"""
    tp: Optional[int] = None
    """tensor-parallel size the result is to be served at; null = no check (with `engine`: tp 1)"""
    dtype: Literal["bf16", "fp16", "fp32", "fp8", "q8_0"] = "bf16"
    """served weights: `bf16` / `fp16` / `fp32` (width per rank an integer), `fp8` block-quantized 128x128 (width per rank a multiple of 128), `q8_0` (llama.cpp)"""
    strict: bool = False
    """a final stage that does not serve is an error before any compute (default: a warning)"""

    def __post_init__(self):
        if self.tp is not None:
            _check(not isinstance(self.tp, bool) and isinstance(self.tp, int) and self.tp >= 1, "serving.tp", self.tp,
                   "must be an int >= 1 or null")
        _check(self.dtype in ("bf16", "fp16", "fp32", "fp8", "q8_0"), "serving.dtype", self.dtype,
               "must be bf16, fp16, fp32, fp8 or q8_0")
        _check(self.dtype != "q8_0" or self.engine == "llamacpp", "serving.dtype", self.dtype,
               "q8_0 is llama.cpp's: set serving.engine: llamacpp")
        _check(self.engine in (None, "vllm", "sglang", "llamacpp"), "serving.engine", self.engine,
               "must be vllm, sglang, llamacpp or null")


@dataclass
class MemoryPlanConfig:
    """The memory plan of the run (``lightning_slimmoe/memory.py``, ``plan --memory``), checked by ``train`` before
    any weight is read."""

    check: Literal["error", "warn", "off"] = "error"
    """a phase that does not fit: `error` refuses the run naming the stage, phase, term, numbers and fixes; `warn` logs that and runs; `off` does not plan"""
    device_memory_gib: Optional[float] = None
    """memory of one device in GiB, the hardware the recipe is sized for (a phase may use 90% of it); null = 80 for GPUs (`train`: the visible GPU's own, which also caps a larger value), for accelerator cpu the host's RAM shared by the node's ranks"""

    def __post_init__(self):
        _check(self.check in ("error", "warn", "off"), "memory_plan.check", self.check, "must be error, warn or off")
        if self.device_memory_gib is not None:
            _check(not isinstance(self.device_memory_gib, bool) and self.device_memory_gib > 0,
                   "memory_plan.device_memory_gib", self.device_memory_gib, "must be > 0 or null")


@dataclass
class RunConfig:
    """The top-level keys of a recipe (besides ``seed_everything``, ``trainer`` and ``data``)."""

    output_dir: str = "runs/slimmoe"
    """everything the run writes"""
    teacher: Optional[str] = None
    """hub id or local HF dir of the MoE teacher; null = made by a leading `pretrain` stage"""
    teacher_config: Optional[str] = None
    """config-only JSON of the teacher, for `plan` without weights; where the teacher's own config can be read (a local dir, a hub id in the HF cache) it must agree with it (names, shapes) and is not used"""
    student_init: Optional[str] = None
    """start the first slimming stage from this HF dir (e.g. another tool's pruned model)"""
    stages: list[StageConfig] = field(default_factory=list)
    """list of stages (below), run in order"""
    resume: bool = False
    """continue the run in `output_dir`"""
    resume_allow_data_change: bool = False
    """let `--resume` continue on data (corpus, tokenizer, `seq_len`) other than what `run.json` records; the differences are written into the resumed stages' `meta.json`"""
    trust_remote_code: bool = False
    """allow models that ship modelling code (it runs that code)"""
    teacher_8bit: bool = False
    """hold the frozen teacher in 8-bit (bitsandbytes): attention `Linear8bitLt` + int8 fused experts; ~43% of its fp32 bytes, KD loss drift ~0.1% (`docs/scaling.md`); not with `ModelParallelStrategy` or `*-true` half precision"""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """FSDP settings: `param_dtype`, `reduce_dtype` (`float32`), `activation_checkpointing` (KD steps under FSDP2 and FSDP1, importance scoring always), `reshard_after_forward` (FSDP2)"""
    teacher_cache: Optional[str] = None
    """directory for the teacher's top-k of the training blocks: computed once before the first KD stage, then read by every KD stage instead of the teacher forward; a cache built for another teacher, data, `seq_len` or `top_k` is refused (`docs/scaling.md`)"""
    teacher_cache_dtype: Literal["float32", "bfloat16"] = "float32"
    """cached teacher values: `float32` (the live teacher's losses) or `bfloat16` (half the values' size)"""
    serving: ServingConfig = field(default_factory=ServingConfig)
    """serving check of the final stage: `engine` (`vllm` / `sglang` / `llamacpp`: that engine's support table of family x pruning x dtype, `lightning_slimmoe/engines.py`), `tp` (tensor-parallel size; null = no TP check), `dtype` (`bf16`, `fp16`, `fp32`, `fp8` block-quantized 128x128, `q8_0`), `strict` (an error instead of a warning)"""
    lr_schedule: Literal["stage", "run"] = "stage"
    """`stage`: every stage warms up and decays over its own steps; `run`: one warm-up at the start of the first KD stage and one cosine decay across all KD stages (each stage's `optimizer.lr` scales the shared curve; a `pretrain` stage keeps its own); `warmup_ratio` / `min_lr_ratio` are read from the first KD stage"""
    experts_implementation: Optional[Literal["grouped_mm", "batched_mm", "eager"]] = None
    """transformers' fused-experts kernel of teacher and student; null = transformers' `grouped_mm` on CPU (`eager` measured faster there but is not bitwise-equal to it) and on CUDA compute capability >= 8.0, else `eager`, logged once per run (`docs/results.md` "Speed")"""
    memory_plan: MemoryPlanConfig = field(default_factory=MemoryPlanConfig)
    """the memory plan per rank, checked by `train` before any weight is read: `check` (`error`, `warn` or `off`), `device_memory_gib` (the GPU's memory the recipe is sized for; null = 80, or in `train` the visible GPU's; accelerator cpu: the host's RAM shared by its ranks); `plan --memory` prints it (`docs/scaling.md`)"""

    @classmethod
    def from_parsed(cls, values) -> "RunConfig":
        """The instance from a parsed (and instantiated) config holding these keys at its top level."""
        return cls(**{f.name: values[f.name] for f in dataclasses.fields(cls)})


def attribute_docs(cls) -> dict[str, str]:
    """A dataclass's attribute docstrings (the string right below each field), as jsonargparse reads them for
    ``--help``."""
    import ast
    import inspect
    import textwrap

    docs, tree = {}, ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    for node, after in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant):
            docs[node.target.id] = after.value.value
    return docs


def config_reference() -> str:
    """The README's table of the top-level keys, from :class:`RunConfig` (its defaults and attribute docstrings)."""
    docs = attribute_docs(RunConfig)
    rows = ["| key | default | meaning |", "|---|---|---|",
            "| `seed_everything` | 0 | seed for init, data order, random scores |"]
    for f in dataclasses.fields(RunConfig):
        default = f.default if f.default is not dataclasses.MISSING else None
        shown = "" if f.default is dataclasses.MISSING else ("null" if default is None else f"`{default}`"
                                                             if isinstance(default, str) else str(default).lower())
        rows.append(f"| `{f.name}` | {shown} | {docs.get(f.name, '')} |")
    rows += ["| `trainer` | | any `lightning.Trainer` argument (`devices`, `precision`, `strategy`, `callbacks`, ...) |",
             "| `data` | | `lightning_slimmoe.data.TextDataModule` init args (below) |"]
    return "\n".join(rows)
