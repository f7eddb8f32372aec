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
import json
from pathlib import Path
from typing import Iterable

import torch
from torch import Tensor, nn

from lightning_slimmoe import storage
from lightning_slimmoe.families import family_of_type
from lightning_slimmoe.loading import CheckpointReader


def hf_architecture(model: nn.Module) -> str:
    """The class name ``save_pretrained`` records (FSDP2 renames a sharded model's class to ``FSDP<name>``)."""
    return type(model).__name__.removeprefix("FSDP")


def export_architecture(model: nn.Module) -> str:
    """The ``architectures`` entry an export records: the family's spelling as the hub and the serving engines'
    registries have it (PhiMoE: ``PhiMoEForCausalLM``), else the teacher's own spelling of this class (its config's
    ``architectures``, compared case-insensitively), else transformers' class name. ``AutoModelForCausalLM`` picks the
    class from ``model_type``, so the spelling changes nothing for transformers; vLLM and llama.cpp's converter pick
    their model from it."""
    name = hf_architecture(model)
    family = family_of_type(getattr(model.config, "model_type", ""))
    if family is not None and family.architecture:
        return family.architecture
    given = [a for a in getattr(model.config, "architectures", None) or [] if a.lower() == name.lower()]
    return given[0] if given else name


def is_mla(config: dict) -> bool:
    """Multi-head latent attention (DeepSeek-V2/V3, GLM-4.7-Flash): no single per-head width to write."""
    return all(config.get(k) is not None for k in ("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"))


def save_tokenizer(tokenizer, directory: str | Path) -> None:
    """``tokenizer.save_pretrained(directory)``, plus the vocabulary files it was read from that the save did not
    write again (a SentencePiece ``tokenizer.model`` beside a ``tokenizer.json``): llama.cpp's GGUF converter reads
    some families' vocabularies (PhiMoE, Llama) only from ``tokenizer.model``."""
    import shutil

    directory = Path(directory)
    tokenizer.save_pretrained(directory)
    for attribute, name in (getattr(tokenizer, "vocab_files_names", None) or {}).items():
        source = getattr(tokenizer, attribute, None)
        if isinstance(source, (str, Path)) and Path(source).is_file() and not (directory / name).exists():
            shutil.copyfile(source, directory / name)


def write_serving_fields(directory: str | Path, architecture: str) -> dict:
    """Rewrite ``<directory>/config.json`` as serving engines take a hub config: ``architectures`` spelled as their
    registries spell it (:func:`export_architecture`); ``head_dim`` always written for multi-head attention (vLLM and
    llama.cpp read it where present; OLMoE's config class has no such field and derives it); no
    ``quantization_config`` (an export holds plain tensors: an engine told otherwise would look for block scales
    that were never written). Multi-token-prediction counts are zeroed by ``slimming.slim_config`` already.
    Returns the config written."""
    path = Path(directory) / "config.json"
    config = json.loads(path.read_text())
    config["architectures"] = [architecture]
    heads = config.get("num_attention_heads")
    if config.get("head_dim") is None and heads and config.get("hidden_size") and not is_mla(config):
        config["head_dim"] = int(config["hidden_size"]) // int(heads)
    config.pop("quantization_config", None)
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return config


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
        architecture = export_architecture(self.model)
        config.architectures = [hf_architecture(self.model)]
        with storage.writing("HF export", self.out_dir):
            self._shards.finish()
            config.save_pretrained(self.tmp)
            write_serving_fields(self.tmp, architecture)
            if self.model.can_generate():
                self.model.generation_config.save_pretrained(self.tmp)
            if tokenizer is not None:
                save_tokenizer(tokenizer, self.tmp)
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
