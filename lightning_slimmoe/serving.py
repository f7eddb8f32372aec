"""Whether a (slimmed) model can be served: the vLLM / SGLang fused-MoE and tensor-parallel shape rules.

The rules are those of ``docs/families-2026.md`` ("Serving constraints for the result"), checked from a config
alone (no weights), for one tensor-parallel size ``tp`` and weight format ``dtype``:

* fused-MoE kernels stack the experts from one config integer: one uniform expert width over every MoE layer
  (and one shared-expert width);
* the expert width per tensor-parallel rank (``width / tp``) must be an integer (``bf16``) or an integer multiple
  of 128 for block-FP8 (``fp8``, 128 x 128 blocks): ``width % tp == 0`` or ``width % (tp * 128) == 0``; the shared
  expert width likewise, when the family has one;
* ``num_attention_heads % tp == 0``, and the KV heads divide ``tp`` or are divisible by it;
* family rules: PhiMoE in vLLM / SGLang asserts top-2 routing (``num_experts_per_tok == 2``).

With an engine named (``plan --serve vllm|sglang|llamacpp``, ``serving.engine``), :func:`check_engine` adds what that
engine's support table says about the family and what was pruned (``engines.py``), and applies the width rules above
only to the engines they are rules of (vLLM, SGLang; llama.cpp has no fused-MoE tensor parallelism to split by).

For each failing width it proposes the nearest widths that do serve (the largest below, the smallest above, up to
the teacher's width) and the stage's ``round_to`` that yields them. ``plan`` prints :func:`format_serving` for
every stage; :func:`enforce_serving` (called by ``planning.plan_run``, before any weight) warns, or with
``serving.strict`` refuses the run, when the final stage does not serve.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from lightning.pytorch.utilities import rank_zero_warn

from lightning_slimmoe.config import ConfigError
from lightning_slimmoe.families import get_family
from lightning_slimmoe.slimming import EXPERT_WIDTH_ALIGNMENT

SERVING_DTYPES = ("bf16", "fp16", "fp32", "fp8")  # the width rules: fp8 needs 128-blocks per rank, the rest integers
FP8_BLOCK = 128  # block-FP8 quantizes weights in 128 x 128 blocks: every rank's slice must hold whole blocks
DOC = 'docs/families-2026.md "Serving constraints"'


@dataclass
class ServingCheck:
    """The result of :func:`check_serving` for one model shape (one stage)."""

    tp: int | None
    dtype: str
    engine: str | None = None  # vllm | sglang | llamacpp; None: the generic vLLM / SGLang width rules only
    ok: bool = True
    problems: list[str] = field(default_factory=list)
    nearest: dict[str, dict] = field(default_factory=dict)
    """per failing width field (``expert_width``, ``shared_expert_width``): ``width``, ``multiple`` (what a
    serving width is a multiple of), ``below`` / ``above`` (nearest serving widths, None = there is none),
    ``limit`` (the teacher's width, the bound of ``above``) and ``round_to`` (the recipe value that yields them)"""

    @property
    def label(self) -> str:
        """The ``plan`` table's column header, e.g. ``serves@tp8/fp8`` or ``serves@vllm/tp8/fp8``."""
        return "serves@" + "/".join([*([self.engine] if self.engine else []),
                                     *([f"tp{self.tp}"] if self.tp is not None else []), self.dtype])

    @property
    def where(self) -> str:
        """What was checked, for messages: ``tp=8 fp8 (vLLM / SGLang, ...)`` or ``tp=8 fp8 in vLLM (...)``."""
        from lightning_slimmoe.engines import ENGINE_NAMES

        tp = f"tp={self.tp} " if self.tp is not None else ""
        if self.engine:
            return f"{tp}{self.dtype} in {ENGINE_NAMES[self.engine]} (its support table, lightning_slimmoe/engines.py)"
        return f"{tp}{self.dtype} (vLLM / SGLang, {DOC})"

    def to_json(self) -> dict:
        return {"ok": self.ok, "problems": list(self.problems), "nearest": {k: dict(v) for k, v in self.nearest.items()}}


def width_multiple(tp: int, dtype: str) -> int:
    """What a width must be a multiple of to serve: ``tp`` (bf16: an integer per rank) or ``tp * 128`` (fp8)."""
    return tp * FP8_BLOCK if dtype == "fp8" else tp


def nearest_widths(width: int, multiple: int, limit: int | None = None, alignment: int = 1) -> dict:
    """The largest serving width <= ``width`` and the smallest >= it (None where there is none: 0 is not a width,
    and nothing above ``limit``, the teacher's width). Widths are multiples of ``lcm(multiple, alignment)``:
    what serves and what the slicer can make (``alignment``: 8 for routed experts, ``slimming.py``)."""
    step = math.lcm(multiple, alignment)
    below = width // step * step
    above = -(-width // step) * step
    return {"width": width, "multiple": multiple, "below": below or None,
            "above": above if limit is None or above <= limit else None, "limit": limit, "round_to": step}


def _widths(config, field_name: str) -> list[int]:
    """The distinct values of a width field (a per-layer list counts as several)."""
    raw = getattr(config, field_name)
    values = raw if isinstance(raw, (list, tuple)) else [raw]
    return sorted({int(v) for v in values})


def check_serving(config, tp: int, dtype: str = "bf16", reference=None) -> ServingCheck:
    """Whether a model of ``config`` serves at tensor-parallel size ``tp`` with ``dtype`` (``bf16`` | ``fp8``).

    ``reference`` (the teacher's config) bounds the proposed widths from above; without it they are unbounded."""
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise ValueError(f"tp={tp!r}: must be an int >= 1")
    if dtype not in SERVING_DTYPES:
        raise ValueError(f"dtype={dtype!r}: must be one of {list(SERVING_DTYPES)}")
    family = get_family(config)
    check = ServingCheck(tp=tp, dtype=dtype)
    multiple = width_multiple(tp, dtype)
    rule = (f"per rank, not a multiple of {FP8_BLOCK} (block-FP8 needs width % {multiple} == 0)" if dtype == "fp8"
            else f"per rank, not an integer (needs width % {tp} == 0)")

    fields = [("expert_width", family.width_field, EXPERT_WIDTH_ALIGNMENT,
               lambda c: family.expert_width(c))]
    if family.shared_expert_width_field:
        fields.append(("shared_expert_width", family.shared_expert_width_field, 1,
                       lambda c: family.shared_expert_width(c)))
    for name, field_name, alignment, read in fields:
        widths = _widths(config, field_name)
        if len(widths) > 1:
            check.problems.append(f"{name}: {widths} differ across MoE layers; fused-MoE kernels need one uniform "
                                  f"width ({field_name})")
        limit = None
        if reference is not None:
            limit = max(_widths(reference, field_name))
        for width in widths if len(widths) > 1 else [read(config)]:
            if width % multiple:
                check.problems.append(f"{name}={width}: {width}/{tp} = {width / tp:g} {rule}")
                check.nearest.setdefault(name, nearest_widths(width, multiple, limit, alignment))

    heads = int(config.num_attention_heads)
    kv = int(getattr(config, "num_key_value_heads", None) or heads)
    if heads % tp:
        check.problems.append(f"num_attention_heads={heads} is not divisible by tp={tp}")
    if tp % kv and kv % tp:
        check.problems.append(f"num_key_value_heads={kv} neither divides tp={tp} nor is divisible by it "
                              "(keep GQA group counts powers of two)")
    if family.model_type == "phimoe" and int(config.num_experts_per_tok) != 2:
        check.problems.append(f"num_experts_per_tok={config.num_experts_per_tok}: PhiMoE in vLLM / SGLang asserts "
                              "top-2 routing")
    check.ok = not check.problems
    return check


def check_engine(config, engine: str, tp: int | None = None, dtype: str = "bf16", reference=None) -> ServingCheck:
    """Whether ``engine`` (vllm | sglang | llamacpp) serves a model of ``config``, pruned from ``reference`` (the
    teacher's config), at ``tp`` in ``dtype``: the engine's support table and dtype rules (engines.py), and for vLLM /
    SGLang the width and head rules of :func:`check_serving` at ``tp`` (1 when not given)."""
    from lightning_slimmoe.engines import ALL_DTYPES, ENGINES, engine_problems

    if engine not in ENGINES:
        raise ValueError(f"engine={engine!r}: must be one of {list(ENGINES)}")
    if dtype not in ALL_DTYPES:
        raise ValueError(f"dtype={dtype!r}: must be one of {list(ALL_DTYPES)}")
    check = ServingCheck(tp=tp, dtype=dtype, engine=engine)
    check.problems = engine_problems(engine, config, reference if reference is not None else config, dtype)
    if engine in ("vllm", "sglang"):
        widths = check_serving(config, tp or 1, dtype if dtype in SERVING_DTYPES else "bf16", reference=reference)
        check.problems += widths.problems
        check.nearest = widths.nearest
    check.ok = not check.problems
    return check


def _nearest_line(name: str, near: dict) -> str:
    below = (f"below none (no positive multiple of {near['round_to']} <= {near['width']})" if near["below"] is None
             else f"below {near['below']}")
    if near["above"] is not None:
        above = f"above {near['above']}"
    else:
        above = f"above none (the next multiple of {near['round_to']} exceeds the teacher's {near['limit']})"
    return f"{name} {near['width']} -> nearest serving widths: {below}, {above} (recipe: round_to: {near['round_to']})"


def format_serving(name: str, check: ServingCheck) -> list[str]:
    """Report lines of one stage: nothing when it serves, else each problem and the nearest serving widths."""
    if check.ok:
        return []
    return ([f"  {name}: {p}" for p in check.problems]
            + [f"  {name}: {_nearest_line(field_name, near)}" for field_name, near in check.nearest.items()])


def final_stage_message(name: str, check: ServingCheck) -> str:
    """The whole message for a final stage that does not serve (warning or error)."""
    return "\n".join([f"serving: the final stage {name!r} cannot be served at {check.where}:",
                      *format_serving(name, check)])


def enforce_serving(serving, stage_name: str, final_config, teacher_config) -> ServingCheck | None:
    """``serving`` (a :class:`~lightning_slimmoe.config.ServingConfig`): with ``engine`` or ``tp`` set, check the final
    stage's config; if it does not serve, ``rank_zero_warn`` (or raise :class:`ConfigError` with ``strict``)."""
    check = stage_check(serving, final_config, teacher_config)
    if check is None:
        return None
    if not check.ok:
        message = final_stage_message(stage_name, check)
        if serving.strict:
            raise ConfigError(message + "\n(serving.strict: true; set it false to only warn)")
        rank_zero_warn(message)
    return check


def stage_check(serving, config, teacher_config) -> ServingCheck | None:
    """The check ``serving`` asks for, of one stage's ``config``: the engine's (``serving.engine``), else the generic
    vLLM / SGLang rules at ``serving.tp``; None when neither is set."""
    if serving.engine is not None:
        return check_engine(config, serving.engine, serving.tp, serving.dtype, reference=teacher_config)
    if serving.tp is None:
        return None
    return check_serving(config, serving.tp, serving.dtype, reference=teacher_config)
