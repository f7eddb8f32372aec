"""Importance criteria: which expert neurons and GQA groups to keep.

* ``kd_taylor`` — the paper's (§2, inferred formula): first-order sensitivity ``|θ ⊙ ∂L_KD/∂θ|`` of the
  top-k KD loss against the teacher, summed over all weights of a structure (a neuron: its gate row,
  up row and down column; a GQA group: its q/k/v rows, biases and o_proj columns), accumulated over
  calibration batches (``|·|`` taken per batch, as in the PLATON/HomoDistil line).
* ``activation`` — Minitron-style: mean ``|act(gate x) * up x|`` per neuron over the tokens routed to the
  expert; mean L2 norm of each group's attention output (the o_proj input) per token.
* ``magnitude`` — L2 norm of the structure's weights. ``random`` — seeded. Both are baselines.
* :func:`expert_saliency` — REAP-style whole-expert saliency for the expert-removal baseline.

Scores are saved with :meth:`ImportanceScores.save` and reloaded (``weights_only``) to redo a prune
without recalibrating; a file from another model or shape is refused.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from lightning_slimmoe.distill import KDConfig, distill_loss, frozen_forward, teacher_topk
from lightning_slimmoe.distributed import local_rows, reshard_head
from lightning_slimmoe.families import MoEFamily, get_family, head_dim
from lightning_slimmoe.slimming import expert_weights, shared_expert_weights
from lightning_slimmoe.storage import atomic_torch_save

CRITERIA = ("kd_taylor", "activation", "magnitude", "random")
SCORES_FORMAT = "lightning_slimmoe.scores/1"


def model_shape(model_or_config) -> dict[str, int]:
    """The shape fingerprint a scores file must match."""
    config = getattr(model_or_config, "config", model_or_config)
    family = get_family(config)
    return {
        "num_hidden_layers": int(config.num_hidden_layers),
        "hidden_size": int(config.hidden_size),
        "num_experts": family.num_experts(config),
        "expert_width": family.expert_width(config),
        "shared_expert_width": family.shared_expert_width(config) or 0,
        "num_attention_heads": int(config.num_attention_heads),
        "num_key_value_heads": int(config.num_key_value_heads),
        "head_dim": head_dim(config),
    }


@dataclass
class ImportanceScores:
    criterion: str
    model_type: str
    shape: dict[str, int]
    experts: dict[int, Tensor] = field(default_factory=dict)  # layer -> (E, I)
    shared: dict[int, Tensor] = field(default_factory=dict)  # layer -> (I_shared,)
    groups: dict[int, Tensor] = field(default_factory=dict)  # layer -> (G,)
    num_tokens: int = 0

    def save(self, path: str) -> None:
        """Atomic write (storage.py): a crash never leaves a half-written scores file."""
        payload = {
            "format": SCORES_FORMAT, "criterion": self.criterion, "model_type": self.model_type,
            "shape": dict(self.shape), "num_tokens": int(self.num_tokens),
            **{kind: {str(k): v.detach().float().cpu() for k, v in getattr(self, kind).items()}
               for kind in ("experts", "shared", "groups")},
        }
        atomic_torch_save(payload, path)

    @classmethod
    def load(cls, path: str, model=None) -> "ImportanceScores":
        if not os.path.isfile(path):
            raise FileNotFoundError(f"scores file not found: {path}")
        payload = torch.load(path, map_location="cpu", weights_only=True)  # never unpickle code
        if not isinstance(payload, dict) or payload.get("format") != SCORES_FORMAT:
            raise ValueError(f"{path} is not a lightning_slimmoe scores file (format {SCORES_FORMAT})")
        scores = cls(
            criterion=payload["criterion"], model_type=payload["model_type"], shape=dict(payload["shape"]),
            num_tokens=int(payload["num_tokens"]),
            **{kind: {int(k): v for k, v in payload[kind].items()} for kind in ("experts", "shared", "groups")},
        )
        if model is not None:
            scores.check_matches(model, source=path)
        return scores

    def check_matches(self, model, source: str = "scores") -> None:
        config = getattr(model, "config", model)
        expected = model_shape(config)
        if self.model_type != config.model_type or self.shape != expected:
            diff = {k: (self.shape.get(k), v) for k, v in expected.items() if self.shape.get(k) != v}
            raise ValueError(
                f"{source} was computed for another model: model_type {self.model_type!r} vs {config.model_type!r}, "
                f"differing shape fields (scores, model): {diff}"
            )

    def summary(self) -> dict[str, Tensor]:
        """Flat tensors per structure kind, for histograms."""
        out = {}
        for kind in ("experts", "shared", "groups"):
            table = getattr(self, kind)
            if table:
                out[kind] = torch.cat([t.float().flatten() for t in table.values()])
        return out


# ---------------------------------------------------------------------------------------------------
# Per-structure reductions of per-element contributions (written once for every criterion)
# ---------------------------------------------------------------------------------------------------
def _attention_tensors(attn: nn.Module) -> list[tuple[str, Tensor]]:
    names = [("q", attn.q_proj.weight), ("k", attn.k_proj.weight), ("v", attn.v_proj.weight), ("o", attn.o_proj.weight)]
    for tag, lin in (("qb", attn.q_proj), ("kb", attn.k_proj), ("vb", attn.v_proj)):
        if lin.bias is not None:
            names.append((tag, lin.bias))
    return names


def _summed(p: Tensor, contrib: Callable[[Tensor], Tensor], dims: tuple[int, ...]) -> Tensor:
    """``contrib(p)`` in fp32, summed over ``dims``: a full-size table on every rank.

    Under FSDP2 ``p`` is a DTensor whose dim-0 rows are spread over the ranks, and so is ``contrib(p)``
    (elementwise). Only the local rows are reduced: when dim 0 survives the sum they are placed at their
    row offset in a zero table (every row has exactly one owner); when dim 0 is summed over (o_proj
    columns, shared-expert down columns) the local sum is a partial sum. :func:`structure_scores` then
    all-reduces its tables once, so every rank ends with the single-process sums (owned rows exactly, the
    partial sums up to summation order) without gathering any parameter (docs/design.md §5).
    """
    c = contrib(p)
    local, start, stop = local_rows(c)
    dims = tuple(d % c.dim() for d in dims)
    local = local.float()
    reduced = local.sum(dims) if dims else local
    if not isinstance(c, DTensor) or 0 in dims:
        return reduced
    full = reduced.new_zeros((c.shape[0], *reduced.shape[1:]))
    full[start:stop] = reduced
    return full


def _group_reduce(attn: nn.Module, contrib: Callable[[Tensor], Tensor], num_groups: int) -> Tensor:
    """Sum a per-element contribution over each GQA group's q/k/v rows (+biases) and o_proj columns."""
    total_G = None
    for tag, p in _attention_tensors(attn):
        if tag == "o":
            per_row = _summed(p, contrib, (0,))  # (nH*D,) o_proj input columns
        elif p.dim() == 2:
            per_row = _summed(p, contrib, (1,))  # (rows,)
        else:
            per_row = _summed(p, contrib, ())
        g_G = per_row.reshape(num_groups, -1).sum(1)
        total_G = g_G if total_G is None else total_G + g_G
    return total_G


def structure_scores(model: nn.Module, contrib: Callable[[Tensor], Tensor]):
    """(experts, shared, groups) dicts of per-structure sums of ``contrib(param)``.

    Collective when the model is FSDP2-sharded: every rank calls it (see :func:`_summed`).
    """
    family = get_family(model)
    experts, shared, groups = {}, {}, {}
    for layer, block in family.moe_blocks(model):
        # contrib on the fused parameter, then split, so grads line up with the view
        gate_up_E2I = _summed(block.experts.gate_up_proj, contrib, (-1,))  # (E, 2I, H) -> (E, 2I): gate, then up
        width = gate_up_E2I.shape[1] // 2
        down_EI = _summed(block.experts.down_proj, contrib, (1,))  # (E, H, I) -> (E, I)
        experts[layer] = gate_up_E2I[:, :width] + gate_up_E2I[:, width:] + down_EI  # (E, I)
        mlp = family.shared_expert(block)
        if mlp is not None:
            g, u, d = shared_expert_weights(mlp)
            shared[layer] = _summed(g, contrib, (-1,)) + _summed(u, contrib, (-1,)) + _summed(d, contrib, (0,))  # (I_shared,)
    num_groups = int(model.config.num_key_value_heads)
    for layer, attn in family.attention_modules(model):
        groups[layer] = _group_reduce(attn, contrib, num_groups)
    _all_reduce_shards_(model, (experts, shared, groups))
    return experts, shared, groups


def _all_reduce_shards_(model: nn.Module, tables: tuple[dict[int, Tensor], ...]) -> None:
    """Sum the per-rank tables of a sharded model (one flat all-reduce over its FSDP mesh); no-op otherwise."""
    sharded = [p for p in scored_parameters(model) if isinstance(p, DTensor)]
    if not sharded:
        return
    mesh = sharded[0].device_mesh
    if mesh.ndim != 1:
        raise NotImplementedError(f"scoring a model sharded on a {mesh.ndim}-D mesh: only FSDP's 1-D mesh is supported")
    entries = [(table, key) for table in tables for key in sorted(table)]
    flat = torch.cat([table[key].reshape(-1) for table, key in entries])
    dist.all_reduce(flat, group=mesh.get_group())
    offset = 0
    for table, key in entries:
        n = table[key].numel()
        table[key] = flat[offset:offset + n].view_as(table[key])
        offset += n


def scored_parameters(model: nn.Module) -> list[nn.Parameter]:
    family = get_family(model)
    params = []
    for _, block in family.moe_blocks(model):
        params += [block.experts.gate_up_proj, block.experts.down_proj]
        mlp = family.shared_expert(block)
        if mlp is not None:
            params += [mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight]
    for _, attn in family.attention_modules(model):
        params += [p for _, p in _attention_tensors(attn)]
    return params


def _accumulate(into: dict[int, Tensor], new: dict[int, Tensor]) -> None:
    for k, v in new.items():
        into[k] = v.detach().clone() if k not in into else into[k] + v.detach()


def _to_device(batch: dict, device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


class _EvalMode:
    """Scoring runs in eval mode (no dropout, no router jitter) and restores the previous mode."""

    def __init__(self, *modules):
        self.modules = [m for m in modules if m is not None]

    def __enter__(self):
        self.modes = [m.training for m in self.modules]
        for m in self.modules:
            m.eval()

    def __exit__(self, *exc):
        for m, mode in zip(self.modules, self.modes):
            m.train(mode)


# ---------------------------------------------------------------------------------------------------
# Criteria
# ---------------------------------------------------------------------------------------------------
def _kd_taylor(student, teacher, batches, kd: KDConfig, progress, counted) -> tuple[dict, dict, dict]:
    if teacher is None:
        raise ValueError("criterion='kd_taylor' needs a teacher (the KD loss is taken against it)")
    kd = replace(kd, lm_weight=0.0)
    scored = scored_parameters(student)
    flags = {p: p.requires_grad for p in student.parameters()}
    for p in student.parameters():
        p.requires_grad_(False)  # only the pruned structures need gradients: saves memory on big models
    for p in scored:
        p.requires_grad_(True)
        p.grad = None
    # Every structure starts at zero, so a rank with no calibration batch still holds (and all-reduces)
    # exactly the same tables as the others.
    with torch.no_grad():
        experts, shared, groups = structure_scores(student, torch.zeros_like)
    device = next(student.parameters()).device
    try:
        for i, batch in enumerate(progress(batches)):
            batch = _to_device(batch, device)
            with frozen_forward(teacher):  # inference_mode; no_grad for a sharded or 8-bit teacher
                t_hidden_NH = teacher.model(input_ids=batch["input_ids"]).last_hidden_state.flatten(0, 1)
                t_vals_NK, t_ids_NK = teacher_topk(t_hidden_NH, teacher.get_output_embeddings(), kd.top_k, kd.chunk_tokens,
                                                   log_probs_at=kd.temperature if kd.tail_bucket else None)
                del t_hidden_NH
                reshard_head(teacher)  # a sharded teacher's gathered lm_head is freed at once (no backward frees it)
            if t_vals_NK.is_inference():  # (N, k): ordinary tensors, which a checkpointed loss may save for backward
                t_vals_NK, t_ids_NK = t_vals_NK.clone(), t_ids_NK.clone()
            # The loss is distill_loss's fused path where the student's head is a plain nn.Linear: the head is frozen
            # here, so it computes only d(hidden) and no [V, H] gradient.
            s_hidden_NH = student.model(input_ids=batch["input_ids"]).last_hidden_state.flatten(0, 1)
            out = distill_loss(s_hidden_NH, student.get_output_embeddings(), batch["labels"].flatten(), t_vals_NK, t_ids_NK, kd)
            out.loss.backward()
            with torch.no_grad():
                e, s, g = structure_scores(student, lambda p: (p * p.grad).abs() if p.grad is not None else torch.zeros_like(p))
            if counted is None or counted[i]:
                _accumulate(experts, e), _accumulate(shared, s), _accumulate(groups, g)
            for p in scored:
                p.grad = None
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
            p.grad = None
    return experts, shared, groups


def _activation(student, batches, progress) -> tuple[dict, dict, dict]:
    family = get_family(student)
    sums: dict[tuple, Tensor] = {}
    counts: dict[tuple, Tensor] = {}
    hooks = []

    def add(key, value, count):
        sums[key] = sums[key] + value if key in sums else value
        counts[key] = counts[key] + count if key in counts else count

    def expert_hook(layer):
        def hook(module, args, output):
            x_NH, top_k_index_NK = args[0], args[1]
            gate_EIH, up_EIH, _ = expert_weights(module)
            num_experts, width, _ = gate_EIH.shape
            s_EI = torch.zeros(num_experts, width, device=x_NH.device)
            n_E = torch.zeros(num_experts, 1, device=x_NH.device)
            for e in range(num_experts):  # calibration only: the training path stays on grouped_mm
                routed = (top_k_index_NK == e).any(-1)
                if routed.any():
                    x = x_NH[routed]
                    act_NI = module.act_fn(x @ gate_EIH[e].T) * (x @ up_EIH[e].T)
                    s_EI[e] = act_NI.abs().float().sum(0)
                    n_E[e] = routed.sum()
            add(("experts", layer), s_EI, n_E)
        return hook

    def shared_hook(layer):
        def hook(module, args):
            a_NI = args[0].reshape(-1, args[0].shape[-1])
            add(("shared", layer), a_NI.abs().float().sum(0), torch.tensor(float(a_NI.shape[0]), device=a_NI.device))
        return hook

    def group_hook(layer, num_groups):
        def hook(module, args):
            a_BTF = args[0]
            heads = a_BTF.reshape(-1, num_groups, a_BTF.shape[-1] // num_groups)  # (N, G, R*D)
            add(("groups", layer), heads.float().norm(dim=-1).sum(0), torch.tensor(float(heads.shape[0]), device=a_BTF.device))
        return hook

    num_groups = int(student.config.num_key_value_heads)
    for layer, block in family.moe_blocks(student):
        hooks.append(block.experts.register_forward_hook(expert_hook(layer)))
        mlp = family.shared_expert(block)
        if mlp is not None:
            hooks.append(mlp.down_proj.register_forward_pre_hook(shared_hook(layer)))
    for layer, attn in family.attention_modules(student):
        hooks.append(attn.o_proj.register_forward_pre_hook(group_hook(layer, num_groups)))
    device = next(student.parameters()).device
    try:
        with torch.no_grad():
            for batch in progress(batches):
                student.model(input_ids=_to_device(batch, device)["input_ids"])
    finally:
        for h in hooks:
            h.remove()
    out = ({}, {}, {})
    for (kind, layer), total in sums.items():
        mean = total / counts[(kind, layer)].clamp_min(1)
        out[("experts", "shared", "groups").index(kind)][layer] = mean.cpu()
    return out


def compute_scores(
    student: nn.Module,
    batches: Iterable[dict],
    criterion: str,
    *,
    teacher: nn.Module | None = None,
    kd: KDConfig | None = None,
    seed: int = 0,
    progress: Callable[[Iterable], Iterable] = lambda it: it,
    counted: list[bool] | None = None,
) -> ImportanceScores:
    """Score every expert neuron, shared-expert neuron and GQA group of ``student``.

    ``counted`` (kd_taylor): batches marked False are run but not added — a sharded teacher's forward is
    collective, so every rank must run as many batches as the others even when it has fewer to score.
    """
    if criterion not in CRITERIA:
        raise ValueError(f"criterion={criterion!r}: must be one of {list(CRITERIA)}")
    family: MoEFamily = get_family(student)
    batches = list(batches)
    num_tokens = sum(int(b["input_ids"].numel()) for b in batches)
    with _EvalMode(student, teacher):
        if criterion == "kd_taylor":
            # The score is the gradient of the paper's loss: teacher renormalised over its top-k. The tail-bucket
            # KL (a recovery-loss option) is an exact divergence whose gradient vanishes while the student still
            # equals the teacher — every stage that starts from the teacher — so all scores would be 0.
            kd = replace(kd or KDConfig(), tail_bucket=False)
            experts, shared, groups = _kd_taylor(student, teacher, batches, kd, progress, counted)
            if counted is not None:
                num_tokens = sum(int(b["input_ids"].numel()) for b, c in zip(batches, counted) if c)
        elif criterion == "activation":
            experts, shared, groups = _activation(student, batches, progress)
        elif criterion == "magnitude":
            with torch.no_grad():
                experts, shared, groups = structure_scores(student, lambda p: p.float() ** 2)
            experts, shared, groups = ({k: v.sqrt() for k, v in d.items()} for d in (experts, shared, groups))
            num_tokens = 0
        else:  # random: a seeded baseline; shapes from the model
            gen = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                experts, shared, groups = structure_scores(student, lambda p: torch.zeros_like(p, device="cpu"))
            experts, shared, groups = ({k: torch.rand(v.shape, generator=gen) for k, v in d.items()}
                                       for d in (experts, shared, groups))
            num_tokens = 0
    return ImportanceScores(
        criterion=criterion, model_type=family.model_type, shape=model_shape(student),
        experts={k: v.cpu() for k, v in experts.items()}, shared={k: v.cpu() for k, v in shared.items()},
        groups={k: v.cpu() for k, v in groups.items()}, num_tokens=num_tokens,
    )


@torch.no_grad()
def expert_saliency(model: nn.Module, batches: Iterable[dict], progress=lambda it: it) -> dict[int, Tensor]:
    """REAP-style saliency per expert: mean over routed tokens of gate weight × ||expert output||."""
    family = get_family(model)
    sums: dict[int, Tensor] = {}
    counts: dict[int, Tensor] = {}
    hooks = []

    def hook_for(layer):
        def hook(module, args, output):
            x_NH, top_k_index_NK, top_k_weights_NK = args[0], args[1], args[2]
            gate_EIH, up_EIH, down_EHI = expert_weights(module)
            num_experts = gate_EIH.shape[0]
            s_E = torch.zeros(num_experts)
            n_E = torch.zeros(num_experts)
            for e in range(num_experts):
                token, slot = torch.where(top_k_index_NK == e)
                if token.numel():
                    x = x_NH[token]
                    y_NH = (module.act_fn(x @ gate_EIH[e].T) * (x @ up_EIH[e].T)) @ down_EHI[e].T
                    s_E[e] = (top_k_weights_NK[token, slot].float() * y_NH.float().norm(dim=-1)).sum().cpu()
                    n_E[e] = token.numel()
            sums[layer] = sums.get(layer, 0) + s_E
            counts[layer] = counts.get(layer, 0) + n_E
        return hook

    for layer, block in family.moe_blocks(model):
        hooks.append(block.experts.register_forward_hook(hook_for(layer)))
    device = next(model.parameters()).device
    try:
        with _EvalMode(model):
            for batch in progress(batches):
                model.model(input_ids=batch["input_ids"].to(device))
    finally:
        for h in hooks:
            h.remove()
    return {layer: sums[layer] / counts[layer].clamp_min(1) for layer in sums}
