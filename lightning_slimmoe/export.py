"""The export of a stage's student as a stock Hugging Face model dir, checked before it appears, and its model card.

A whole model is written with ``save_pretrained`` and reloaded with stock ``from_pretrained`` to identical
logits (:func:`export_hf`); a sharded one tensor by tensor through the HF-directory writer (hf_dir.py) and read
back (:func:`export_sharded_hf`). Either way the directory only ever appears complete: it is written under
``<dir>.tmp`` and renamed into place after the check (storage.py), so a kill mid-export leaves the previous
export (if any) untouched.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM

from lightning_slimmoe import storage
from lightning_slimmoe.distributed import local_rows
from lightning_slimmoe.families import family_of_type, get_family
from lightning_slimmoe.hf_dir import (HFDirWriter, export_architecture, read_back_problem, save_tokenizer,
                                      write_serving_fields)
from lightning_slimmoe.models import persistent_tensors


class ExportMismatchError(RuntimeError):
    """A saved model did not reload to the same logits."""


# Beside the weights of every export (and so in final/, wherever it is copied): how the model was trained, for
# `slimmoe eval`'s default window. Not in config.json, which transformers owns.
TRAINING_FILE = "slimmoe.json"


def training_file_text(seq_len: int, stage: str) -> str:
    """The text of :data:`TRAINING_FILE`: the stage that made the weights and the sequence length it trained at."""
    return json.dumps({"written_by": "lightning_slimmoe", "stage": stage, "seq_len": seq_len}, indent=2) + "\n"


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
        raise ExportMismatchError(f"export {directory} reloads to different logits (max |diff| {diff:.3e}); "
                                  f"{tensor_differences(model, reloaded)}")


def tensor_differences(model: nn.Module, reloaded: nn.Module, limit: int = 5) -> str:
    """What differs between a model and its reload, tensor by tensor (every parameter and buffer, the derived ones
    too): names missing on either side, dtypes, shapes, values; for an :class:`ExportMismatchError` to say why."""
    ours = dict(model.named_parameters())
    ours.update(model.named_buffers())
    theirs = dict(reloaded.named_parameters())
    theirs.update(reloaded.named_buffers())
    found = [f"{name}: only in the trained model" for name in ours if name not in theirs]
    found += [f"{name}: only in the reload" for name in theirs if name not in ours]
    for name in ours.keys() & theirs.keys():
        a, b = ours[name].detach(), theirs[name].detach()
        if a.dtype != b.dtype:
            found.append(f"{name}: {str(a.dtype).removeprefix('torch.')} trained, "
                         f"{str(b.dtype).removeprefix('torch.')} reloaded")
        elif a.shape != b.shape:
            found.append(f"{name}: shape {tuple(a.shape)} trained, {tuple(b.shape)} reloaded")
        elif not torch.equal(a.cpu(), b.cpu()):
            found.append(f"{name}: values differ (max |diff| {(a.cpu().float() - b.cpu().float()).abs().max():.3e})")
    if not found:
        return "every parameter and buffer is equal in name, dtype and value (the forward itself differs)"
    found.sort()
    return "differences: " + "; ".join(found[:limit]) + (f"; and {len(found) - limit} more" if len(found) > limit else "")


def export_hf(model: nn.Module, out_dir: str | Path, tokenizer=None, probe_ids: torch.Tensor | None = None,
              extra_files: dict[str, str] | None = None, max_shard_bytes: int | None = None) -> Path:
    """Write ``model`` (+ tokenizer, + extra text files) as an HF dir at ``out_dir``, verified, atomically;
    ``max_shard_bytes``: the size of one safetensors shard (default: transformers')."""
    out_dir = Path(out_dir)
    architecture = export_architecture(model)  # before save_pretrained overwrites config.architectures
    with storage.atomic_dir(out_dir, what="HF export") as tmp:
        model.save_pretrained(tmp, safe_serialization=True,
                              **({} if max_shard_bytes is None else {"max_shard_size": max_shard_bytes}))
        write_serving_fields(tmp, architecture)  # as vLLM / llama.cpp take a hub config (hf_dir.py)
        if tokenizer is not None:
            save_tokenizer(tokenizer, tmp)  # with the vocabulary files GGUF converters read (hf_dir.py)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        if probe_ids is not None:
            check_reload(model, tmp, probe_ids)
    return out_dir


# A sharded export is also reloaded with stock ``from_pretrained`` (on every rank, whole) up to this size; above
# it the check reads back each rank's own rows only (never the whole model on a rank).
STOCK_RELOAD_CHECK_MAX_BYTES = 2 * 2**30


def export_sharded_hf(model: nn.Module, out_dir: str | Path, tokenizer=None, extra_files: dict[str, str] | None = None,
                      max_shard_bytes: int = 2 * 2**30,
                      stock_check_max_bytes: int = STOCK_RELOAD_CHECK_MAX_BYTES) -> Path:
    """Write an FSDP2-sharded ``model`` as a stock HF dir at ``out_dir`` without gathering it on any rank.

    Collective: every rank calls it. Tensor by tensor, in the same order on every rank, ``full_tensor()``
    all-gathers one tensor and rank 0 hands it to the HF-directory writer (hf_dir.py). Rank 0's extra memory is
    one full tensor plus one output shard (``max_shard_bytes``).

    Checked before the directory is renamed into place: every rank reads its own rows of every tensor back
    (:func:`lightning_slimmoe.hf_dir.read_back_problem`, bounded memory) and requires them bit-identical to its
    shards; for a model of at most ``stock_check_max_bytes``, every rank also reloads the directory with stock
    ``AutoModelForCausalLM.from_pretrained`` and compares its shards with that model's tensors. Bigger models
    skip the stock reload (it would hold the whole model on each rank); ``tests/test_loading.py`` proves that
    the reader reads what ``from_pretrained`` reads. Unlike :func:`export_hf` the check compares parameters,
    not logits: a sharded forward in a lower ``param_dtype`` would not match an fp32 reload bit for bit.
    """
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    rank = dist.get_rank() if dist.is_initialized() else 0
    writer = HFDirWriter(out_dir, model, max_shard_bytes) if rank == 0 else None
    tmp = Path(out_dir).with_name(Path(out_dir).name + ".tmp")
    total_bytes = 0
    with torch.no_grad():
        for name, tensor in persistent_tensors(model):
            full = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor  # collective: one tensor
            total_bytes += full.numel() * full.element_size()
            if writer is not None:
                writer.add(name, full.detach().cpu())
            del full
    if writer is not None:
        writer.finish(model.config, model.dtype, tokenizer=tokenizer, extra_files=extra_files)
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
    if writer is not None:
        writer.commit()
    if dist.is_initialized():
        dist.barrier()
    return Path(out_dir)


@torch.no_grad()
def _check_export_shards(model: nn.Module, directory: Path, stock: bool) -> str | None:
    """None if this rank's rows of every tensor read back bit-identically from ``directory``, else what differs."""
    def local_parts():
        for name, tensor in persistent_tensors(model):
            local, start, _ = local_rows(tensor)
            yield name, tensor, local, start

    problem = read_back_problem(directory, model, local_parts())
    if problem is not None or not stock:
        return problem
    reference = AutoModelForCausalLM.from_pretrained(directory, dtype=model.dtype).state_dict()
    for name, tensor, local, start in local_parts():
        theirs = reference.get(name)
        stop = start + (local.shape[0] if local.dim() else 1)
        if theirs is None or not torch.equal(theirs[start:stop] if theirs.dim() else theirs, local.cpu()):
            return f"stock from_pretrained reloads {name} differently"
    return None


def _fmt(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def dropped_parts(teacher_config) -> dict:
    """summary.json's record of what the teacher's hub checkpoint holds that the export leaves out: ``{"mtp":
    "dropped"}`` for a teacher whose config counts multi-token-prediction layers (``mtp.*``, or DeepSeek-V3 / GLM's
    ``model.layers.<num_hidden_layers>``) that transformers does not build, so they are
    neither slimmed nor exported; nothing for the others (their summary keeps exactly its keys)."""
    return {"mtp": "dropped"} if get_family(teacher_config).mtp_layers(teacher_config) else {}


def _export_notes(summary: dict) -> str:
    family = family_of_type(summary["stages"][-1].get("model_type", ""))
    notes = [family.export_note] if family is not None and family.export_note else []
    if summary.get("mtp") == "dropped":
        notes.append("The teacher's multi-token-prediction (MTP) layers were not slimmed and are not part of this "
                     "checkpoint (`summary.json`: `\"mtp\": \"dropped\"`): speculative decoding with MTP is "
                     "not available for it.")
    return "".join(f"\n{note}\n" for note in notes)


def _training_section(stages, seq_len: int | None) -> str:
    """How each stage was pruned and trained (the recipe's settings), for a card that travels without the run."""
    if not stages:
        return ""
    rows = []
    for stage in stages:
        if stage.pretrain is not None:
            how = "from scratch, LM loss | - | - | -"
        else:
            kd = stage.kd
            how = (f"KD from the teacher{f' + {kd.lm_weight:g} LM' if kd.lm_weight else ''} | {kd.top_k} | "
                   f"{kd.temperature:g} | {'yes' if kd.tail_bucket else 'no'}")
        pruned = (f"{stage.criterion} on {stage.calibration_tokens:,} tokens" if stage.prunes and not stage.scores_file
                  else f"{stage.criterion} (saved scores)" if stage.prunes else "-")
        rows.append(f"| {stage.name} | {pruned} | {how} | {stage.optimizer.lr:g} |")
    return f"""
## How it was trained
Sequences of {seq_len if seq_len else '?'} tokens. The stages ran in order; a pruning stage cut the model once at
its start (its criterion picked the neurons and KV groups to keep), then trained as its row says (KD from the
original teacher's top-k; the rest-mass bucket adds the teacher's probability outside its top-k as one more class):

| stage | pruned by | training | KD top-k | temperature | rest-mass bucket | lr |
|---|---|---|---|---|---|---|
""" + "\n".join(rows) + "\n"


def model_card(summary: dict, stages=None, seq_len: int | None = None) -> str:
    """README.md of ``final/``: where it came from, the stage table, how each stage was trained (``stages``: the
    recipe's stage configs; ``seq_len``: the training sequence length), how to load it. Everything it says is in the
    card itself: ``final/`` is often copied away from its run (and its summary.json)."""
    teacher = summary["teacher"]

    def agreement(stage: dict) -> str:
        value = stage.get("teacher_top1_agreement")
        return "-" if value is None else f"{value:.3f}"

    rows = "\n".join(
        f"| {s['name']} | {s['expert_width']} | {s['num_attention_heads']}/{s['num_key_value_heads']} | "
        f"{_fmt(s['total_params'])} | {_fmt(s['active_params'])} | {s['tokens']:,} | "
        f"{s['val_ppl']:.3f} | {agreement(s)} |"
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
{_training_section(stages, seq_len)}
## Load
```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("path/to/final")
tokenizer = AutoTokenizer.from_pretrained("path/to/final")
```
The checkpoint is a stock `{summary['stages'][-1].get('model_type', '')}` model: no custom code is needed.
{_export_notes(summary)}"""
