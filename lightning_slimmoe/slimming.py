"""Physical slimming: targets -> keep indices -> smaller tensors and a matching config.

SlimMoE (paper §3) keeps every expert and cuts each expert's GLU width; attention loses whole GQA
groups (one KV head and the query heads that share it). Widths stay uniform across layers and experts
so that the result is again a stock transformers model (and vLLM) with ``intermediate_size`` and an
explicit ``head_dim``. Slicing is physical (gathered tensors, new ``nn.Parameter``s), never a mask.

Shapes: E experts, I expert width, W kept width, H hidden, G KV groups, R query heads per group,
D head_dim.
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import Tensor, nn

from lightning_slimmoe.families import MoEFamily, get_family, head_dim, language_config


# ---------------------------------------------------------------------------------------------------
# Uniform view of expert weights (written once for every family)
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ExpertLayout:
    """How a fused-experts module stores its GLU, as transformers declares it on the module
    (``@use_experts_implementation``: ``is_transposed``, ``is_concatenated``, ``has_bias``, ``has_gate``)."""

    transposed: bool = False  # gate_up_proj [E, H, 2I], down_proj [E, I, H] (else [E, 2I, H], [E, H, I])
    interleaved: bool = False  # gate/up columns alternate (gate ::2, up 1::2); else gate block then up block
    has_bias: bool = False  # gate_up_proj_bias [E, 2I] (per neuron) and down_proj_bias [E, H] (per expert)
    # Llama-4: the routing weight scales each expert's *input* (every token runs through every expert, unrouted ones
    # with weight sigmoid(-inf) = 0), and the experts' forward takes only that scaled input ``(E * N, H)``.
    input_scaled: bool = False


def interleaved_columns(keep_EW: Tensor) -> Tensor:
    """``(E, 2W)`` positions along an interleaved gate/up axis of the kept neurons: neuron i owns 2i (gate) and 2i+1
    (up), so the kept pairs stay interleaved, in the kept order."""
    return torch.stack([2 * keep_EW, 2 * keep_EW + 1], dim=-1).reshape(keep_EW.shape[0], -1)


# The fused layouts that are sliced; any other declared layout is refused (docs/families-2026.md, gap 8).
STD_LAYOUT = ExpertLayout()  # gate_up_proj [E, 2I, H] (gate rows, then up rows), down_proj [E, H, I], no biases
GPT_OSS_LAYOUT = ExpertLayout(transposed=True, interleaved=True, has_bias=True)  # gpt-oss
# Llama-4: gate_up_proj [E, H, 2I] (gate columns, then up columns: ``chunk(2, -1)``), down_proj [E, I, H], no biases
LLAMA4_LAYOUT = ExpertLayout(transposed=True, input_scaled=True)
_DECLARED = {STD_LAYOUT: {"is_transposed": False, "is_concatenated": True, "has_bias": False, "has_gate": True},
             GPT_OSS_LAYOUT: {"is_transposed": True, "is_concatenated": False, "has_bias": True, "has_gate": True}}
# Experts classes transformers leaves undecorated although their layout is not the default one: transformers 5.23's
# Llama4TextExperts runs its own bmm forward over the transposed, concatenated layout and declares no markers, so
# reading it as STD would cut the wrong rows silently.
_UNDECLARED = {"Llama4TextExperts": LLAMA4_LAYOUT}


def check_expert_layout(experts: nn.Module) -> ExpertLayout:
    """The layout of a fused-experts module, read from the markers transformers sets on it: STD (``gate_up_proj
    [E, 2I, H]`` gate rows then up rows, ``down_proj [E, H, I]``, no biases) or gpt-oss's (``gate_up_proj [E, H, 2I]``
    with gate/up interleaved, ``down_proj [E, I, H]``, both with biases). Any other declared layout (Aria's
    transposed but concatenated ``[E, H, 2I]``, a transposed layout without biases, ...) is refused: slicing it as
    one of these would cut the wrong rows silently (docs/families-2026.md, gap 8). Llama-4's undecorated experts
    (``gate_up_proj [E, H, 2I]`` gate columns then up columns, ``down_proj [E, I, H]``) are known by class."""
    declared = {k: getattr(experts, k) for k in ("is_transposed", "is_concatenated", "has_bias", "has_gate")
                if hasattr(experts, k)}
    if not declared:
        return _UNDECLARED.get(type(experts).__name__, STD_LAYOUT)  # an undecorated module: transformers' defaults
    for layout, markers in _DECLARED.items():
        if declared == markers:
            return layout
    raise NotImplementedError(f"{type(experts).__name__}: fused experts in layout {declared} are not supported "
                              "(only gate_up_proj [E, 2I, H] with gate rows then up rows, down_proj [E, H, I], no "
                              "biases; or gpt-oss's gate_up_proj [E, H, 2I] with gate/up interleaved, down_proj "
                              "[E, I, H], with biases)")


def expert_weights(experts: nn.Module) -> tuple[Tensor, Tensor, Tensor]:
    """Views ``gate [E, I, H]``, ``up [E, I, H]``, ``down [E, H, I]`` into the fused parameters (any layout)."""
    layout = check_expert_layout(experts)
    if layout.transposed:
        w_gate_up_EH2I = experts.gate_up_proj
        w_gate_EHI, w_up_EHI = split_gate_up(layout, w_gate_up_EH2I)
        return w_gate_EHI.transpose(1, 2), w_up_EHI.transpose(1, 2), experts.down_proj.transpose(1, 2)
    w_gate_up_E2IH = experts.gate_up_proj
    width = w_gate_up_E2IH.shape[1] // 2
    return w_gate_up_E2IH[:, :width], w_gate_up_E2IH[:, width:], experts.down_proj


def split_gate_up(layout: ExpertLayout, t_X2I: Tensor) -> tuple[Tensor, Tensor]:
    """``(gate, up)`` views of a tensor whose last axis is a transposed layout's fused gate/up axis ``2I``:
    interleaved (gpt-oss: ``::2`` / ``1::2``) or concatenated (Llama-4: first half / second half)."""
    if layout.interleaved:
        return t_X2I[..., ::2], t_X2I[..., 1::2]
    width = t_X2I.shape[-1] // 2
    return t_X2I[..., :width], t_X2I[..., width:]


def routed_tokens(experts: nn.Module, args: tuple) -> Iterator[tuple[int, Tensor, Tensor]]:
    """``(expert, x_MH, weight_M)`` per expert from the experts module's forward arguments: the inputs of the tokens
    routed to it and their routing weights. transformers' kernels take ``(x_NH, top_k_index_NK, top_k_weights_NK)``;
    Llama-4's take only ``(E * N, H)`` inputs already scaled by the routing weight (zero where unrouted), so its
    routed tokens are the non-zero rows, given as they are with weight 1 (the expert sees the scaled input)."""
    if check_expert_layout(experts).input_scaled:
        x_ENH = args[0].reshape(experts.gate_up_proj.shape[0], -1, args[0].shape[-1])
        for e in range(x_ENH.shape[0]):
            routed_N = x_ENH[e].abs().amax(-1) > 0
            if routed_N.any():
                yield e, x_ENH[e][routed_N], torch.ones(int(routed_N.sum()), device=x_ENH.device)
        return
    x_NH, top_k_index_NK, top_k_weights_NK = args[0], args[1], args[2]
    for e in range(experts.gate_up_proj.shape[0]):
        token, slot = torch.where(top_k_index_NK == e)
        if token.numel():
            yield e, x_NH[token], top_k_weights_NK[token, slot]


def expert_biases(experts: nn.Module) -> tuple[Tensor, Tensor, Tensor] | None:
    """Views ``gate [E, I]``, ``up [E, I]``, ``down [E, H]`` into the expert biases, None for a layout without."""
    layout = check_expert_layout(experts)
    if not layout.has_bias:
        return None
    b_gate_up_E2I = experts.gate_up_proj_bias
    return b_gate_up_E2I[:, ::2], b_gate_up_E2I[:, 1::2], experts.down_proj_bias


def expert_activations(experts: nn.Module, x_NH: Tensor, expert: int) -> Tensor:
    """The GLU output ``(N, I)`` of one expert for tokens ``x_NH``: the input of its down projection. STD:
    ``act(gate x) * (up x)``; gpt-oss: the module's own gate function (``_apply_gate``: the clamped
    ``(up + 1) * gate * sigmoid(alpha * gate)``) on its interleaved projection, biases included. For calibration and
    reference code only (the training path stays on transformers' kernels)."""
    layout = check_expert_layout(experts)
    if not layout.has_bias:  # STD and Llama-4: a plain GLU
        w_gate_EIH, w_up_EIH, _ = expert_weights(experts)
        return experts.act_fn(x_NH @ w_gate_EIH[expert].T) * (x_NH @ w_up_EIH[expert].T)
    gate_up_N2I = x_NH @ experts.gate_up_proj[expert] + experts.gate_up_proj_bias[expert]
    return experts._apply_gate(gate_up_N2I)


def expert_outputs(experts: nn.Module, x_NH: Tensor, expert: int) -> Tensor:
    """One expert's output ``(N, H)`` for tokens ``x_NH`` (down projection, and its bias where the layout has one)."""
    layout = check_expert_layout(experts)
    a_NI = expert_activations(experts, x_NH, expert)
    y_NH = a_NI @ expert_weights(experts)[2][expert].T
    return y_NH + experts.down_proj_bias[expert] if layout.has_bias else y_NH


def shared_expert_is_fused(mlp: nn.Module) -> bool:
    """Granite's shared MLP: one ``input_linear [2I, H]`` (gate rows, then up rows: ``chunk(2)`` in its forward) and
    ``output_linear [H, I]``, where every other family has ``gate_proj`` / ``up_proj`` / ``down_proj``."""
    return hasattr(mlp, "input_linear")


def shared_expert_weights(mlp: nn.Module) -> tuple[Tensor, Tensor, Tensor]:
    """The shared dense expert as ``gate [I, H]``, ``up [I, H]``, ``down [H, I]`` (views into Granite's fused
    ``input_linear``: a gradient is on the parameter, not on them; see :func:`shared_expert_parameters`)."""
    if shared_expert_is_fused(mlp):
        w_gate_up_2IH = mlp.input_linear.weight
        width = w_gate_up_2IH.shape[0] // 2
        return w_gate_up_2IH[:width], w_gate_up_2IH[width:], mlp.output_linear.weight
    return mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight


def shared_expert_parameters(mlp: nn.Module) -> list[nn.Parameter]:
    """The shared expert's weight parameters, as stored: ``[gate, up, down]`` or Granite's ``[input, output]``."""
    if shared_expert_is_fused(mlp):
        return [mlp.input_linear.weight, mlp.output_linear.weight]
    return [mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight]


def shared_expert_down(mlp: nn.Module) -> nn.Linear:
    """The shared expert's down projection (its input is the neurons' activations)."""
    return mlp.output_linear if shared_expert_is_fused(mlp) else mlp.down_proj


# ---------------------------------------------------------------------------------------------------
# Targets
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SlimTarget:
    """Resolved absolute widths of one stage (uniform over layers and experts)."""

    expert_width: int
    attention_groups: int
    shared_expert_width: int | None = None


# transformers' default expert kernel (torch grouped_mm, CPU and CUDA) needs 16-byte aligned strides:
# an expert width that is a multiple of 8 works in bf16 and fp32 alike.
EXPERT_WIDTH_ALIGNMENT = 8


def _resolve_width(name: str, value: int | float | None, current: int, reference: int, round_to: int | None,
                   alignment: int = 1) -> int:
    """An absolute int, or a fraction in (0, 1] of the reference (original teacher) width.

    Fractions are rounded down to a multiple of ``round_to`` (or of ``alignment``); absolute ints must
    already be such a multiple, unless they keep the current width.
    """
    if value is None:
        return current
    multiple = round_to or alignment
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name}={value!r}: must be a positive int (absolute width) or a float in (0, 1] (fraction)")
    if isinstance(value, float):
        if not 0.0 < value <= 1.0:
            raise ValueError(f"{name}={value}: a fraction must lie in (0, 1] (of the teacher's width {reference})")
        width = max(multiple, round(value * reference) // multiple * multiple)
    else:
        width = value
        if round_to and width % round_to:
            raise ValueError(f"{name}={width}: must be a multiple of round_to={round_to}")
    if width <= 0:
        raise ValueError(f"{name}={width}: must be > 0")
    if width > current:
        raise ValueError(
            f"{name}={value} resolves to width {width}, larger than the current width {current}: "
            f"a stage can only shrink (0 < {name} <= {current})"
        )
    if width != current and width % multiple:
        raise ValueError(f"{name}={width}: must be a multiple of {multiple} (grouped_mm expert kernels need "
                         "16-byte aligned rows)")
    return width


def resolve_target(
    config,
    *,
    expert_width: int | float | None = None,
    attention_groups: int | None = None,
    shared_expert_width: int | float | None = None,
    round_to: int | None = None,
    reference_config=None,
) -> SlimTarget:
    """Validate a stage's targets against the incoming model's config; fractions are of the reference.

    Every bad value fails here, before any weight is loaded, naming the field, the value and the rule.
    """
    family = get_family(config)
    config = language_config(config)
    reference = language_config(reference_config) if reference_config is not None else config
    if round_to is not None and (isinstance(round_to, bool) or not isinstance(round_to, int) or round_to <= 0):
        raise ValueError(f"round_to={round_to!r}: must be a positive int (e.g. 64) or null")
    width = _resolve_width("expert_width", expert_width, family.expert_width(config),
                           family.expert_width(reference), round_to, EXPERT_WIDTH_ALIGNMENT)
    shared = None
    if family.shared_expert_width_field and family.shared_expert_width(config) is not None:
        shared = _resolve_width("shared_expert_width", shared_expert_width, family.shared_expert_width(config),
                                family.shared_expert_width(reference), round_to)
    elif family.shared_width_follows_routed() and shared_expert_width is not None:
        raise ValueError(f"shared_expert_width={shared_expert_width!r}: model_type {family.model_type!r} builds its "
                         f"shared experts with width {family.tied_width_name()}, so "
                         "their width follows expert_width; leave shared_expert_width unset")
    elif family.shared_width_follows_routed():
        shared = family.shared_expert_width(_with_field(config, family.width_field, width))
    elif shared_expert_width is not None:
        raise ValueError(f"shared_expert_width={shared_expert_width!r}: model_type {family.model_type!r} "
                         "has no shared expert")

    groups_now = int(config.num_key_value_heads)
    groups = groups_now if attention_groups is None else attention_groups
    if attention_groups is not None:
        if isinstance(groups, bool) or not isinstance(groups, int) or groups <= 0:
            raise ValueError(f"attention_groups={attention_groups!r}: must be a positive int (KV groups per layer)")
        if groups > groups_now:
            raise ValueError(f"attention_groups={groups}: exceeds the current {groups_now} KV groups per layer "
                             f"(0 < attention_groups <= {groups_now})")
        if groups_now % groups:
            raise ValueError(f"attention_groups={groups}: must divide the current {groups_now} KV groups per layer")
        if groups != groups_now and not family.attention_prunable:
            raise ValueError(f"attention_groups={groups}: not supported for model_type "
                             f"{family.model_type!r}: {family.attention_not_prunable_reason}")
    return SlimTarget(expert_width=width, attention_groups=groups, shared_expert_width=shared)


def _with_field(config, name: str, value):
    new = copy.deepcopy(config)
    setattr(new, name, value)
    return new


def widths_of(config) -> dict:
    """The widths slimming changes, as ``meta.json``, ``summary.json`` and ``plan`` report them."""
    family = get_family(config)
    config = language_config(config)
    return {
        "expert_width": family.expert_width(config),
        "shared_expert_width": family.shared_expert_width(config),
        "num_experts": family.num_experts(config),
        "num_attention_heads": int(config.num_attention_heads),
        "num_key_value_heads": int(config.num_key_value_heads),
        "head_dim": head_dim(config),
    }


def slim_config(config, target: SlimTarget):
    """A copy of ``config`` describing the model after slimming to ``target`` (no weights touched).

    ``head_dim`` is written explicitly: after group pruning ``num_heads * head_dim != hidden_size``
    (the SlimMoE authors had to add ``head_dim`` support to vLLM for exactly this). A multimodal wrapper's config
    gives its slimmed ``text_config``: the text-only causal LM is what is slimmed and exported.
    """
    family = get_family(config)
    config = language_config(config)
    new = copy.deepcopy(config)
    setattr(new, family.width_field, target.expert_width)
    if family.shared_expert_width_field and target.shared_expert_width is not None:
        setattr(new, family.shared_expert_width_field, target.shared_expert_width)
    if family.mtp_layers_field and getattr(new, family.mtp_layers_field, None):
        # The slimmed model has no multi-token-prediction layers (never read, slimmed nor exported): a config still
        # counting them would send serving engines (vLLM's MTP speculative decoding) looking for weights it lacks.
        setattr(new, family.mtp_layers_field, 0)
    if family.attention_prunable:  # others keep their attention fields as they are (an MLA config's `head_dim`
        dim = head_dim(config)      # can be an alias of its rope dim: writing it is not a no-op there)
        heads_per_group = config.num_attention_heads // config.num_key_value_heads
        new.num_key_value_heads = target.attention_groups
        new.num_attention_heads = target.attention_groups * heads_per_group
        new.head_dim = dim
    return new


# ---------------------------------------------------------------------------------------------------
# Keep indices
# ---------------------------------------------------------------------------------------------------
@dataclass
class KeepIndices:
    """What survives a slim: per layer, sorted indices (so keep-all is the identity)."""

    experts: dict[int, Tensor] = field(default_factory=dict)  # layer -> (E, W) neuron ids per expert
    shared: dict[int, Tensor] = field(default_factory=dict)  # layer -> (W_shared,)
    groups: dict[int, Tensor] = field(default_factory=dict)  # layer -> (G_kept,) KV group ids

    def digest(self) -> str:
        """sha256 over every kept index, in a fixed order: the ``kept_index_hash`` of meta.json."""
        h = hashlib.sha256()
        for kind, table in (("experts", self.experts), ("shared", self.shared), ("groups", self.groups)):
            for layer in sorted(table):
                h.update(f"{kind}:{layer}:{tuple(table[layer].shape)}".encode())
                h.update(table[layer].to(torch.int64).contiguous().cpu().numpy().tobytes())
        return h.hexdigest()

    def to_dict(self) -> dict:
        return {kind: {str(k): v.cpu() for k, v in getattr(self, kind).items()} for kind in ("experts", "shared", "groups")}

    @classmethod
    def from_dict(cls, data: dict) -> "KeepIndices":
        return cls(**{kind: {int(k): v for k, v in data.get(kind, {}).items()} for kind in ("experts", "shared", "groups")})


def _top_sorted(scores: Tensor, k: int) -> Tensor:
    """Indices of the k largest scores along the last dim, in ascending index order."""
    return scores.topk(k, dim=-1).indices.sort(dim=-1).values


def select_keep(scores, target: SlimTarget) -> KeepIndices:
    """Rank within each expert (each keeps its own best W neurons) and within each layer (GQA groups)."""
    keep = KeepIndices()
    for layer, s_EI in scores.experts.items():
        keep.experts[layer] = _top_sorted(s_EI.float(), target.expert_width)  # (E, W)
    if target.shared_expert_width is not None:
        for layer, s_I in scores.shared.items():
            keep.shared[layer] = _top_sorted(s_I.float(), target.shared_expert_width)
    for layer, s_G in scores.groups.items():
        keep.groups[layer] = _top_sorted(s_G.float(), target.attention_groups)
    return keep


# ---------------------------------------------------------------------------------------------------
# Physical slicing
# ---------------------------------------------------------------------------------------------------
def _new_param(like: nn.Parameter, data: Tensor) -> nn.Parameter:
    return nn.Parameter(data.contiguous(), requires_grad=like.requires_grad)


@torch.no_grad()
def slice_experts_(experts: nn.Module, keep_EW: Tensor) -> None:
    """Gather each expert's kept neurons: gate and up rows with the same ids, down columns likewise (in gpt-oss's
    transposed, interleaved layout: the neurons' gate/up column pairs and their biases, and down rows)."""
    layout = check_expert_layout(experts)
    w_gate_EIH, w_up_EIH, w_down_EHI = expert_weights(experts)
    num_experts, _, hidden = w_gate_EIH.shape
    if keep_EW.shape[0] != num_experts:
        raise ValueError(f"keep indices for {keep_EW.shape[0]} experts, model has {num_experts}")
    if layout.transposed:  # gpt-oss (interleaved) and Llama-4 (gate columns, then up columns)
        cols_E2W = fused_columns(layout, keep_EW.to(experts.gate_up_proj.device), w_gate_EIH.shape[1])
        w_gate_up_EH2W = experts.gate_up_proj.gather(2, cols_E2W[:, None, :].expand(-1, hidden, -1))
        rows_EWH = keep_EW.to(experts.down_proj.device)[:, :, None].expand(-1, -1, hidden)
        experts.gate_up_proj = _new_param(experts.gate_up_proj, w_gate_up_EH2W)
        experts.down_proj = _new_param(experts.down_proj, experts.down_proj.gather(1, rows_EWH))
        if layout.has_bias:  # down_proj_bias [E, H] is per expert, not per neuron: it stays
            bias = experts.gate_up_proj_bias
            experts.gate_up_proj_bias = _new_param(bias, bias.gather(1, cols_E2W.to(bias.device)))
    else:
        idx_EWH = keep_EW.to(w_gate_EIH.device)[:, :, None].expand(-1, -1, hidden)
        idx_EHW = keep_EW.to(w_down_EHI.device)[:, None, :].expand(-1, hidden, -1)
        w_gate_up_E2WH = torch.cat([w_gate_EIH.gather(1, idx_EWH), w_up_EIH.gather(1, idx_EWH)], dim=1)
        experts.gate_up_proj = _new_param(experts.gate_up_proj, w_gate_up_E2WH)
        experts.down_proj = _new_param(experts.down_proj, w_down_EHI.gather(2, idx_EHW))
    experts.intermediate_dim = keep_EW.shape[1]
    for attr in ("intermediate_size", "expert_dim"):  # gpt-oss / Llama-4 name the width so
        if hasattr(experts, attr):
            setattr(experts, attr, keep_EW.shape[1])


def concatenated_gate_up(keep_W: Tensor, width: int) -> Tensor:
    """``(..., 2W)`` positions of the kept neurons ``keep_W (..., W)`` along a fused gate/up axis of ``2 * width``
    that holds every gate, then every up (Llama-4's experts, Granite's shared ``input_linear``): the kept gate
    positions, then the same neurons' up positions."""
    return torch.cat([keep_W, keep_W + width], dim=-1)


def fused_columns(layout: ExpertLayout, keep_EW: Tensor, width: int) -> Tensor:
    """``(E, 2W)`` positions along a transposed layout's fused gate/up axis (of ``2 * width``) of the kept neurons:
    interleaved pairs (gpt-oss), or the kept gate columns then the same neurons' up columns (Llama-4)."""
    if layout.interleaved:
        return interleaved_columns(keep_EW)
    return concatenated_gate_up(keep_EW, width)


def _slice_linear_(linear: nn.Linear, index: Tensor, dim: int) -> None:
    index = index.to(linear.weight.device)
    linear.weight = _new_param(linear.weight, linear.weight.index_select(dim, index))
    if dim == 0:
        if linear.bias is not None:
            linear.bias = _new_param(linear.bias, linear.bias.index_select(0, index))
        linear.out_features = index.numel()
    else:
        linear.in_features = index.numel()


@torch.no_grad()
def slice_shared_expert_(mlp: nn.Module, keep_W: Tensor) -> None:
    if shared_expert_is_fused(mlp):  # Granite: the kept gate rows and the same neurons' up rows, I rows below
        _slice_linear_(mlp.input_linear, concatenated_gate_up(keep_W, mlp.input_linear.out_features // 2), 0)
        _slice_linear_(mlp.output_linear, keep_W, 1)
        mlp.hidden_size = keep_W.numel()  # GraniteMoeSharedMLP's name for its width
        return
    _slice_linear_(mlp.gate_proj, keep_W, 0)
    _slice_linear_(mlp.up_proj, keep_W, 0)
    _slice_linear_(mlp.down_proj, keep_W, 1)
    mlp.intermediate_size = keep_W.numel()


def group_rows(groups: Tensor, rows_per_group: int) -> Tensor:
    """Row ids of whole groups: group g owns rows [g*rows_per_group, (g+1)*rows_per_group)."""
    return (groups[:, None] * rows_per_group + torch.arange(rows_per_group, device=groups.device)).reshape(-1)


@torch.no_grad()
def slice_attention_groups_(attn: nn.Module, keep_G: Tensor, heads_per_group: int, dim: int,
                            q_rows_per_head: int = 1) -> None:
    """Keep whole GQA groups: q rows (+bias) of the group's query heads (``q_rows_per_head`` x ``dim`` rows per
    head: 2 where q_proj holds a query and an output gate per head), k/v rows (+bias) of its KV head, the matching
    o_proj input columns, and the query heads' attention ``sinks`` (gpt-oss). Per-head q/k norms (Qwen3) act on
    ``head_dim`` and stay."""
    q_rows = group_rows(keep_G, heads_per_group * dim * q_rows_per_head)
    o_cols = group_rows(keep_G, heads_per_group * dim)
    kv_rows = group_rows(keep_G, dim)
    _slice_linear_(attn.q_proj, q_rows, 0)
    _slice_linear_(attn.k_proj, kv_rows, 0)
    _slice_linear_(attn.v_proj, kv_rows, 0)
    _slice_linear_(attn.o_proj, o_cols, 1)
    sinks = getattr(attn, "sinks", None)
    if sinks is not None:  # gpt-oss: one learned attention sink per query head goes with its head
        heads = group_rows(keep_G.to(sinks.device), heads_per_group)
        attn.sinks = _new_param(sinks, sinks.index_select(0, heads))
    attn.head_dim = dim
    attn.num_key_value_groups = heads_per_group


def keep_target(keep: KeepIndices, config) -> SlimTarget:
    """The uniform widths ``keep`` gives a model of ``config`` (what ``slim_model_`` writes into the config)."""
    family = get_family(config)
    config = language_config(config)
    widths = {int(k.shape[1]) for k in keep.experts.values()}
    groups = {int(k.numel()) for k in keep.groups.values()}
    shared = {int(k.numel()) for k in keep.shared.values()}
    if len(widths) > 1 or len(groups) > 1 or len(shared) > 1:
        raise ValueError("SlimMoE widths are uniform across layers; got per-layer widths "
                         f"experts={sorted(widths)} shared={sorted(shared)} groups={sorted(groups)}")
    width = widths.pop() if widths else family.expert_width(config)
    target = SlimTarget(expert_width=width, attention_groups=groups.pop() if groups else int(config.num_key_value_heads),
                        shared_expert_width=shared.pop() if shared else family.shared_expert_width(config))
    if family.shared_width_follows_routed() and target.shared_expert_width is not None:
        tied = family.shared_expert_width(_with_field(config, family.width_field, width))
        if target.shared_expert_width != tied:
            raise ValueError(f"{family.model_type}: shared experts keep {target.shared_expert_width} neurons, but their "
                             f"width is tied to {family.tied_width_name()} = {tied}")
    return target


def slim_model_(model: nn.Module, keep: KeepIndices) -> nn.Module:
    """Slice ``model`` in place to ``keep`` and rewrite its config (shared by every module)."""
    family = get_family(model)
    config = model.config
    target = keep_target(keep, config)  # before slicing: a non-uniform keep fails with nothing changed
    for layer, block in family.moe_blocks(model):
        if layer in keep.experts:
            slice_experts_(block.experts, keep.experts[layer])
            if hasattr(block, "ffn_dim"):
                block.ffn_dim = block.experts.intermediate_dim
    for layer, shared in family.shared_experts(model):
        if layer in keep.shared:
            slice_shared_expert_(shared, keep.shared[layer])
    dim = head_dim(config)
    heads_per_group = config.num_attention_heads // config.num_key_value_heads
    if keep.groups and target.attention_groups != config.num_key_value_heads and not family.attention_prunable:
        raise ValueError(f"attention pruning is not supported for {family.model_type}: "
                         f"{family.attention_not_prunable_reason}")
    for layer, attn in family.attention_modules(model):
        if layer in keep.groups:
            slice_attention_groups_(attn, keep.groups[layer], heads_per_group, dim, family.q_rows_per_head)
    new_config = slim_config(config, target)
    attention = ("num_attention_heads", "num_key_value_heads", "head_dim") if family.attention_prunable else ()
    for key in (family.width_field, family.shared_expert_width_field, family.mtp_layers_field, *attention):
        if key and hasattr(new_config, key):
            setattr(config, key, getattr(new_config, key))
    return model


# ---------------------------------------------------------------------------------------------------
# Expert removal (the baseline SlimMoE argues against, paper §1 / REAP)
# ---------------------------------------------------------------------------------------------------
@torch.no_grad()
def kept_expert_count(keep_experts: dict[int, Tensor]) -> int:
    """The one number of experts every layer keeps (expert removal keeps the same count in every layer)."""
    counts = {int(k.numel()) for k in keep_experts.values()}
    if len(counts) != 1:
        raise ValueError(f"expert counts must be uniform across layers, got {sorted(counts)}")
    return counts.pop()


def check_expert_count(config, num_experts: int) -> None:
    """Expert removal must leave at least ``top_k`` experts and, with group-limited routing, a count that divides
    into its ``n_group`` groups."""
    family = get_family(config)
    top_k = int(language_config(config).num_experts_per_tok)
    if num_experts < top_k:
        raise ValueError(f"num_experts={num_experts}: must be >= num_experts_per_tok={top_k}")
    groups = family.expert_groups(config)
    if num_experts % groups:
        raise ValueError(f"num_experts={num_experts}: must be divisible by {family.expert_group_field}={groups} "
                         "(group-limited routing splits the experts into equal groups)")
    if groups > 1 and num_experts // groups < family.min_experts_per_group:
        raise ValueError(f"num_experts={num_experts}: {family.model_type} scores each of its {groups} expert groups by "
                         f"the sum of its top-{family.min_experts_per_group} experts, so it needs at least "
                         f"{family.min_experts_per_group * groups} experts")


def with_num_experts(config, num_experts: int):
    """A copy of ``config`` (a wrapper's: of its ``text_config``) with ``num_experts`` routed experts per layer (no
    weights touched)."""
    new = copy.deepcopy(language_config(config))
    setattr(new, get_family(config).num_experts_field, num_experts)
    return new


def remove_experts_(model: nn.Module, keep_experts: dict[int, Tensor]) -> nn.Module:
    """Drop whole experts: slice the fused expert tensors and the router rows, update ``num_experts``."""
    family: MoEFamily = get_family(model)
    kept = kept_expert_count(keep_experts)
    check_expert_count(model.config, kept)
    for layer, block in family.moe_blocks(model):
        idx = keep_experts[layer].sort().values
        experts = block.experts
        experts.gate_up_proj = _new_param(experts.gate_up_proj, experts.gate_up_proj[idx.to(experts.gate_up_proj.device)])
        experts.down_proj = _new_param(experts.down_proj, experts.down_proj[idx.to(experts.down_proj.device)])
        if check_expert_layout(experts).has_bias:  # gpt-oss: both expert biases are indexed by expert
            for attr in ("gate_up_proj_bias", "down_proj_bias"):
                bias = getattr(experts, attr)
                setattr(experts, attr, _new_param(bias, bias[idx.to(bias.device)]))
        for name, dim in family.expert_indexed_tensors():  # router weight / bias, score-correction biases
            owner_name, _, attr = name.rpartition(".")
            owner = block.get_submodule(owner_name) if owner_name else block
            tensor = getattr(owner, attr, None)
            if tensor is None:
                continue
            sliced = tensor.index_select(dim, idx.to(tensor.device))
            setattr(owner, attr, _new_param(tensor, sliced) if isinstance(tensor, nn.Parameter) else sliced)
        router = family.router(block)
        for module in (experts, router, block):
            for attr in ("num_experts", "n_routed_experts"):
                if hasattr(module, attr):
                    setattr(module, attr, kept)
        if isinstance(router, nn.Linear):
            router.out_features = kept
    setattr(model.config, family.num_experts_field, kept)
    return model
