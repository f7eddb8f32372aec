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
