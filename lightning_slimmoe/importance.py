"""Importance criteria: which expert neurons and GQA groups to keep.

* ``kd_taylor`` — the paper's (§2, inferred formula): first-order sensitivity ``|θ ⊙ ∂L_KD/∂θ|`` of the
  top-k KD loss against the teacher, summed over all weights of a structure (a neuron: its gate row,
  up row and down column; a GQA group: its q/k/v rows, biases and o_proj columns), accumulated over
  calibration batches (``|·|`` taken per batch, as in the PLATON/HomoDistil line).
* ``kd_fisher`` — the estimated RISE of the stage's KD loss when a structure is removed, to second order:
  ``−θ_S·∇L_KD + ½ θ_Sᵀ F θ_S`` with F the Fisher of the student's own output distribution (the Gauss–Newton
  Hessian of the KD loss in the logits), estimated for every structure at once from one Gaussian-sketch
  backward per calibration sequence. Unlike a first-order score it is informative while the student still
  equals the teacher (every stage that starts from it), where the gradient of an exact divergence is zero
  (docs/results.md "kd_fisher").
* ``activation`` — Minitron-style: mean ``|act(gate x) * up x|`` per neuron over the tokens routed to the
  expert; mean L2 norm of each group's attention output (the o_proj input) per token.
* ``magnitude`` — L2 norm of the structure's weights. ``random`` — seeded. Both are baselines.
* :func:`expert_saliency` — REAP-style whole-expert saliency for the expert-removal baseline.

Scores are saved with :meth:`ImportanceScores.save` and reloaded (``weights_only``) to redo a prune
without recalibrating; a file from another model or shape is refused.
"""

from __future__ import annotations

import math
import os
import zlib
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import checkpoint

from lightning_slimmoe.distill import IGNORE_INDEX, REST_CLAMP, KDConfig, distill_loss
from lightning_slimmoe.distributed import local_rows
from lightning_slimmoe.families import MoEFamily, get_family, head_dim
from lightning_slimmoe.module import teacher_targets
from lightning_slimmoe.slimming import (check_expert_layout, expert_activations, expert_outputs, expert_weights,
                                        routed_tokens, shared_expert_down, shared_expert_parameters,
                                        split_gate_up)
from lightning_slimmoe.storage import atomic_torch_save

CRITERIA = ("kd_taylor", "kd_fisher", "activation", "magnitude", "random")
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
    if getattr(attn, "sinks", None) is not None:  # gpt-oss: one attention sink per query head, pruned with it
        names.append(("sinks", attn.sinks))
    return names


Contribution = Callable[[Tensor, Tensor, "Tensor | None"], Tensor]
"""``contrib(param, w, g)``: the per-element contribution of rows ``w`` of ``param``'s (local) values, ``g`` the
same rows of its (local) gradient or None; ``param`` itself only names which parameter the rows are of."""

CONTRIBUTION_CHUNK_ELEMENTS = 1 << 24  # rows of a parameter per contribution: 64 MiB in fp32 at most


def _summed(p: Tensor, contrib: Contribution, dims: tuple[int, ...]) -> Tensor:
    """``contrib`` of ``p`` in fp32 (fp64 where it is fp64), summed over ``dims``: a full-size table on every rank.

    The contribution is made and reduced a chunk of dim-0 rows at a time (``CONTRIBUTION_CHUNK_ELEMENTS``): an
    expert tensor's ``θ ⊙ g`` in fp32 would otherwise be a transient twice the parameter's own bytes (a 128-expert
    Qwen3 layer: 1.5 GiB on top of its gradient; bench/memory.py). Under FSDP2 ``p`` is a DTensor whose dim-0 rows
    are spread over the ranks. Only the local rows are reduced: when dim 0 survives the sum they are placed at their
    row offset in a zero table (every row has exactly one owner); when dim 0 is summed over (o_proj
    columns, shared-expert down columns) the local sum is a partial sum. :func:`structure_scores` then
    all-reduces its tables once, so every rank ends with the single-process sums (owned rows exactly, the
    partial sums up to summation order) without gathering any parameter (docs/design.md §5).
    """
    w, start, _ = local_rows(p.detach())
    g = local_rows(p.grad)[0] if p.grad is not None else None
    dims = tuple(d % p.dim() for d in dims)
    rows = w.shape[0] if w.dim() else 1
    step = max(1, CONTRIBUTION_CHUNK_ELEMENTS // max(1, math.prod(w.shape[1:])))
    partial, pieces = None, []
    for r in range(0, max(rows, 1), step):  # an empty local shard still makes one (empty) piece
        w_r = w[r:r + step] if w.dim() else w
        c = contrib(p, w_r, None if g is None else (g[r:r + step] if g.dim() else g))
        c = c if c.dtype == torch.float64 else c.float()  # fp64 contributions are summed in fp64
        reduced = c.sum(dims) if dims else c
        if 0 in dims:
            partial = reduced if partial is None else partial + reduced
        else:
            pieces.append(reduced)
    reduced = partial if 0 in dims else torch.cat(pieces) if w.dim() else pieces[0]
    if not isinstance(p, DTensor) or 0 in dims:
        return reduced
    full = reduced.new_zeros((p.shape[0], *reduced.shape[1:]))
    full[start:start + reduced.shape[0]] = reduced
    return full


def zero_contribution(p: Tensor, w: Tensor, g: Tensor | None) -> Tensor:
    return torch.zeros_like(w)


def taylor_contribution(p: Tensor, w: Tensor, g: Tensor | None) -> Tensor:
    """``|θ ⊙ ∇θ|`` (zero where the parameter has no gradient)."""
    return (w * g).abs_() if g is not None else torch.zeros_like(w)


def _group_reduce(attn: nn.Module, contrib: Contribution, num_groups: int) -> Tensor:
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


def structure_scores(model: nn.Module, contrib: Contribution):
    """(experts, shared, groups) dicts of per-structure sums of ``contrib(param)``.

    Collective when the model is FSDP2-sharded: every rank calls it (see :func:`_summed`).
    """
    family = get_family(model)
    experts, shared, groups = {}, {}, {}
    for layer, block in family.moe_blocks(model):
        experts[layer] = _expert_neuron_sums(block.experts, contrib)  # (E, I)
    for layer, mlp in family.shared_experts(model):
        shared[layer] = _shared_neuron_sums(mlp, contrib)  # (I_shared,)
    num_groups = int(model.config.num_key_value_heads)
    for layer, attn in family.attention_modules(model):
        groups[layer] = _group_reduce(attn, contrib, num_groups)
    _all_reduce_shards_(model, (experts, shared, groups))
    return experts, shared, groups


def _shared_neuron_sums(mlp: nn.Module, contrib: Contribution) -> Tensor:
    """``(I,)``: per shared-expert neuron, ``contrib`` summed over its gate, up and down weights. ``contrib`` runs on
    the stored parameters (their gradients are there, not on views): gate then up rows, ``2I`` in all whether they are
    two parameters or Granite's one fused ``input_linear``, then the down columns."""
    *gate_up, w_down_HI = shared_expert_parameters(mlp)
    gate_up_2I = torch.cat([_summed(w, contrib, (-1,)) for w in gate_up])
    width = gate_up_2I.shape[0] // 2
    return gate_up_2I[:width] + gate_up_2I[width:] + _summed(w_down_HI, contrib, (0,))


def _expert_neuron_sums(experts: nn.Module, contrib: Contribution) -> Tensor:
    """``(E, I)``: per expert neuron, ``contrib`` summed over its gate and up weights, its down weights and, in
    gpt-oss's layout, its gate and up biases (``down_proj_bias`` belongs to the expert, not to a neuron)."""
    layout = check_expert_layout(experts)
    # contrib on the fused parameter, then split, so grads line up with the view
    if layout.transposed:  # gate_up_proj [E, H, 2I] (gpt-oss: gate/up interleaved; Llama-4: concatenated)
        gate_up_E2I = _summed(experts.gate_up_proj, contrib, (1,))
        if layout.has_bias:
            gate_up_E2I = gate_up_E2I + _summed(experts.gate_up_proj_bias, contrib, ())
        down_EI = _summed(experts.down_proj, contrib, (2,))
        gate_EI, up_EI = split_gate_up(layout, gate_up_E2I)
        return gate_EI + up_EI + down_EI
    gate_up_E2I = _summed(experts.gate_up_proj, contrib, (-1,))  # (E, 2I, H) -> (E, 2I): gate, then up
    width = gate_up_E2I.shape[1] // 2
    down_EI = _summed(experts.down_proj, contrib, (1,))  # (E, H, I) -> (E, I)
    return gate_up_E2I[:, :width] + gate_up_E2I[:, width:] + down_EI


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
        if check_expert_layout(block.experts).has_bias:  # gpt-oss: a neuron's gate/up biases are scored with it
            params.append(block.experts.gate_up_proj_bias)
    for _, mlp in family.shared_experts(model):
        params += shared_expert_parameters(mlp)
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
class _gradients_only_for:
    """Within the block only ``params`` of ``student`` require gradients (the pruned structures: saves memory on
    big models); on exit every parameter's ``requires_grad`` is restored and every gradient dropped."""

    def __init__(self, student: nn.Module, params: Iterable[nn.Parameter]):
        self.student, self.params = student, list(params)

    def __enter__(self):
        self.flags = {p: p.requires_grad for p in self.student.parameters()}
        for p in self.student.parameters():
            p.requires_grad_(False)
        for p in self.params:
            p.requires_grad_(True)
            p.grad = None
        return self

    def __exit__(self, *exc):
        for p, flag in self.flags.items():
            p.requires_grad_(flag)
            p.grad = None


class _checkpointed_layers:
    """Within the block every decoder layer of ``model`` runs under non-reentrant activation checkpointing: its forward
    keeps only its inputs for backward and is recomputed there, so a scoring backward holds one layer's activations
    instead of every layer's (``parallel.activation_checkpointing``; memory.py plans it). transformers' own
    checkpointing acts in train mode only, and scoring runs in eval mode (no dropout, no router jitter), so the layer's
    ``forward`` is wrapped here, below its ``__call__``: FSDP2's hooks stay outside and gather the layer's shards for
    the recompute, as they do for transformers' training-mode checkpointing. The recomputed forward is the same
    eval-mode computation, so the scores are the same. Disabled (``enabled=False``) it changes nothing."""

    def __init__(self, model: nn.Module, enabled: bool):
        self.layers = list(get_family(model).decoder_layers(model)) if enabled else []

    def __enter__(self):
        for layer in self.layers:
            forward = layer.forward
            layer.forward = lambda *args, _forward=forward, **kwargs: checkpoint(_forward, *args, use_reentrant=False,
                                                                                 **kwargs)
        return self

    def __exit__(self, *exc):
        for layer in self.layers:
            del layer.forward  # the class's forward again


def _kd_taylor(student, teacher, batches, kd: KDConfig, progress, counted) -> tuple[dict, dict, dict]:
    if teacher is None:
        raise ValueError("criterion='kd_taylor' needs a teacher (the KD loss is taken against it)")
    kd = replace(kd, lm_weight=0.0)
    scored = scored_parameters(student)
    # Every structure starts at zero, so a rank with no calibration batch still holds (and all-reduces)
    # exactly the same tables as the others.
    with torch.no_grad():
        experts, shared, groups = structure_scores(student, zero_contribution)
    device = next(student.parameters()).device
    with _gradients_only_for(student, scored):
        for i, batch in enumerate(progress(batches)):
            batch = _to_device(batch, device)
            t_vals_NK, t_ids_NK = teacher_targets(teacher, batch["input_ids"], kd)
            # The loss is distill_loss's fused path where the student's head is a plain nn.Linear: the head is frozen
            # here, so it computes only d(hidden) and no [V, H] gradient.
            s_hidden_NH = student.model(input_ids=batch["input_ids"], use_cache=False).last_hidden_state.flatten(0, 1)
            out = distill_loss(s_hidden_NH, student.get_output_embeddings(), batch["labels"].flatten(), t_vals_NK, t_ids_NK, kd)
            out.loss.backward()
            with torch.no_grad():
                e, s, g = structure_scores(student, taylor_contribution)
            if counted is None or counted[i]:
                _accumulate(experts, e), _accumulate(shared, s), _accumulate(groups, g)
            for p in scored:
                p.grad = None
    return experts, shared, groups


def removal_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The weights whose zeroing removes each structure exactly: an expert neuron's ``down_proj`` column (routed
    and shared experts), a GQA group's ``o_proj`` input columns.

    Removing a GLU neuron (its gate row, up row and down column, SlimMoE §1) computes the same function as zeroing
    its down column alone, and removing a GQA group the same as zeroing its o_proj columns (its heads reach the
    residual stream only through them). The network is linear in those weights up to the next layer, so a
    quadratic expansion along ``δθ = −θ_S`` over them is far closer to the true loss change than one along all of
    the structure's weights, along which the neuron's output falls like ``(1 − α)³`` (gate × up × down) and the
    second-order Taylor series of zeroing is badly off.
    """
    family = get_family(model)
    params = []
    for _, block in family.moe_blocks(model):
        params.append(block.experts.down_proj)
    for _, mlp in family.shared_experts(model):
        params.append(shared_expert_down(mlp).weight)
    for _, attn in family.attention_modules(model):
        params.append(attn.o_proj.weight)
    return params


def batch_seed(seed: int, input_ids: Tensor) -> int:
    """A sampling seed from ``seed`` and a sequence's token ids alone: the same sequence draws the same noise on any
    rank, in any position of the calibration list and in a single process, so sharded, data-parallel and
    single-process scoring estimate with identical draws."""
    data = input_ids.detach().to("cpu", torch.int64).contiguous().numpy().tobytes()
    return zlib.crc32(data, zlib.crc32(str(int(seed)).encode())) & 0x7FFFFFFF


def _fisher_sketch_chunk(hidden_cH: Tensor, ids_cK: Tensor | None, lm_head: nn.Module, temperature: float,
                         chunk_seed: int) -> Tensor:
    """A surrogate ``T · Σ_t Σ_b sg(√q_tb · ε_tb) · log q_tb`` over one chunk (ε ~ N(0, 1), ``sg`` = detached):
    its gradient in the raw logits z_t is ``r_t = T·Σ_b √q_tb ε_tb ∇log q_tb``, whose covariance is the
    student's Fisher ``Σ_b q_tb ∇log q_tb ∇log q_tbᵀ · T²`` — over the full vocabulary (b = every id:
    ``diag(q) − qqᵀ``) or, when ``ids_cK`` is given (tail bucket), over the k+1 buckets (the teacher's top-k ids
    and the rest), where ``q`` is the student's softmax at T.

    A Gaussian sketch rather than a sampled label (``e_y − q``, y ~ q): both are unbiased, but here each token's
    projection ``vᵀ r_t`` is exactly Gaussian, so a squared sum has relative variance 2 with no heavy tail from
    rare labels. Deterministic in ``chunk_seed`` (a generator made here): under checkpointing the backward's
    recompute draws the same ε.
    """
    logits_cV = lm_head(hidden_cH)
    logits_cV = (logits_cV if logits_cV.dtype == torch.float64 else logits_cV.float()) / temperature  # (c, V)
    log_q_cV = logits_cV - torch.logsumexp(logits_cV, dim=-1, keepdim=True)  # (c, V)
    if ids_cK is not None:
        log_q_cK = log_q_cV.gather(-1, ids_cK)  # (c, k)
        log_rest_c = torch.log1p(-log_q_cK.exp().sum(-1).clamp(max=REST_CLAMP))  # (c,)
        log_q_cB = torch.cat([log_q_cK, log_rest_c.unsqueeze(-1)], dim=-1)  # (c, k+1) buckets
    else:
        log_q_cB = log_q_cV
    gen = torch.Generator(device=log_q_cB.device).manual_seed(chunk_seed)
    with torch.no_grad():
        eps_cB = torch.randn(log_q_cB.shape, generator=gen, device=log_q_cB.device, dtype=log_q_cB.dtype)
        coef_cB = eps_cB.mul_(log_q_cB.detach().mul(0.5).exp_())  # √q · ε
    return temperature * (coef_cB * log_q_cB).sum()


def _fisher_sketch(hidden_NH: Tensor, ids_NK: Tensor | None, lm_head: nn.Module, kd: KDConfig, seed: int) -> Tensor:
    """:func:`_fisher_sketch_chunk` summed over ``kd.chunk_tokens`` chunks, each checkpointed so that only one
    ``(chunk, V)`` logits tensor is alive at a time (as distill_loss's checkpointed path)."""
    total = hidden_NH.new_zeros((), dtype=torch.float32 if hidden_NH.dtype != torch.float64 else torch.float64)
    n = hidden_NH.shape[0]
    for c, start in enumerate(range(0, n, kd.chunk_tokens)):
        end = min(start + kd.chunk_tokens, n)
        ids = ids_NK[start:end] if ids_NK is not None else None
        chunk_seed = (seed * 1_000_003 + c) & 0x7FFFFFFFFFFFFFFF
        total = total + checkpoint(_fisher_sketch_chunk, hidden_NH[start:end], ids, lm_head, kd.temperature,
                                   chunk_seed, use_reentrant=False)
    return total


def _kd_fisher(student, teacher, batches, kd: KDConfig, progress, counted, seed: int,
               draws: int = 1) -> tuple[dict, dict, dict]:
    """Per structure S, summed over calibration batches b: ``−θ_S·∇L_b + ½ Σ_r mean_m (θ_S·∇ℓ̃_rm)² / N_b``.

    Removing S is ``δθ = −θ_S`` (θ_S: its :func:`removal_parameters` entries); to second order the stage's KD loss
    L_b (its own ``top_k``, ``temperature``, ``tail_bucket``; ``lm_weight`` 0; the mean over the batch's N_b counted
    tokens) rises by ``−θ_S·∇L_b + ½ θ_Sᵀ H_b θ_S``. H_b is replaced by its Gauss–Newton part
    ``Σ_t J_tᵀ F_t J_t / N_b`` (J_t = ∂z_t/∂θ, z_t the raw logits; what is dropped is ``Σ_t ∂L/∂z_t · ∂²z_t/∂θ²``,
    zero at a stage's first prune, where student = teacher and an exact divergence has zero gradient in z), and
    F_t is the student's Fisher in z: ``T²·∇²_z KL(p‖softmax(z/T)) = diag(q) − qqᵀ`` (q the student's softmax at
    T) for ANY p, for the full KL and the renormalised top-k loss alike; for the tail bucket the Fisher of the k+1
    buckets, its Hessian wherever p = q (the first prune). ℓ̃_rm is sequence r's :func:`_fisher_sketch` of draw m:
    its gradient ``Σ_t J_tᵀ r_t`` has ``E[r_t r_tᵀ] = F_t`` independently over tokens, so
    ``E[(θ_S·∇ℓ̃_r)²] = Σ_{t∈r} θ_Sᵀ J_tᵀ F_t J_t θ_S`` for EVERY S from one backward per sequence.
    """
    if teacher is None:
        raise ValueError("criterion='kd_fisher' needs a teacher (the KD loss is taken against it)")
    kd = replace(kd, lm_weight=0.0)
    removal = removal_parameters(student)
    removal_ids = {id(p) for p in removal}

    def theta_dot_grad(p, w, g):  # θ ⊙ ∇ over the removal weights only (in fp64, see below); zero elsewhere
        if id(p) not in removal_ids or g is None:
            return torch.zeros_like(w)
        return w.double() * g.double()

    # The sums run in fp64: the score is a difference (−first order + second order) that can cancel to near 0,
    # where the order of an fp32 sum (a sharded model's partial sums, docs/design.md §5) would show. It costs one
    # fp64 copy of a chunk of one removal weight at a time.
    with torch.no_grad():
        experts, shared, groups = structure_scores(student, lambda p, w, g: torch.zeros_like(w, dtype=torch.float64))
    device = next(student.parameters()).device
    with _gradients_only_for(student, removal):
        for i, batch in enumerate(progress(batches)):
            batch = _to_device(batch, device)
            t_vals_NK, t_ids_NK = teacher_targets(teacher, batch["input_ids"], kd)
            labels_N = batch["labels"].flatten()
            # First order: the stage's KD loss (0 gradient at student == teacher for an exact divergence).
            s_hidden_NH = student.model(input_ids=batch["input_ids"], use_cache=False).last_hidden_state.flatten(0, 1)
            # fused=False: autograd through the head module, the path a sharded head takes, so sharded and
            # single-process scores round alike (the score can cancel to near 0 against the second-order term).
            out = distill_loss(s_hidden_NH, student.get_output_embeddings(), labels_N, t_vals_NK, t_ids_NK, kd,
                               fused=False)
            out.loss.backward()
            del s_hidden_NH, out
            with torch.no_grad():
                first = structure_scores(student, theta_dot_grad)
            for p in removal:
                p.grad = None
            # Second order: one backward per sequence and draw. Each squared sum is an unbiased estimate with relative
            # variance 2 whatever its token count, so one backward per sequence instead of per batch gives B times
            # as many for the same FLOPs.
            input_ids_BT = batch["input_ids"]
            labels_BT = batch["labels"]
            t_ids_BTK = t_ids_NK.reshape(*input_ids_BT.shape, -1) if kd.tail_bucket else None
            num_counted = int((labels_BT != IGNORE_INDEX).sum())
            quad = tuple({k: torch.zeros_like(v) for k, v in f.items()} for f in first)
            for draw in range(draws):
                for row in range(input_ids_BT.shape[0]):
                    ids_1T, mask_T = input_ids_BT[row:row + 1], labels_BT[row] != IGNORE_INDEX
                    s_hidden_TH = student.model(input_ids=ids_1T, use_cache=False).last_hidden_state[0]
                    sketch = _fisher_sketch(s_hidden_TH[mask_T], t_ids_BTK[row][mask_T] if kd.tail_bucket else None,
                                            student.get_output_embeddings(), kd, batch_seed(seed + 7919 * draw, ids_1T))
                    sketch.backward()
                    del s_hidden_TH, sketch
                    with torch.no_grad():
                        lin = structure_scores(student, theta_dot_grad)
                    for q, s in zip(quad, lin):
                        for k in q:
                            q[k] += s[k] ** 2
                    for p in removal:
                        p.grad = None
            scale = 0.5 / (draws * max(1, num_counted))
            rise = tuple({k: -f[k] + scale * q[k] for k in f} for f, q in zip(first, quad))
            if counted is None or counted[i]:
                _accumulate(experts, rise[0]), _accumulate(shared, rise[1]), _accumulate(groups, rise[2])
            for p in removal:
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
            gate_EIH, _, _ = expert_weights(module)
            num_experts, width, _ = gate_EIH.shape
            s_EI = torch.zeros(num_experts, width, device=args[0].device)
            n_E = torch.zeros(num_experts, 1, device=args[0].device)
            # calibration only: the training path keeps its experts kernel. A token routed to an expert twice (top-k
            # slots never repeat an expert) would count once, as before.
            for e, x, _ in routed_tokens(module, args):
                act_NI = expert_activations(module, x, e)  # the family's own GLU (gpt-oss: clamped, biased)
                s_EI[e] = act_NI.abs().float().sum(0)
                n_E[e] = x.shape[0]
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
    for layer, mlp in family.shared_experts(student):
        hooks.append(shared_expert_down(mlp).register_forward_pre_hook(shared_hook(layer)))
    for layer, attn in family.attention_modules(student):
        hooks.append(attn.o_proj.register_forward_pre_hook(group_hook(layer, num_groups)))
    device = next(student.parameters()).device
    try:
        with torch.no_grad():
            for batch in progress(batches):
                student.model(input_ids=_to_device(batch, device)["input_ids"], use_cache=False)
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
    fisher_draws: int = 1,
    checkpoint_layers: bool = False,
) -> ImportanceScores:
    """Score every expert neuron, shared-expert neuron and GQA group of ``student``.

    ``seed`` seeds ``random`` and ``kd_fisher``'s Gaussian sketches (per sequence, from the seed and its tokens);
    ``fisher_draws`` (kd_fisher): sketches per calibration sequence, each one student forward + backward.
    ``counted`` (kd_taylor, kd_fisher): batches marked False are run but not added — a sharded teacher's forward is
    collective, so every rank must run as many batches as the others even when it has fewer to score.
    ``checkpoint_layers`` (kd_taylor, kd_fisher): recompute each decoder layer in the scoring backward instead of
    holding every layer's activations (:class:`_checkpointed_layers`); the scores are the same.
    """
    if criterion not in CRITERIA:
        raise ValueError(f"criterion={criterion!r}: must be one of {list(CRITERIA)}")
    if isinstance(fisher_draws, bool) or not isinstance(fisher_draws, int) or fisher_draws < 1:
        raise ValueError(f"fisher_draws={fisher_draws!r}: must be an integer >= 1")
    family: MoEFamily = get_family(student)
    batches = list(batches)
    num_tokens = sum(int(b["input_ids"].numel()) for b in batches)
    with _EvalMode(student, teacher):
        if criterion == "kd_taylor":
            # The score is the gradient of the paper's loss: teacher renormalised over its top-k. The tail-bucket
            # KL (a recovery-loss option) is an exact divergence whose gradient vanishes while the student still
            # equals the teacher — every stage that starts from the teacher — so all scores would be 0.
            kd = replace(kd or KDConfig(), tail_bucket=False)
            with _checkpointed_layers(student, checkpoint_layers):
                experts, shared, groups = _kd_taylor(student, teacher, batches, kd, progress, counted)
            if counted is not None:
                num_tokens = sum(int(b["input_ids"].numel()) for b, c in zip(batches, counted) if c)
        elif criterion == "kd_fisher":
            # The stage's own KD loss (tail bucket included): its rise on removal is what the recovery must undo.
            with _checkpointed_layers(student, checkpoint_layers):
                experts, shared, groups = _kd_fisher(student, teacher, batches, kd or KDConfig(), progress, counted,
                                                     seed, fisher_draws)
            if counted is not None:
                num_tokens = sum(int(b["input_ids"].numel()) for b, c in zip(batches, counted) if c)
        elif criterion == "activation":
            experts, shared, groups = _activation(student, batches, progress)
        elif criterion == "magnitude":
            with torch.no_grad():
                experts, shared, groups = structure_scores(student, lambda p, w, g: w.float() ** 2)
            experts, shared, groups = ({k: v.sqrt() for k, v in d.items()} for d in (experts, shared, groups))
            num_tokens = 0
        else:  # random: a seeded baseline; shapes from the model
            gen = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                experts, shared, groups = structure_scores(student, lambda p, w, g: torch.zeros_like(w, device="cpu"))
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
            gate_EIH, _, _ = expert_weights(module)
            num_experts = gate_EIH.shape[0]
            s_E = torch.zeros(num_experts)
            n_E = torch.zeros(num_experts)
            # Llama-4 scales the expert's input by the routing weight: its weight here is 1 (routed_tokens)
            for e, x, w_M in routed_tokens(module, args):
                y_NH = expert_outputs(module, x, e)  # the family's own expert function, biases included
                s_E[e] = (w_M.float() * y_NH.float().norm(dim=-1)).sum().cpu()
                n_E[e] = x.shape[0]
            sums[layer] = sums.get(layer, 0) + s_E
            counts[layer] = counts.get(layer, 0) + n_E
        return hook

    for layer, block in family.moe_blocks(model):
        hooks.append(block.experts.register_forward_hook(hook_for(layer)))
    device = next(model.parameters()).device
    try:
        with _EvalMode(model):
            for batch in progress(batches):
                model.model(input_ids=batch["input_ids"].to(device), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return {layer: sums[layer] / counts[layer].clamp_min(1) for layer in sums}
