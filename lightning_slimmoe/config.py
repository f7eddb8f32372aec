"""Typed stage configuration. LightningCLI (jsonargparse) builds these from YAML, so a typo in any key
fails at parse time naming the key, and ``--stages.1.max_tokens 1e9`` style overrides work."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from lightning_slimmoe.distill import KDConfig


def _check(cond: bool, name: str, value, rule: str) -> None:
    if not cond:
        raise ValueError(f"{name}={value!r}: {rule}")


@dataclass
class OptimizerConfig:
    name: Literal["adamw", "adamw8bit"] = "adamw"  # adamw8bit = bitsandbytes AdamW8bit (optimizer state in 8 bit)
    lr: float = 3e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    warmup_ratio: float = 0.05  # linear warm-up over this fraction of the stage's steps
    min_lr_ratio: float = 0.1  # cosine decay down to lr * min_lr_ratio
    grad_clip: Optional[float] = 1.0

    def __post_init__(self):
        _check(self.lr > 0, "optimizer.lr", self.lr, "must be > 0")
        _check(0 <= self.warmup_ratio < 1, "optimizer.warmup_ratio", self.warmup_ratio, "must lie in [0, 1)")
        _check(0 <= self.min_lr_ratio <= 1, "optimizer.min_lr_ratio", self.min_lr_ratio, "must lie in [0, 1]")


@dataclass
class PretrainConfig:
    """A stage with no teacher: plain LM training of a model built from a config (the demo makes its
    teacher this way). ``vocab_size`` is taken from the tokenizer."""

    model_config: str  # path to a Hugging Face config.json of a supported MoE family
    tokenizer_vocab_size: int = 4096  # size of the BPE tokenizer trained on the data when none is given


@dataclass
class StageConfig:
    name: str
    # --- what this stage prunes to (SlimMoE §1); omitted = unchanged --------------------------------
    expert_width: Optional[Union[int, float]] = None  # absolute d_expert, or a fraction of the teacher's
    attention_groups: Optional[int] = None  # KV groups (GQA) kept per layer
    shared_expert_width: Optional[Union[int, float]] = None  # Qwen2-MoE shared expert
    round_to: Optional[int] = None  # round fractional widths down to a multiple (e.g. 64)
    remove_experts_to: Optional[int] = None  # baseline: drop whole experts (REAP saliency) down to this many
    # --- how it is chosen (SlimMoE §2) --------------------------------------------------------------
    criterion: Literal["kd_taylor", "activation", "magnitude", "random"] = "kd_taylor"
    calibration_tokens: int = 2_000_000
    calibration_batch_size: int = 8  # sequences per scoring batch (fixed, so scores do not depend on devices)
    scores_file: Optional[str] = None  # reuse scores saved by an earlier run instead of calibrating
    # --- how it is recovered (SlimMoE §3) -----------------------------------------------------------
    max_tokens: int = 50_000_000  # KD token budget of this stage
    kd: KDConfig = field(default_factory=KDConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    val_every_n_steps: Optional[int] = None  # default: 4 validations per stage
    checkpoint_every_n_steps: Optional[int] = None  # default: with each validation
    # a step whose loss is NaN/Inf on any rank stops the run (0, torchtitan's rule); N > 0 skips up to N such
    # steps of this stage (no backward, no weight or optimizer-state change) and stops at the N+1-th
    max_nonfinite_skips: int = 0
    pretrain: Optional[PretrainConfig] = None

    def __post_init__(self):
        _check(bool(self.name) and "/" not in self.name, "stages[].name", self.name, "must be a non-empty name without '/'")
        _check(self.max_tokens > 0, f"stages[{self.name}].max_tokens", self.max_tokens, "must be > 0")
        _check(self.calibration_tokens > 0, f"stages[{self.name}].calibration_tokens", self.calibration_tokens,
               "must be > 0")
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
