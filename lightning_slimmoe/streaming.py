"""Slice an HF safetensors checkpoint to a slim one tensor by tensor, never loading the model.

For models that do not fit one host's memory (Phi-3.5-MoE is 84 GB in bf16), the slice between stages
is done on disk: each tensor is read, gathered with the same keep indices as
:func:`lightning_slimmoe.slimming.slim_model_`, and appended to an output shard; peak memory is one
input tensor plus one output shard (``max_shard_bytes``). The output is written under ``<dst>.tmp`` and
renamed into place, so a kill never leaves a half-written model behind.

Handles both layouts a checkpoint can have: per-expert legacy keys (``experts.{e}.w1/w2/w3`` or
``experts.{e}.gate_proj/up_proj/down_proj``, what ``save_pretrained`` writes) and fused 3-D keys
(``experts.gate_up_proj [E, 2I, H]``, ``experts.down_proj [E, H, I]``).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoConfig

from lightning_slimmoe.export import replace_dir
from lightning_slimmoe.families import get_family, head_dim
from lightning_slimmoe.slimming import KeepIndices, SlimTarget, group_rows, slim_config

_LAYER = r"layers\.(?P<layer>\d+)\."
_PER_EXPERT = re.compile(_LAYER + r"(?:block_sparse_moe|mlp)\.experts\.(?P<expert>\d+)\.(?P<proj>w1|w2|w3|gate_proj|up_proj|down_proj)\.weight$")
_FUSED = re.compile(_LAYER + r"mlp\.experts\.(?P<proj>gate_up_proj|down_proj)$")
_SHARED = re.compile(_LAYER + r"mlp\.shared_expert\.(?P<proj>gate_proj|up_proj|down_proj)\.weight$")
_ATTN = re.compile(_LAYER + r"self_attn\.(?P<proj>q_proj|k_proj|v_proj|o_proj)\.(?P<kind>weight|bias)$")
_ROWS = {"w1", "w3", "gate_proj", "up_proj"}  # down / w2 are sliced by columns


def _weight_files(src: Path) -> list[Path]:
    index = src / "model.safetensors.index.json"
    if index.exists():
        return sorted({src / f for f in json.loads(index.read_text())["weight_map"].values()})
    single = src / "model.safetensors"
    if not single.exists():
        raise FileNotFoundError(f"{src}: no model.safetensors(.index.json); only safetensors checkpoints are sliced")
    return [single]


class _ShardWriter:
    def __init__(self, out: Path, max_shard_bytes: int):
        self.out, self.max_bytes = out, max_shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.files: list[tuple[str, list[str]]] = []

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self.flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += size

    def flush(self) -> None:
        if not self.pending:
            return
        filename = f"model-{len(self.files) + 1:05d}.safetensors"
        save_file(self.pending, str(self.out / filename), metadata={"format": "pt"})
        self.files.append((filename, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> None:
        self.flush()
        total = len(self.files)
        weight_map = {}
        for i, (old, names) in enumerate(self.files, start=1):
            new = f"model-{i:05d}-of-{total:05d}.safetensors"
            (self.out / old).rename(self.out / new)
            weight_map.update({n: new for n in names})
        (self.out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))


def plain_selection(name: str, keep: KeepIndices, heads_per_group: int, dim: int) -> tuple[int, torch.Tensor] | None:
    """``(axis, index)`` that ``keep`` selects from the 1-D/2-D tensor called ``name`` (a per-expert legacy key,
    a shared-expert projection, or a q/k/v/o projection), or None when it is kept whole. The fused 3-D expert
    tensors are not plain (each expert keeps its own rows): :func:`_slice` gathers those. Shared with the
    sharded loader (``lightning_slimmoe.loading``), which applies the same selection at read time."""
    if m := _PER_EXPERT.search(name):
        layer, expert = int(m["layer"]), int(m["expert"])
        if layer not in keep.experts:
            return None
        return (0 if m["proj"] in _ROWS else 1), keep.experts[layer][expert]
    if m := _SHARED.search(name):
        layer = int(m["layer"])
        if layer not in keep.shared:
            return None
        return (0 if m["proj"] in _ROWS else 1), keep.shared[layer]
    if m := _ATTN.search(name):
        layer = int(m["layer"])
        if layer not in keep.groups:
            return None
        groups = keep.groups[layer]
        rows = group_rows(groups, heads_per_group * dim) if m["proj"] in ("q_proj", "o_proj") else group_rows(groups, dim)
        if m["proj"] == "o_proj":
            return None if m["kind"] == "bias" else (1, rows)
        return 0, rows
    return None


def _slice(name: str, tensor: torch.Tensor, keep: KeepIndices, heads_per_group: int, dim: int) -> torch.Tensor:
    if m := _FUSED.search(name):
        layer = int(m["layer"])
        if layer not in keep.experts:
            return tensor
        keep_EW = keep.experts[layer]
        if m["proj"] == "gate_up_proj":  # (E, 2I, H): gate rows then up rows, same ids for both halves
            width = tensor.shape[1] // 2
            idx = keep_EW[:, :, None].expand(-1, -1, tensor.shape[2])
            return torch.cat([tensor[:, :width].gather(1, idx), tensor[:, width:].gather(1, idx)], dim=1)
        return tensor.gather(2, keep_EW[:, None, :].expand(-1, tensor.shape[1], -1))  # (E, H, I)
    selection = plain_selection(name, keep, heads_per_group, dim)
    return tensor if selection is None else tensor.index_select(*selection)


def slim_checkpoint(src: str | Path, dst: str | Path, keep: KeepIndices, max_shard_bytes: int = 2 * 2**30) -> Path:
    """Write the slimmed HF model dir ``dst`` from ``src`` with ``keep``; returns ``dst``."""
    src, dst = Path(src), Path(dst)
    config = AutoConfig.from_pretrained(src)
    family = get_family(config)
    widths = {int(k.shape[1]) for k in keep.experts.values()}
    groups = {int(k.numel()) for k in keep.groups.values()}
    shared = {int(k.numel()) for k in keep.shared.values()}
    if len(widths) > 1 or len(groups) > 1 or len(shared) > 1:
        raise ValueError("keep indices must give uniform widths across layers")
    target = SlimTarget(
        expert_width=widths.pop() if widths else family.expert_width(config),
        attention_groups=groups.pop() if groups else int(config.num_key_value_heads),
        shared_expert_width=shared.pop() if shared else family.shared_expert_width(config))
    new_config = slim_config(config, target)
    heads_per_group = config.num_attention_heads // config.num_key_value_heads
    dim = head_dim(config)

    tmp = dst.with_name(dst.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    writer = _ShardWriter(tmp, max_shard_bytes)
    for path in _weight_files(src):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                writer.add(name, _slice(name, f.get_tensor(name), keep, heads_per_group, dim))
    writer.finish()
    new_config.save_pretrained(tmp)
    for extra in src.iterdir():  # tokenizer, generation config, model card
        if extra.is_file() and not extra.name.endswith((".safetensors", ".bin")) and extra.name not in (
                "config.json", "model.safetensors.index.json"):
            shutil.copy2(extra, tmp / extra.name)
    replace_dir(tmp, dst)
    return dst
