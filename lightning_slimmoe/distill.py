"""Knowledge-distillation loss for SlimMoE stage recovery.

SlimMoE (arXiv 2506.18349) slims the experts of an MoE LLM in several stages and,
after every stage, recovers the pruned student by knowledge distillation from the
frozen *original* model.  The paper distils on the teacher's top-k logits only
(k = 8): storing/streaming k values per token instead of a full vocabulary row is
what makes distilling 100B+ token budgets from a 42B teacher affordable, and the
tail of the teacher distribution carries little signal anyway.

Memory is the design constraint of this module.  With V in 32k..150k and T = 4096,
one fp32 ``[B*T, V]`` logits tensor is several GiB, and a naive loss keeps two or
three of them (logits, log-softmax, its gradient) alive for backward.  Everything
here therefore works over *chunks of tokens*:

* ``teacher_topk`` projects the teacher's final hidden states chunk by chunk under
  ``no_grad`` and keeps only ``(N, k)`` values/ids.
* ``distill_loss`` (default, *fused*) projects the student's hidden states chunk by
  chunk inside one ``torch.autograd.Function`` that, in the FORWARD pass, computes
  each chunk's logits, its share of the loss and, analytically, the loss's gradient
  with respect to the chunk's logits, and turns that at once into the gradients
  with respect to the chunk's hidden states and the LM-head weight (and bias),
  which it accumulates.  Backward only scales those saved gradients by
  ``grad_output``: the projection is never recomputed (the trick of fused
  linear-cross-entropy kernels such as Liger's).  One ``[chunk, V]`` buffer (two
  for ``temperature != 1``) is allocated per call and reused by every chunk (the
  logits become the softmax, then the gradient, in place); nothing of vocabulary
  size per token outlives the call, and nothing at all is saved for backward
  except the ``[N, H]`` / ``[V, H]`` gradients.
* ``distill_loss(..., fused=False)`` is the previous path, the reference of the
  tests: every chunk wrapped in ``torch.utils.checkpoint.checkpoint(use_reentrant=
  False)``; the ``[chunk, V]`` logits are recomputed in backward.  It is also what
  runs when the LM head is not a plain ``nn.Linear`` (an FSDP-sharded head, hooks:
  see :func:`_plain_linear`).

Per-chunk results are *sums*; they are divided by the total number of counted
tokens once at the end, so the chunk size never changes the value of the loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from lightning_slimmoe.errors import ConfigError

IGNORE_INDEX = -100
# log1p(-Q) of the student's top-k mass Q is taken at min(Q, 1 - 1e-7) (tail bucket): finite when Q rounds to 1.
REST_CLAMP = 1.0 - 1e-7

__all__ = [
    "IGNORE_INDEX",
    "KDConfig",
    "DistillOutput",
    "frozen_forward",
    "teacher_topk",
    "distill_loss",
]


@dataclass
class KDConfig:
    """Distillation settings of one stage (plain typed fields so jsonargparse can fill them from YAML)."""

    top_k: int = 8
    """teacher logits kept per token; the KL is taken over these ids (SlimMoE uses 8)"""
    temperature: float = 1.0
    """softmax temperature T of teacher and student in the KD term, which is scaled by T^2 so its gradient does not
    shrink as T grows (Hinton et al., 2015)"""
    lm_weight: float = 0.0
    """loss = (1 - lm_weight) KD + lm_weight LM: 0 is pure KD (the paper's recovery objective), 1 plain LM"""
    chunk_tokens: int = 1024
    """tokens per chunk of the vocabulary projection: bounds the largest live fp32 tensor to chunk_tokens x V"""
    tail_bucket: bool = False
    """false: the teacher renormalised over its top-k ids (the paper's loss); true: its top-k probabilities from its
    full softmax plus one rest-mass bucket matched against the student's, so the student is not pushed to put all
    its mass on k ids (docs/results.md); with top_k = V both are full-vocabulary KL"""

    def __post_init__(self) -> None:
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1:
            raise ConfigError(f"kd.top_k={self.top_k!r} is invalid: must be an integer >= 1")
        if isinstance(self.chunk_tokens, bool) or not isinstance(self.chunk_tokens, int) or self.chunk_tokens < 1:
            raise ConfigError(
                f"kd.chunk_tokens={self.chunk_tokens!r} is invalid: must be an integer >= 1"
            )
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature) and self.temperature > 0):
            raise ConfigError(
                f"kd.temperature={self.temperature!r} is invalid: must be a finite number > 0"
            )
        if not (isinstance(self.lm_weight, (int, float)) and 0.0 <= self.lm_weight <= 1.0):
            raise ConfigError(f"kd.lm_weight={self.lm_weight!r} is invalid: must satisfy 0 <= lm_weight <= 1")


@dataclass
class DistillOutput:
    """Result of :func:`distill_loss`.

    Attributes:
        loss: scalar to backpropagate.
        kd_loss: detached scalar KD term (0 without a teacher).
        lm_loss: detached scalar student cross-entropy on the labels (always computed;
            ``exp(lm_loss)`` is the perplexity).
        agreement: detached scalar, fraction of counted tokens where the student's
            argmax equals the teacher's top-1 id (NaN without a teacher, 0 when no
            token is counted).
        num_tokens: number of counted tokens (labels != -100); weight for averaging
            these per-token means across steps / ranks.
    """

    loss: Tensor
    kd_loss: Tensor
    lm_loss: Tensor
    agreement: Tensor
    num_tokens: int


def _upcast(logits: Tensor) -> Tensor:
    # Softmax / logsumexp over 32k-150k entries is not accurate in bf16/fp16; fp32 is
    # the minimum.  fp64 (tests) is kept as is rather than being truncated.
    return logits if logits.dtype in (torch.float32, torch.float64) else logits.float()


def _chunk_bounds(n: int, chunk_tokens: int) -> list[tuple[int, int]]:
    return [(s, min(s + chunk_tokens, n)) for s in range(0, n, chunk_tokens)]


def frozen_forward(model: nn.Module):
    """The grad mode of a frozen model's forward (the teacher): ``torch.inference_mode()`` (no autograd
    bookkeeping, no version counters), or ``torch.no_grad()`` where inference mode is not safe: an FSDP-sharded
    model (FSDP writes its all-gathered parameters and frees them in place across calls) and a bitsandbytes 8-bit
    one (LLM.int8 keeps per-weight state it updates in place). Results of an inference-mode forward are
    inference tensors: clone them before autograd saves them (``module.teacher_targets`` does)."""
    try:
        from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
        sharded = (FSDPModule, FullyShardedDataParallel)
    except ImportError:  # pragma: no cover - torch without distributed
        sharded = ()
    for module in model.modules():
        if isinstance(module, sharded):
            return torch.no_grad()
        if "8bit" in type(module).__name__ or "Int8" in type(module).__name__:
            return torch.no_grad()
    if getattr(model, "is_loaded_in_8bit", False) or getattr(model, "is_quantized", False):
        return torch.no_grad()
    return torch.inference_mode()


@torch.no_grad()
def teacher_topk(teacher_hidden: Tensor, lm_head: nn.Module, top_k: int, chunk_tokens: int,
                 log_probs_at: float | None = None) -> tuple[Tensor, Tensor]:
    """Top-k teacher logits, computed chunk by chunk.

    Args:
        teacher_hidden: ``(N, H)`` final (post-norm) hidden states of the teacher; any
            leading shape ``(..., H)`` is flattened.
        lm_head: the teacher's vocabulary projection ``H -> V`` (may have a bias).
        top_k: number of logits kept per token.
        chunk_tokens: tokens projected at a time; only one ``(chunk, V)`` logits tensor
            is alive at once.

        log_probs_at: if given (a temperature T, for ``KDConfig.tail_bucket``), the values
            are full-vocabulary log-probabilities ``log_softmax(logits / T)`` instead of raw
            logits, so the mass outside the top-k is known.

    Returns:
        ``(values, ids)``: ``(N, k)`` float32 raw logits (no temperature) sorted in
        descending order, and their ``(N, k)`` int64 vocabulary ids.  When ``top_k``
        equals the vocabulary size nothing is dropped, so nothing is sorted: the values
        are every logit in vocabulary order and ``ids`` is ``arange(V)`` expanded over
        the tokens (a read-only, stride-0 view).  :func:`distill_loss` does not depend
        on the order of the k entries, so both give the same loss.
    """
    if top_k < 1:
        raise ValueError(f"top_k={top_k} is invalid: must be >= 1")
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens={chunk_tokens} is invalid: must be >= 1")
    hidden = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])  # (N, H)
    n = hidden.shape[0]
    values = torch.empty(n, top_k, dtype=torch.float32, device=hidden.device)  # (N, k)
    ids = None  # (N, k), allocated once the vocabulary size is known
    for start, end in _chunk_bounds(n, chunk_tokens):
        logits = _upcast(lm_head(hidden[start:end]))  # (c, V)
        vocab = logits.shape[-1]
        if top_k > vocab:
            raise ValueError(f"top_k={top_k} exceeds the vocabulary size {vocab}")
        if top_k == vocab:  # full vocabulary: a sort would only reorder what the loss sums over
            v, i = logits, None  # (c, V)
        else:
            v, i = logits.topk(top_k, dim=-1, largest=True, sorted=True)  # (c, k), (c, k)
        if log_probs_at is not None:
            v = v / log_probs_at - torch.logsumexp(logits / log_probs_at, dim=-1, keepdim=True)  # (c, k)
        values[start:end] = v
        if i is not None:
            if ids is None:
                ids = torch.empty(n, top_k, dtype=torch.int64, device=hidden.device)  # (N, k)
            ids[start:end] = i
        elif ids is None:
            ids = torch.arange(vocab, dtype=torch.int64, device=hidden.device).expand(n, vocab)  # (N, V) view
        del logits, v, i  # free the (c, V) buffer before the next chunk is projected
    if ids is None:  # no tokens: nothing was projected
        ids = torch.empty(n, top_k, dtype=torch.int64, device=hidden.device)  # (0, k)
    return values, ids


def _chunk_losses(
    hidden: Tensor,  # (c, H)
    labels: Tensor,  # (c,)
    teacher_values: Tensor | None,  # (c, k)
    teacher_ids: Tensor | None,  # (c, k)
    lm_head: nn.Module,
    temperature: float,
    lm_weight: float,
    tail_bucket: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Sums over one chunk: (differentiable weighted loss, kd, lm, #agreeing tokens).

    Every token in the chunk is counted (the caller dropped the ignored ones).  The
    only ``(c, V)`` tensors built are the logits, (for T != 1) the tempered logits,
    and the transient softmax inside ``logsumexp``: log-probabilities are obtained as
    ``logits[id] - logsumexp(logits)`` at the few gathered ids instead of
    materialising a full ``log_softmax``.
    """
    logits = _upcast(lm_head(hidden))  # (c, V)

    # LM term: cross-entropy = logsumexp(z) - z[label]; T does not apply.
    # When lm_weight == 0 it is only reported, so keep it off the autograd graph.
    lm_logits = logits if lm_weight > 0.0 or teacher_values is None else logits.detach()
    lse = torch.logsumexp(lm_logits, dim=-1)  # (c,)
    lm_sum = (lse - lm_logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)).sum()  # ()

    if teacher_values is None:
        zero = logits.new_zeros(())
        return lm_sum, zero, lm_sum.detach(), zero

    # KD term, forward KL(p || q) restricted to the teacher's top-k support:
    #   p = softmax(teacher_values / T) over the k entries (renormalised top-k),
    #   log q = log_softmax(student_logits / T) over the FULL vocabulary, gathered at ids,
    #   kd = T^2 * sum_k p_k (log p_k - log q_k).
    # When lm_weight == 1 it is only reported, so keep it off the autograd graph.
    kd_logits = logits if lm_weight < 1.0 else logits.detach()
    if tail_bucket:  # values are already full-vocabulary log-probabilities at T
        log_p = teacher_values.to(kd_logits.dtype)  # (c, k)
    else:
        log_p = torch.log_softmax(teacher_values.to(kd_logits.dtype) / temperature, dim=-1)  # (c, k)
    p = log_p.exp()  # (c, k)
    if temperature == 1.0:
        # reuse the LM logsumexp when it lives on the same graph (saves a (c, V) pass)
        kd_lse = lse if kd_logits is lm_logits else torch.logsumexp(kd_logits, dim=-1)  # (c,)
        log_q = kd_logits.gather(-1, teacher_ids) - kd_lse.unsqueeze(-1)  # (c, k)
    else:
        kd_lse = torch.logsumexp(kd_logits / temperature, dim=-1)  # (c,)
        log_q = kd_logits.gather(-1, teacher_ids) / temperature - kd_lse.unsqueeze(-1)  # (c, k)
    # xlogy gives 0 (not NaN) for teacher entries whose probability underflows to 0.
    kd_per_token = (torch.special.xlogy(p, p) - p * log_q).sum(-1)  # (c,)
    if tail_bucket:
        # One extra bucket: the teacher's and the student's probability mass outside the top-k ids.
        p_rest = (1.0 - p.sum(-1)).clamp_min(0.0)  # (c,)
        log_q_rest = torch.log1p(-log_q.exp().sum(-1).clamp(max=REST_CLAMP))  # (c,)
        kd_per_token = kd_per_token + torch.special.xlogy(p_rest, p_rest) - p_rest * log_q_rest
    kd_sum = (temperature**2) * kd_per_token.sum()  # ()

    # Agreement: student argmax vs the teacher's top-1 id (argmax over values, so the
    # ids need not be sorted).
    teacher_top1 = teacher_ids.gather(-1, teacher_values.argmax(-1, keepdim=True)).squeeze(-1)  # (c,)
    agree = (logits.detach().argmax(-1) == teacher_top1).sum().to(logits.dtype)  # ()

    loss_sum = (1.0 - lm_weight) * kd_sum + lm_weight * lm_sum
    return loss_sum, kd_sum.detach(), lm_sum.detach(), agree


# ---------------------------------------------------------------------------------------------------
# Fused path: loss and gradients in one forward pass, chunk by chunk
# ---------------------------------------------------------------------------------------------------
def _plain_linear(lm_head: nn.Module) -> tuple[Tensor, Tensor | None] | None:
    """``(weight, bias)`` when ``lm_head(x)`` is exactly ``F.linear(x, weight, bias)``, else None.

    The fused path reads the head's parameters and does the projection itself, so it only runs where that is what
    the module's forward would do: a plain ``nn.Linear`` (not a subclass) with no hooks and an ordinary weight.
    Everything else takes the checkpointed path, which calls the module.  In particular FSDP: an FSDP2
    (``fully_shard``) head is an ``FSDPLinear`` whose forward pre-hook all-gathers the DTensor weight and whose
    gradient is reduce-scattered by FSDP's post-backward hooks, which fire from the autograd graph of the module's
    own forward output; gradients handed to the unsharded weight from outside that graph are not ordered before
    the reduce-scatter, so the fused Function cannot feed them safely.  An FSDP1 head is a
    ``FullyShardedDataParallel`` wrapper.  Both therefore fall back to the checkpointed path (its backward
    recomputes the projection through the module, which FSDP handles).
    """
    if type(lm_head) is not nn.Linear:
        return None
    if lm_head._forward_hooks or lm_head._forward_pre_hooks or lm_head._backward_hooks or \
            lm_head._backward_pre_hooks:
        return None
    from torch.nn.modules import module as _module
    if _module._global_forward_hooks or _module._global_forward_pre_hooks:
        return None
    weight, bias = lm_head.weight, lm_head.bias
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        DTensor = ()
    if isinstance(weight, DTensor) or isinstance(bias, DTensor):
        return None
    return weight, bias


def _matmul_dtype(hidden: Tensor, weight: Tensor) -> torch.dtype:
    """The dtype ``F.linear(hidden, weight)`` computes in here: autocast's (bf16-mixed) where it is on and would
    cast these tensors, else the weight's."""
    device_type = weight.device.type
    if torch.is_autocast_enabled(device_type) and torch.float64 not in (hidden.dtype, weight.dtype):
        return torch.get_autocast_dtype(device_type)
    return weight.dtype


def _fused_sums(hidden: Tensor, labels: Tensor, teacher_values: Tensor | None, teacher_ids: Tensor | None,
                weight: Tensor, bias: Tensor | None, temperature: float, lm_weight: float, tail_bucket: bool,
                chunk_tokens: int, md: torch.dtype, need_hidden: bool, need_weight: bool, need_bias: bool):
    """Sums over every counted token (loss, kd, lm, #agreeing) and the gradients of the loss SUM with respect to
    ``hidden`` / ``weight`` / ``bias`` (None where not needed), computed chunk by chunk without autograd.

    Per token, with z the fp32 logits, s1 = softmax(z), sT = softmax(z / T), p the teacher's k probabilities at
    ids, P = sum_k p_k, q_k = sT[ids_k], Q = sum_k q_k (what :func:`_chunk_losses` computes), the gradient of the
    weighted loss with respect to z is

        w_lm * (s1 - onehot(label))
      + w_kd * T * ((P - r * Q) * sT - scatter(ids, p - r * q))       r = p_rest / (1 - Q)   (tail bucket, else 0)

    where w_lm = lm_weight (1 without a teacher), w_kd = 1 - lm_weight (T^2 of the KD term times 1/T of z / T);
    r is 0 where the clamp ``Q <= 1 - 1e-7`` is active, as autograd's clamp gives.  That [c, V] gradient is built
    in place in the buffer that held the logits and is turned into [c, H] / [V, H] / [V] gradients right away.
    ``md`` is the dtype of the projection and of the gradient matmuls (:func:`_matmul_dtype`); the caller runs
    this with autocast off, every cast being explicit here.
    """
    m_tokens, hidden_size = hidden.shape
    vocab = weight.shape[0]
    device = hidden.device
    has_teacher = teacher_values is not None
    cd = torch.float64 if md == torch.float64 else torch.float32  # what the softmax runs in (_upcast)
    acc = cd if md == cd else torch.float32  # accumulators of the [V, H] / [V] gradients
    w_lm = lm_weight if has_teacher else 1.0  # weights of the terms in the loss and of their gradients
    w_kd = 1.0 - lm_weight if has_teacher else 0.0
    need_grad = need_hidden or need_weight or need_bias
    w_md = weight.to(md)
    b_md = bias.to(md) if bias is not None else None

    d_hidden = torch.empty(m_tokens, hidden_size, dtype=hidden.dtype, device=device) if need_hidden else None
    d_weight = torch.zeros(vocab, hidden_size, dtype=acc, device=device) if need_weight else None
    d_bias = torch.zeros(vocab, dtype=acc, device=device) if need_bias and bias is not None else None
    zero = torch.zeros((), dtype=cd, device=device)
    if m_tokens == 0:  # nothing counted: zero sums, zero gradients
        grads = (d_hidden, d_weight.to(weight.dtype) if d_weight is not None else None,
                 d_bias.to(bias.dtype) if d_bias is not None else None)
        return (zero, zero.clone(), zero.clone(), zero.clone()), grads

    rows = min(chunk_tokens, m_tokens)
    z_buf = torch.empty(rows, vocab, dtype=cd, device=device)  # logits -> exp -> gradient, in place
    low_buf = torch.empty(rows, vocab, dtype=md, device=device) if md != cd else None  # bf16 logits / gradient
    two_pass = temperature != 1.0 and has_teacher  # softmax at T=1 (LM) and at T (KD): a second buffer
    e_buf = torch.empty(rows, vocab, dtype=cd, device=device) if two_pass else None

    loss_sum = kd_sum = lm_sum = agree_sum = None
    for start, end in _chunk_bounds(m_tokens, chunk_tokens):
        c = end - start
        h = hidden[start:end].to(md)  # (c, H)
        lab = labels[start:end]  # (c,)
        out = low_buf[:c] if low_buf is not None else z_buf[:c]
        if b_md is not None:
            torch.addmm(b_md, h, w_md.t(), out=out)  # (c, V)
        else:
            torch.mm(h, w_md.t(), out=out)
        z = z_buf[:c]
        if low_buf is not None:
            z.copy_(out)  # upcast, as _upcast does
        z_label = z.gather(1, lab.unsqueeze(1)).squeeze(1)  # (c,)
        z_max, z_argmax = z.max(dim=-1)  # (c,), (c,): the first maximum, as argmax
        shift = z_max.masked_fill(z_max.abs() == math.inf, 0.0)  # logsumexp's rule for infinite maxima
        if has_teacher:
            tv = teacher_values[start:end].to(cd)  # (c, k)
            ids = teacher_ids[start:end]  # (c, k)
            z_ids = z.gather(1, ids)  # (c, k)
        if two_pass:
            e1 = torch.sub(z, shift.unsqueeze(1), out=e_buf[:c]).exp_()  # (c, V) exp(z - max), z kept
        else:
            e1 = z.sub_(shift.unsqueeze(1)).exp_()  # (c, V), in place: z is not needed any more
        s1 = e1.sum(-1)  # (c,)
        lse = s1.log() + shift  # (c,)
        lm_c = (lse - z_label).sum()  # ()

        if not has_teacher:
            loss_c, kd_c, agree_c = lm_c, zero, zero
            g = e1  # softmax - onehot(label), built below
            if need_grad:
                g.mul_(s1.reciprocal().unsqueeze(1))
                g.scatter_add_(1, lab.unsqueeze(1), torch.full((c, 1), -1.0, dtype=cd, device=device))
        else:
            if tail_bucket:  # values are already full-vocabulary log-probabilities at T
                log_p = tv
            else:
                log_p = torch.log_softmax(tv / temperature, dim=-1)  # (c, k)
            p = log_p.exp()  # (c, k)
            if two_pass:
                z.div_(temperature)  # z / T, as the reference's tempered logits
                shift_t = torch.div(z_max, temperature)  # max(z / T): division by T > 0 is monotone
                shift_t = shift_t.masked_fill(shift_t.abs() == math.inf, 0.0)
                e_t = z.sub_(shift_t.unsqueeze(1)).exp_()  # (c, V)
                s_t = e_t.sum(-1)  # (c,)
                lse_t = s_t.log() + shift_t  # (c,)
                log_q = z_ids / temperature - lse_t.unsqueeze(-1)  # (c, k)
            else:
                e_t, s_t = e1, s1
                log_q = z_ids - lse.unsqueeze(-1)  # (c, k)
            kd_tok = (torch.special.xlogy(p, p) - p * log_q).sum(-1)  # (c,)
            if tail_bucket:
                p_rest = (1.0 - p.sum(-1)).clamp_min(0.0)  # (c,)
                q = log_q.exp()  # (c, k)
                q_mass = q.sum(-1)  # (c,)
                q_clamped = q_mass.clamp(max=REST_CLAMP)
                kd_tok = kd_tok + torch.special.xlogy(p_rest, p_rest) - p_rest * torch.log1p(-q_clamped)
            kd_c = (temperature**2) * kd_tok.sum()  # ()
            top1 = ids.gather(-1, tv.argmax(-1, keepdim=True)).squeeze(-1)  # (c,)
            agree_c = (z_argmax == top1).sum().to(cd)  # ()
            loss_c = (1.0 - lm_weight) * kd_c + lm_weight * lm_c

            if need_grad:
                coef_soft = p.sum(-1)  # (c,) P
                at_ids = p  # (c, k), subtracted at the teacher's ids
                if tail_bucket:
                    rest = torch.where(q_mass <= REST_CLAMP, p_rest / (1.0 - q_clamped), torch.zeros_like(p_rest))
                    coef_soft = coef_soft - rest * q_mass
                    at_ids = p - rest.unsqueeze(-1) * q
                kd_scale = w_kd * temperature
                if not two_pass:  # one softmax for both terms
                    g = e1.mul_(((w_lm + kd_scale * coef_soft) / s1).unsqueeze(1))
                elif w_lm > 0.0:
                    g = e1.mul_((w_lm / s1).unsqueeze(1)).addcmul_(e_t, (kd_scale * coef_soft / s_t).unsqueeze(1))
                else:
                    g = e_t.mul_((kd_scale * coef_soft / s_t).unsqueeze(1))
                if kd_scale != 0.0:
                    g.scatter_add_(1, ids, at_ids * -kd_scale)
                if w_lm != 0.0:
                    g.scatter_add_(1, lab.unsqueeze(1), torch.full((c, 1), -w_lm, dtype=cd, device=device))

        if need_grad:  # g: (c, V) gradient of this chunk's loss sum w.r.t. its logits
            g_md = low_buf[:c].copy_(g) if low_buf is not None else g
            if d_hidden is not None:
                if md == d_hidden.dtype:
                    torch.mm(g_md, w_md, out=d_hidden[start:end])  # (c, H)
                else:
                    d_hidden[start:end] = torch.mm(g_md, w_md)
            if d_weight is not None:
                if md == acc:
                    d_weight.addmm_(g_md.t(), h)  # (V, H)
                else:
                    d_weight.add_(torch.mm(g_md.t(), h))
            if d_bias is not None:
                d_bias.add_(g.sum(0))  # (V,)
        if loss_sum is None:
            loss_sum, kd_sum, lm_sum, agree_sum = loss_c, kd_c, lm_c, agree_c
        else:
            loss_sum, kd_sum, lm_sum, agree_sum = loss_sum + loss_c, kd_sum + kd_c, lm_sum + lm_c, agree_sum + agree_c
    del z_buf, low_buf, e_buf
    if not has_teacher:  # four distinct outputs (the Function marks the last three non-differentiable)
        loss_sum, kd_sum, agree_sum = lm_sum.clone(), zero, zero.clone()
    grads = (d_hidden,
             (d_weight if d_weight.dtype == weight.dtype else d_weight.to(weight.dtype)) if d_weight is not None else None,
             (d_bias if d_bias.dtype == bias.dtype else d_bias.to(bias.dtype)) if d_bias is not None else None)
    return (loss_sum, kd_sum, lm_sum, agree_sum), grads


class _FusedLinearKD(torch.autograd.Function):
    """``(loss_sum, kd_sum, lm_sum, agree_sum)`` of the counted tokens; only ``loss_sum`` is differentiable.

    The forward computes the gradients too (:func:`_fused_sums`) and keeps them on ``ctx``; backward multiplies
    them by ``grad_output`` in place and hands them out once (a second backward through the same graph, i.e.
    ``retain_graph=True``, is refused rather than silently wrong)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, teacher_values, teacher_ids, temperature, lm_weight,
                tail_bucket, chunk_tokens, md):
        need = ctx.needs_input_grad
        sums, grads = _fused_sums(hidden, labels, teacher_values, teacher_ids, weight, bias, temperature,
                                  lm_weight, tail_bucket, chunk_tokens, md, need_hidden=need[0],
                                  need_weight=need[1], need_bias=need[2] and bias is not None)
        ctx.grads = grads
        ctx.mark_non_differentiable(*sums[1:])
        return sums

    @staticmethod
    def backward(ctx, grad_loss, *_):
        grads = ctx.grads
        if grads is None:
            raise RuntimeError("the fused distillation loss was backpropagated twice (retain_graph=True); its "
                               "gradients are handed out once: use distill_loss(..., fused=False) for that")
        ctx.grads = None
        scaled = tuple(g.mul_(grad_loss.to(g.dtype)) if g is not None else None for g in grads)
        return (*scaled, None, None, None, None, None, None, None, None)


def distill_loss(
    student_hidden: Tensor,
    lm_head: nn.Module,
    labels: Tensor,
    teacher_values: Tensor | None,
    teacher_ids: Tensor | None,
    cfg: KDConfig,
    fused: bool | None = None,
) -> DistillOutput:
    """Chunked top-k KD + LM loss of the student.

    Definition (T = ``cfg.temperature``, sums over the teacher's k ids):

        p_k      = softmax(teacher_values / T)_k            # renormalised over the top-k
        log q_k  = log_softmax(student_logits / T)[ids_k]    # over the FULL vocabulary
        kd       = T^2 * sum_k p_k * (log p_k - log q_k)     # KL(teacher || student) on top-k support
        lm       = cross_entropy(student_logits, labels)     # no temperature
        loss     = (1 - lm_weight) * kd + lm_weight * lm     # with a teacher
        loss     = lm                                        # without a teacher

    ``kd`` and ``lm`` are means over the tokens whose label != -100 (ignored tokens are
    skipped entirely, also for the KD term).  ``student_logits = lm_head(hidden)`` is
    computed in (at least) float32, ``cfg.chunk_tokens`` tokens at a time; per-chunk
    sums are divided by the token count once at the end, so the chunk size does not
    change the result.  When no token is counted every output is 0 (the loss is still
    attached to the graph, so ``backward()`` works and yields zero gradients).

    Two implementations give the same values and gradients (within float rounding): the
    fused one (default where ``lm_head`` is a plain ``nn.Linear``) computes every chunk's
    gradients in the forward pass and never recomputes the projection; the checkpointed
    one (``fused=False``, and for FSDP-sharded or hooked heads) recomputes each chunk's
    logits in backward.  The fused loss supports one backward per forward.

    Args:
        student_hidden: ``(N, H)`` final hidden states, already flattened over ``B*T``
            (a ``(..., H)`` input is flattened here).
        lm_head: student vocabulary projection ``H -> V`` (bias allowed).
        labels: ``(N,)`` target ids, already aligned with ``student_hidden`` (i.e.
            shifted for next-token prediction by the caller), -100 = ignore.
        teacher_values: ``(N, k)`` raw teacher logits at its top-k ids (from
            :func:`teacher_topk`), or None for plain LM training.  k is taken from
            this tensor (normally ``cfg.top_k``).
        teacher_ids: ``(N, k)`` int64 vocabulary ids matching ``teacher_values``, or None.
        cfg: :class:`KDConfig`.
        fused: None (default) = fused where the head allows it; False = the checkpointed
            path; True = fused, an error if the head does not allow it.
    """
    if (teacher_values is None) != (teacher_ids is None):
        raise ValueError("teacher_values and teacher_ids must be given together (or both be None)")
    hidden = student_hidden.reshape(-1, student_hidden.shape[-1])  # (N, H)
    labels = labels.reshape(-1)  # (N,)
    n = hidden.shape[0]
    if labels.shape[0] != n:
        raise ValueError(f"labels has {labels.shape[0]} tokens but student_hidden has {n}")
    has_teacher = teacher_values is not None
    if has_teacher:
        k = teacher_values.shape[-1]
        teacher_values = teacher_values.reshape(-1, k)  # (N, k)
        teacher_ids = teacher_ids.reshape(-1, teacher_ids.shape[-1]).long()  # (N, k)
        if teacher_values.shape != (n, k) or teacher_ids.shape != (n, k):
            raise ValueError(
                f"teacher_values {tuple(teacher_values.shape)} / teacher_ids {tuple(teacher_ids.shape)} "
                f"must both be (N, k) with N={n}"
            )
    params = _plain_linear(lm_head) if fused is not False else None
    if fused and params is None:
        raise ValueError(f"fused=True needs a plain nn.Linear head without hooks, got {type(lm_head).__name__}")

    # Drop ignored tokens up front: prompt / padding positions can be a large share of
    # the batch and would otherwise pay for a full vocabulary projection for nothing.
    counted = labels != IGNORE_INDEX  # (N,)
    num_tokens = int(counted.sum().item())
    if num_tokens != n:
        idx = counted.nonzero().squeeze(-1)  # (M,)
        hidden = hidden.index_select(0, idx)  # (M, H)
        labels = labels.index_select(0, idx)  # (M,)
        if has_teacher:
            teacher_values = teacher_values.index_select(0, idx)  # (M, k)
            teacher_ids = teacher_ids.index_select(0, idx)  # (M, k)

    lm_weight = float(cfg.lm_weight)
    temperature = float(cfg.temperature)
    if params is not None:
        weight, bias = params
        md = _matmul_dtype(hidden, weight)  # bf16 under bf16-mixed autocast, as lm_head(hidden) would run
        args = (temperature, lm_weight, bool(cfg.tail_bucket), int(cfg.chunk_tokens), md)
        with torch.autocast(hidden.device.type, enabled=False):  # every cast in _fused_sums is explicit
            if torch.is_grad_enabled():
                loss_sum, kd_sum, lm_sum, agree_sum = _FusedLinearKD.apply(
                    hidden, weight, bias, labels, teacher_values, teacher_ids, *args)
            else:
                (loss_sum, kd_sum, lm_sum, agree_sum), _ = _fused_sums(
                    hidden, labels, teacher_values, teacher_ids, weight, bias, *args, False, False, False)
    else:
        loss_sum, kd_sum, lm_sum, agree_sum = _checkpointed_sums(
            hidden, labels, teacher_values, teacher_ids, lm_head, temperature, lm_weight, cfg)

    denom = max(num_tokens, 1)  # all ignored -> sums are 0 -> outputs 0, not NaN
    agreement = agree_sum / denom if has_teacher else torch.full_like(lm_sum, float("nan"))
    return DistillOutput(
        loss=loss_sum / denom,
        kd_loss=kd_sum.detach() / denom,
        lm_loss=lm_sum.detach() / denom,
        agreement=agreement.detach(),
        num_tokens=num_tokens,
    )


def _checkpointed_sums(hidden, labels, teacher_values, teacher_ids, lm_head, temperature, lm_weight, cfg):
    """The previous path: every chunk under non-reentrant activation checkpointing."""
    has_teacher = teacher_values is not None
    num_tokens = hidden.shape[0]
    use_ckpt = torch.is_grad_enabled()
    # With M == 0 a single empty chunk still runs, so that the zero loss is attached
    # to the student graph (and backward gives zero grads instead of an error).
    bounds = _chunk_bounds(num_tokens, cfg.chunk_tokens) or [(0, 0)]

    loss_sum = kd_sum = lm_sum = agree_sum = None
    for start, end in bounds:
        args = (
            hidden[start:end],  # (c, H)
            labels[start:end],  # (c,)
            teacher_values[start:end] if has_teacher else None,  # (c, k)
            teacher_ids[start:end] if has_teacher else None,  # (c, k)
        )
        if use_ckpt:
            # Non-reentrant checkpoint: saves only the chunk inputs; the (c, V) logits
            # are recomputed in backward, one chunk at a time.  lm_head's parameters
            # are reached through the closure and still receive gradients.
            out = checkpoint(_chunk_losses, *args, lm_head, temperature, lm_weight, cfg.tail_bucket,
                             use_reentrant=False)
        else:
            out = _chunk_losses(*args, lm_head, temperature, lm_weight, cfg.tail_bucket)
        if loss_sum is None:
            loss_sum, kd_sum, lm_sum, agree_sum = out
        else:
            loss_sum = loss_sum + out[0]
            kd_sum = kd_sum + out[1]
            lm_sum = lm_sum + out[2]
            agree_sum = agree_sum + out[3]
    return loss_sum, kd_sum, lm_sum, agree_sum
