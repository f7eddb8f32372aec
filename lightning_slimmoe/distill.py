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
* ``distill_loss`` projects the student's hidden states chunk by chunk, and wraps
  every chunk in ``torch.utils.checkpoint.checkpoint(use_reentrant=False)``: the
  chunk's ``[chunk, V]`` logits are *not* saved for backward, only its
  ``[chunk, H]`` input is; backward recomputes the chunk's logits right before it
  needs them.  So at most one ``[chunk, V]`` fp32 logits tensor (plus its
  transient gradient) exists at any time, forward or backward.

Per-chunk results are *sums*; they are divided by the total number of counted
tokens once at the end, so the chunk size never changes the value of the loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100

__all__ = [
    "IGNORE_INDEX",
    "KDConfig",
    "DistillOutput",
    "teacher_topk",
    "distill_loss",
]


@dataclass
class KDConfig:
    """Distillation settings (plain typed fields so jsonargparse can fill them from YAML).

    Attributes:
        top_k: number of teacher logits kept per token; the KL is taken over these ids.
            SlimMoE uses 8.
        temperature: softmax temperature T applied to both teacher and student for the
            KD term; the KD term is scaled by T^2 so its gradient magnitude does not
            shrink as T grows (Hinton et al., 2015).
        lm_weight: ``loss = (1 - lm_weight) * kd + lm_weight * lm``.  0 is pure KD (the
            paper's recovery objective), 1 is plain next-token LM training.
        chunk_tokens: tokens per chunk of the vocabulary projection; bounds the size of
            the largest live fp32 tensor to ``chunk_tokens * V``.
        tail_bucket: off (default) = the teacher is renormalised over its top-k ids. On =
            the teacher's top-k probabilities are taken from its *full* softmax and the
            mass outside them becomes one extra "rest" bucket matched against the
            student's rest mass, so the student is not pushed to put all its probability
            on k ids (with a weak teacher that ruins held-out perplexity; see
            docs/results.md). With ``top_k = V`` both equal full-vocabulary KL.
    """

    top_k: int = 8
    temperature: float = 1.0
    lm_weight: float = 0.0
    chunk_tokens: int = 1024
    tail_bucket: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1:
            raise ValueError(f"KDConfig.top_k={self.top_k!r} is invalid: must be an integer >= 1")
        if isinstance(self.chunk_tokens, bool) or not isinstance(self.chunk_tokens, int) or self.chunk_tokens < 1:
            raise ValueError(
                f"KDConfig.chunk_tokens={self.chunk_tokens!r} is invalid: must be an integer >= 1"
            )
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(
                f"KDConfig.temperature={self.temperature!r} is invalid: must be a finite number > 0"
            )
        if not (isinstance(self.lm_weight, (int, float)) and 0.0 <= self.lm_weight <= 1.0):
            raise ValueError(f"KDConfig.lm_weight={self.lm_weight!r} is invalid: must satisfy 0 <= lm_weight <= 1")


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
        log_q_rest = torch.log1p(-log_q.exp().sum(-1).clamp(max=1.0 - 1e-7))  # (c,)
        kd_per_token = kd_per_token + torch.special.xlogy(p_rest, p_rest) - p_rest * log_q_rest
    kd_sum = (temperature**2) * kd_per_token.sum()  # ()

    # Agreement: student argmax vs the teacher's top-1 id (argmax over values, so the
    # ids need not be sorted).
    teacher_top1 = teacher_ids.gather(-1, teacher_values.argmax(-1, keepdim=True)).squeeze(-1)  # (c,)
    agree = (logits.detach().argmax(-1) == teacher_top1).sum().to(logits.dtype)  # ()

    loss_sum = (1.0 - lm_weight) * kd_sum + lm_weight * lm_sum
    return loss_sum, kd_sum.detach(), lm_sum.detach(), agree


def distill_loss(
    student_hidden: Tensor,
    lm_head: nn.Module,
    labels: Tensor,
    teacher_values: Tensor | None,
    teacher_ids: Tensor | None,
    cfg: KDConfig,
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
    computed in (at least) float32, ``cfg.chunk_tokens`` tokens at a time, each chunk
    under activation checkpointing so the ``(chunk, V)`` logits are recomputed in
    backward rather than stored; per-chunk sums are divided by the token count once
    at the end, so the chunk size does not change the result.  When no token is
    counted every output is 0 (the loss is still attached to the graph, so
    ``backward()`` works and yields zero gradients).

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

    denom = max(num_tokens, 1)  # all ignored -> sums are 0 -> outputs 0, not NaN
    agreement = agree_sum / denom if has_teacher else torch.full_like(lm_sum, float("nan"))
    return DistillOutput(
        loss=loss_sum / denom,
        kd_loss=kd_sum / denom,
        lm_loss=lm_sum / denom,
        agreement=agreement.detach(),
        num_tokens=num_tokens,
    )
