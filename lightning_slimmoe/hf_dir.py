"""The one writer of stock Hugging Face model directories built tensor by tensor, and its read-back check.

Used wherever a model must be written without ever holding it whole: the sharded stage export (each tensor
all-gathered in turn, export.py) and ``export`` of a sharded checkpoint (each tensor read alone from DCP,
consolidate.py). The sequence is the same for both, so it is written once: every tensor is converted to the layout
``save_pretrained`` writes (transformers' own ``revert_weight_conversion``: fused experts back to per-expert keys)
and appended to a safetensors shard (storage.py) under ``<dir>.tmp``; then the config (with the dtype and class
``save_pretrained`` records), generation config and tokenizer; then the caller reads the directory back
(:func:`read_back_problem`, through the same reader the sharded loader uses) and :meth:`HFDirWriter.commit` renames
it into place. Peak extra memory: one tensor plus one output shard.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Iterable

import torch
from torch import Tensor, nn

from lightning_slimmoe import storage
from lightning_slimmoe.loading import CheckpointReader


def hf_architecture(model: nn.Module) -> str:
    """The class name ``save_pretrained`` records (FSDP2 renames a sharded model's class to ``FSDP<name>``)."""
    return type(model).__name__.removeprefix("FSDP")


class HFDirWriter:
    """Writes ``out_dir`` under ``<out_dir>.tmp``; nothing appears under ``out_dir`` before :meth:`commit`."""

    def __init__(self, out_dir: str | Path, model: nn.Module, max_shard_bytes: int = 2 * 2**30):
        self.out_dir = Path(out_dir)
        self.model = model
        self.tmp = storage.fresh_tmp_dir(self.out_dir)
        self._shards = storage.ShardWriter(self.tmp, max_shard_bytes)

    def add(self, name: str, tensor: Tensor) -> None:
        """Model tensor ``name`` (whole, on CPU), in the checkpoint layout ``save_pretrained`` writes."""
        from transformers.core_model_loading import revert_weight_conversion

        with storage.writing("HF export", self.out_dir):
            for key, piece in revert_weight_conversion(self.model, {name: tensor}).items():
                self._shards.add(key, piece)

    def finish(self, config, dtype: torch.dtype, tokenizer=None, extra_files: dict[str, str] | None = None) -> Path:
        """Shard index, config (stored ``dtype`` and class, as ``save_pretrained`` records them), generation
        config, tokenizer and extra text files; returns the temporary directory, to be checked."""
        config = copy.deepcopy(config)
        config.dtype = str(dtype).removeprefix("torch.")
        config.architectures = [hf_architecture(self.model)]
        with storage.writing("HF export", self.out_dir):
            self._shards.finish()
            config.save_pretrained(self.tmp)
            if self.model.can_generate():
                self.model.generation_config.save_pretrained(self.tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(self.tmp)
            for name, text in (extra_files or {}).items():
                (self.tmp / name).write_text(text)
        return self.tmp

    def commit(self) -> Path:
        with storage.writing("HF export", self.out_dir):
            storage.replace_dir(self.tmp, self.out_dir)
        return self.out_dir


@torch.no_grad()
def read_back_problem(directory: str | Path, model: nn.Module,
                      expected: Iterable[tuple[str, Tensor, Tensor, int]]) -> str | None:
    """None if every ``(name, like, rows, start)`` reads back bit-identically from ``directory``: rows
    ``[start, start + len(rows))`` of model tensor ``name`` (global shape ``like``) equal ``rows``; else what differs.
    Reads only those rows (memory of one tensor's rows)."""
    with CheckpointReader(directory, model) as reader:
        for name, like, rows, start in expected:
            stop = start + (rows.shape[0] if rows.dim() else 1)
            for offset, block in reader.blocks(name, like, start, stop):
                mine = rows if rows.dim() == 0 else rows[offset:offset + block.shape[0]]
                if block.shape != mine.shape or not torch.equal(block.to(mine.device, mine.dtype), mine):
                    return f"{name} rows {start + offset}.. read back differently"
            reader.release()
    return None
