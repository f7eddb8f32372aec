"""Hugging Face export: save, reload with stock ``from_pretrained``, check identical logits, then rename.

An export directory only ever appears complete: it is written under ``<dir>.tmp`` and renamed into
place after the reload check, so a kill mid-export leaves the previous export (if any) untouched.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM


class ExportMismatchError(RuntimeError):
    """A saved model did not reload to the same logits."""


def replace_dir(tmp: Path, final: Path) -> None:
    old = final.with_name(final.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old)


@torch.no_grad()
def check_reload(model: nn.Module, directory: Path, probe_ids: torch.Tensor) -> None:
    """Reload ``directory`` with stock transformers and require bit-identical logits on ``probe_ids``."""
    reloaded = AutoModelForCausalLM.from_pretrained(directory, dtype=next(model.parameters()).dtype).eval()
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        expected = model(input_ids=probe_ids.to(device)).logits.cpu()
    finally:
        model.train(was_training)
    got = reloaded(input_ids=probe_ids).logits
    if not torch.equal(expected, got):
        diff = (expected.float() - got.float()).abs().max().item()
        raise ExportMismatchError(f"export {directory} reloads to different logits (max |diff| {diff:.3e})")


def export_hf(model: nn.Module, out_dir: str | Path, tokenizer=None, probe_ids: torch.Tensor | None = None,
              extra_files: dict[str, str] | None = None) -> Path:
    """Write ``model`` (+ tokenizer, + extra text files) as an HF dir at ``out_dir``, verified, atomically."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    for name, text in (extra_files or {}).items():
        (tmp / name).write_text(text)
    if probe_ids is not None:
        check_reload(model, tmp, probe_ids)
    replace_dir(tmp, out_dir)
    return out_dir


# A sharded export is also reloaded with stock ``from_pretrained`` (on every rank, whole) up to this size; above
# it the check reads back each rank's own rows through loading.py instead (never the whole model on a rank).
STOCK_RELOAD_CHECK_MAX_BYTES = 2 * 2**30


def export_sharded_hf(model: nn.Module, out_dir: str | Path, tokenizer=None, extra_files: dict[str, str] | None = None,
                      max_shard_bytes: int = 2 * 2**30,
                      stock_check_max_bytes: int = STOCK_RELOAD_CHECK_MAX_BYTES) -> Path:
    """Write an FSDP2-sharded ``model`` as a stock HF dir at ``out_dir`` without gathering it on any rank.

    Collective: every rank calls it. Tensor by tensor, in the same order on every rank, ``full_tensor()``
    all-gathers one tensor; rank 0 converts it to the layout ``save_pretrained`` writes (transformers' own
    ``revert_weight_conversion``: fused experts back to per-expert keys) and appends it to a safetensors shard
    (streaming.py's writer), then writes config, generation config and tokenizer. Rank 0's extra memory is one
    full tensor plus one output shard (``max_shard_bytes``).

    Checked before the directory is renamed into place: every rank reads its own rows of every tensor back
    through :mod:`lightning_slimmoe.loading` and requires them bit-identical to its shards (bounded memory);
    for a model of at most ``stock_check_max_bytes``, every rank also reloads the directory with stock
    ``AutoModelForCausalLM.from_pretrained`` and compares its shards with that model's tensors. Bigger models
    skip the stock reload (it would hold the whole model on each rank); ``tests/test_loading.py`` proves that
    loading.py reads what ``from_pretrained`` reads. Unlike :func:`export_hf` the check compares parameters,
    not logits: a sharded forward in a lower ``param_dtype`` would not match an fp32 reload bit for bit.
    """
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor
    from transformers.core_model_loading import revert_weight_conversion

    from lightning_slimmoe.loading import persistent_tensors
    from lightning_slimmoe.streaming import _ShardWriter

    rank = dist.get_rank() if dist.is_initialized() else 0
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    writer = None
    if rank == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        writer = _ShardWriter(tmp, max_shard_bytes)
    total_bytes = 0
    with torch.no_grad():
        for name, tensor in persistent_tensors(model):
            full = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor  # collective: one tensor
            total_bytes += full.numel() * full.element_size()
            if writer is not None:
                for key, piece in revert_weight_conversion(model, {name: full.detach().cpu()}).items():
                    writer.add(key, piece)
            del full
    if writer is not None:
        writer.finish()
        # What save_pretrained records besides the weights.
        model.config.dtype = str(model.dtype).split(".")[1]
        model.config.architectures = [type(model).__name__.removeprefix("FSDP")]
        model.config.save_pretrained(tmp)
        if model.can_generate():
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    if dist.is_initialized():
        dist.barrier()
    problem = _check_export_shards(model, tmp, stock=total_bytes <= stock_check_max_bytes)
    failed = torch.tensor([0 if problem is None else 1])
    if dist.is_initialized():
        dist.all_reduce(failed, op=dist.ReduceOp.MAX)  # every rank fails together, none waits forever
    if problem is not None:
        raise ExportMismatchError(f"export {tmp} (rank {rank}): {problem}")
    if int(failed):
        raise ExportMismatchError(f"export {tmp}: another rank found a mismatch (see its error)")
    if rank == 0:
        replace_dir(tmp, out_dir)
    if dist.is_initialized():
        dist.barrier()
    return out_dir


@torch.no_grad()
def _check_export_shards(model: nn.Module, directory: Path, stock: bool) -> str | None:
    """None if this rank's rows of every tensor read back bit-identically from ``directory``, else what differs."""
    from lightning_slimmoe.distributed import local_rows
    from lightning_slimmoe.loading import CheckpointReader, persistent_tensors

    reference = None
    if stock:
        reference = AutoModelForCausalLM.from_pretrained(directory, dtype=model.dtype).state_dict()
    with CheckpointReader(directory, model) as reader:
        for name, tensor in persistent_tensors(model):
            local, start, stop = local_rows(tensor)
            for offset, block in reader.blocks(name, tensor, start, stop):
                mine = local if local.dim() == 0 else local[offset:offset + block.shape[0]]
                if block.shape != mine.shape or not torch.equal(block.to(mine.device, mine.dtype), mine):
                    return f"{name} rows {start + offset}.. read back differently"
            if reference is not None:
                theirs = reference.get(name)
                if theirs is None or not torch.equal(theirs[start:stop] if theirs.dim() else theirs, local.cpu()):
                    return f"stock from_pretrained reloads {name} differently"
    return None


def _fmt(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def model_card(summary: dict) -> str:
    """README.md of ``final/``: where it came from, the stage table, how to load it."""
    teacher = summary["teacher"]
    rows = "\n".join(
        f"| {s['name']} | {s['expert_width']} | {s['num_attention_heads']}/{s['num_key_value_heads']} | "
        f"{_fmt(s['total_params'])} | {_fmt(s['active_params'])} | {s['tokens']:,} | "
        f"{s['val_ppl']:.3f} | {s.get('teacher_top1_agreement') if s.get('teacher_top1_agreement') is not None else '-'} |"
        for s in summary["stages"])
    return f"""---
library_name: transformers
tags: [moe, slimmoe, distillation, pruning]
---
# SlimMoE-compressed model

Compressed with [lightning_slimmoe](https://arxiv.org/abs/2506.18349)-style expert slimming and knowledge
distillation from the teacher `{teacher.get('source')}` ({_fmt(teacher['total_params'])} total /
{_fmt(teacher['active_params'])} active parameters, validation perplexity {teacher.get('val_ppl', float('nan')):.3f}).

| stage | expert width | heads (q/kv) | total | active | tokens | val ppl | teacher top-1 agreement |
|---|---|---|---|---|---|---|---|
{rows}

## Load
```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("path/to/final")
tokenizer = AutoTokenizer.from_pretrained("path/to/final")
```
The checkpoint is a stock `{summary['stages'][-1].get('model_type', '')}` model: no custom code is needed.

Run configuration: see `summary.json` beside this directory.
<!-- {json.dumps({'final_widths': summary['stages'][-1].get('expert_width')})} -->
"""
