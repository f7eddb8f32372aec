"""What a recipe costs in compute, before renting machines: each stage's FLOPs per token and its GPU-hours at a stated
MFU (``plan``; ``plan --mfu 0.4 --peak-tflops 989``).

Per token of a KD step, with ``N`` a model's active parameters less its embeddings and output head (the matmul
parameters one token passes through; an embedding lookup costs nothing), ``A`` its attention FLOPs (per softmax-
attention layer ``2 heads (d_qk + d_v) c``, ``c`` the mean causal context: ``seq_len / 2``, a sliding window's size
at most, half a chunk for chunked attention; linear-attention and Mamba layers' state updates are left out) and
``H x V`` the output head:

* teacher forward ``2 N_t + A_t`` (zero for a ``pretrain`` stage; with ``teacher_cache`` it is spent building the
  cache, once per distinct training block — as often as without it when every block is read once);
* student forward + backward ``3 (2 N_s + A_s)``, plus one more forward ``2 N_s + A_s`` where activation
  checkpointing recomputes it (the FSDP strategies with ``parallel.activation_checkpointing``);
* KD head ``2 H V`` (the teacher's top-k over the full vocabulary) + ``6 H V`` (the student's logits, and the
  gradients of its hidden states and head).

A stage's GPU-hours are ``max_tokens x FLOPs per token / (MFU x peak)``, plus its importance scoring
(``calibration_tokens`` through the incoming, full-size student: forward + backward for ``kd_taylor``, one more
per Fisher draw for ``kd_fisher``, a forward for ``activation``); validation is left out. ``peak``: dense bf16
TFLOP/s of one GPU (H100 SXM 989; H200 989; A100 312); MFU is an assumption, not a measurement
(``perf/mfu`` in TensorBoard measures a run's).
"""

from __future__ import annotations

from dataclasses import dataclass

from lightning_slimmoe.config import RunConfig
from lightning_slimmoe.memory import ModelProfile, model_profile
from lightning_slimmoe.planning import Shapes

DEFAULT_MFU = 0.4
H100_BF16_DENSE_TFLOPS = 989.0


def matmul_params(p: ModelProfile) -> int:
    """Active parameters a token is multiplied by in the decoder layers: less the embedding and the head."""
    return p.active - p.embedding - p.head


def attention_flops(p: ModelProfile, seq_len: int) -> float:
    """Forward attention-score and -value FLOPs per token (module docstring)."""
    total = 0.0
    for kind, window in p.attention_layers:
        context = seq_len / 2
        if window is not None:
            context = min(window, seq_len / 2) if kind == "sliding_attention" else min(window, seq_len) / 2
        total += 2 * p.attention_width * context
    return total


def forward_flops(p: ModelProfile, seq_len: int) -> float:
    """One token's forward through the decoder layers (no head)."""
    return 2 * matmul_params(p) + attention_flops(p, seq_len)


@dataclass(frozen=True)
class StageCompute:
    name: str
    tokens: int
    teacher_forward: float  # FLOPs per token
    student_forward_backward: float
    kd_head: float
    scoring_flops: float  # the whole importance scoring of the stage

    @property
    def per_token(self) -> float:
        return self.teacher_forward + self.student_forward_backward + self.kd_head

    @property
    def total(self) -> float:
        return self.tokens * self.per_token + self.scoring_flops


def stage_compute(config: RunConfig, shapes: Shapes, seq_len: int, recompute: bool) -> list[StageCompute]:
    """:class:`StageCompute` of every stage; ``recompute``: activation checkpointing runs each student layer's
    forward again in backward."""
    first = shapes.initial_config if shapes.initial_config is not None else shapes.teacher_config
    teacher = model_profile(shapes.teacher_config)
    found = []
    for k, (stage, out_config) in enumerate(zip(config.stages, shapes.configs)):
        student = model_profile(out_config)
        distils = stage.pretrain is None
        incoming = model_profile(shapes.configs[k - 1] if k else first) if distils else student
        t_fwd = forward_flops(teacher, seq_len) if distils else 0.0
        s_fwd = forward_flops(student, seq_len)
        head = (2 * teacher.hidden * teacher.vocab if distils else 0.0) + 6 * student.hidden * student.vocab
        scoring = 0.0
        if stage.prunes and not stage.scores_file:
            passes = {"kd_taylor": 3, "kd_fisher": 3 * (1 + stage.fisher_draws), "activation": 1}.get(stage.criterion, 0)
            calibration = -(-stage.calibration_tokens // seq_len) * seq_len
            scoring = calibration * (passes * forward_flops(incoming, seq_len) + (
                t_fwd + 8 * incoming.hidden * incoming.vocab if stage.criterion in ("kd_taylor", "kd_fisher") else 0))
        found.append(StageCompute(stage.name, int(stage.max_tokens), t_fwd, (4 if recompute else 3) * s_fwd, head,
                                  scoring))
    return found


def gpu_hours(flops: float, mfu: float, peak_tflops: float) -> float:
    return flops / (mfu * peak_tflops * 1e12) / 3600


def compute_json(stages: list[StageCompute], mfu: float, peak_tflops: float, recompute: bool) -> dict:
    return {"mfu": mfu, "peak_tflops": peak_tflops, "activation_checkpointing_recompute": recompute,
            "stages": [{"name": s.name, "tokens": s.tokens, "teacher_forward_flops_per_token": s.teacher_forward,
                        "student_forward_backward_flops_per_token": s.student_forward_backward,
                        "kd_head_flops_per_token": s.kd_head, "flops_per_token": s.per_token,
                        "scoring_flops": s.scoring_flops, "total_flops": s.total,
                        "gpu_hours": round(gpu_hours(s.total, mfu, peak_tflops), 1)} for s in stages],
            "gpu_hours": round(gpu_hours(sum(s.total for s in stages), mfu, peak_tflops), 1)}


def tokens_text(tokens: int) -> str:
    """40B, 320M, 64k, 64."""
    for size, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if tokens >= size:
            return f"{tokens / size:.3g}{unit}"
    return str(tokens)


def format_compute(stages: list[StageCompute], mfu: float, peak_tflops: float, recompute: bool) -> str:
    rows = [("stage", "tokens", "teacher fwd", "student fwd+bwd", "KD head", "GFLOP/token", "GPU-hours")]
    for s in stages:
        rows.append((s.name, tokens_text(s.tokens), f"{s.teacher_forward / 1e9:.1f}", f"{s.student_forward_backward / 1e9:.1f}",
                     f"{s.kd_head / 1e9:.1f}", f"{s.per_token / 1e9:.1f}",
                     f"{gpu_hours(s.total, mfu, peak_tflops):,.0f}"))
    rows.append(("total", tokens_text(sum(s.tokens for s in stages)), "", "", "", "",
                 f"{gpu_hours(sum(s.total for s in stages), mfu, peak_tflops):,.0f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    head = (f"compute (GFLOP per training token; GPU-hours at {mfu:.0%} MFU of {peak_tflops:g} TFLOP/s per GPU"
            + (", activation checkpointing's recompute included" if recompute else "") + ", scoring included):")
    return "\n".join([head, *("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                              for r in rows)])
