"""Sharded loading: a big model is built on the meta device, sharded, and each rank reads only its rows.

docs/design.md §4: "big models never materialise whole on one rank". Under ``ModelParallelStrategy`` the
pipeline builds teacher and student with :func:`meta_model` (shapes only, no memory) and records where
their weights are (:class:`PendingLoad`); ``StageModule.configure_model`` applies FSDP2 ``fully_shard``
to the meta model, ``to_empty`` allocates each rank's shards, and :func:`materialize_` fills them with
:func:`load_sharded_`: for every parameter it reads, from the safetensors files, only the rows of dim 0
this rank holds (FSDP2 shards dim 0, ``torch.chunk`` style) — through ``safe_open(...).get_slice``, so a
rank neither holds nor reads the whole model. Peak memory per rank is its shards plus one expert (fused
expert tensors are assembled expert by expert) or, for a row-sliced tensor, the covering rows of one
checkpoint tensor.

A slimmed student is loaded the same way, with the stage's keep indices applied at read time (the same
selections as :func:`lightning_slimmoe.slimming.slim_model_`), so
the unsliced student is never written to disk between scoring and training.

Checkpoint layouts: experts are fused in memory and per expert in hub checkpoints; both are read, the expert
keys and what a keep selects through :mod:`lightning_slimmoe.checkpoint_layout` (the family adapters' key
layouts), every other name through transformers' own ``revert_weight_conversion`` (the mapping
``save_pretrained`` applies, e.g. PhiMoE's router ``block_sparse_moe.gate`` -> ``mlp.router``). A multimodal
wrapper's hub checkpoint (Qwen3.5-MoE: the language model under ``model.language_model.``) is read as published,
each name mapped by ``CheckpointLayout.hub_key``; only tensors the model has are ever read, so an MTP layer
(``mtp.*``, or ``model.layers.<num_hidden_layers>`` for DeepSeek-V3 / GLM) or a vision tower never is.

Quantized checkpoints: block-FP8 weights (``X.weight`` float8 + ``X.weight_scale_inv``; DeepSeek-V3, MiniMax-M2)
and gpt-oss's MXFP4 experts (``<experts>.gate_up_proj_blocks`` / ``_scales``) are dequantized as they are read,
before any keep is applied (:mod:`lightning_slimmoe.dequantize`): the model is built without the config's
``quantization_config`` and holds plain tensors; other formats are refused.

Never ``torch.load``: only safetensors are read.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import torch
from safetensors import safe_open
from torch import Tensor, nn
from transformers import AutoConfig

from lightning_slimmoe.checkpoint_layout import CheckpointLayout
from lightning_slimmoe.dequantize import (checkpoint_fp8, checkpoint_headers, checkpoint_mxfp4, dequantize_mxfp4_expert,
                                          hub_quantization, without_quantization)
from lightning_slimmoe.distributed import local_rows
from lightning_slimmoe.models import init_non_persistent_buffers_, model_on_meta, persistent_tensors
from lightning_slimmoe.slimming import (KeepIndices, check_expert_layout, fused_columns, keep_target,
                                        kept_expert_count, slim_config, with_num_experts)

PENDING_ATTR = "slimmoe_pending_load"


@dataclass
class PendingLoad:
    """Where a meta-built model's weights are, and what to keep of them (applied at read time)."""

    source: str  # local HF model dir with *.safetensors
    keep: KeepIndices | None = None  # neurons / groups kept by a slimming stage
    kept_experts: dict[int, Tensor] = field(default_factory=dict)  # layer -> kept expert ids (expert removal)


def pending_load(model: nn.Module) -> PendingLoad | None:
    """The load a meta-built model still waits for (None for a model that holds its weights)."""
    return getattr(model, PENDING_ATTR, None)


def local_model_dir(source: str) -> str:
    """A local directory for ``source``: itself, or the hub snapshot (config + safetensors only)."""
    if os.path.isdir(source):
        return source
    from huggingface_hub import snapshot_download

    return snapshot_download(source, allow_patterns=["*.json", "*.safetensors"])


def meta_model(source: str, dtype: torch.dtype, keep: KeepIndices | None = None,
               kept_experts: dict[int, Tensor] | None = None, trust_remote_code: bool = False) -> nn.Module:
    """The model in ``source`` (after ``kept_experts`` and ``keep``) on the meta device, with its load pending.

    Nothing is read but the config: the weights come in :func:`materialize_`, after sharding.
    """
    source = local_model_dir(source)
    config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    hub_quantization(config)  # a format that cannot be read fails here, before any weight
    without_quantization(config)  # block FP8 / MXFP4 is dequantized at read time: the model holds plain tensors
    kept_experts = dict(kept_experts or {})
    if kept_experts:
        config = with_num_experts(config, kept_expert_count(kept_experts))
    if keep is not None:
        config = slim_config(config, keep_target(keep, config))
    model = model_on_meta(config, dtype, trust_remote_code=trust_remote_code)
    # from_pretrained names the model's config after its source; a multimodal wrapper's text_config, which the model
    # is built from, has no name of its own, and the name is part of the teacher fingerprint
    model.config._name_or_path = config._name_or_path
    setattr(model, PENDING_ATTR, PendingLoad(source=source, keep=keep, kept_experts=kept_experts))
    return model


# ---------------------------------------------------------------------------------------------------
# Reading rows of model tensors from a checkpoint
# ---------------------------------------------------------------------------------------------------
class CheckpointReader:
    """Rows ``[start, stop)`` of dim 0 of any tensor of ``model`` (its final, sliced shape), read from the
    safetensors checkpoint ``source`` without reading the rest of it."""

    def __init__(self, source: str | Path, model: nn.Module, keep: KeepIndices | None = None,
                 kept_experts: dict[int, Tensor] | None = None):
        self.source = Path(source)
        self.model = model
        self.keep = keep
        self.kept_experts = kept_experts or {}
        self.layout = CheckpointLayout(model.config)
        self._stack = contextlib.ExitStack()
        self._handles: dict[Path, object] = {}
        headers = checkpoint_headers(self.source)
        self.file_of: dict[str, Path] = {name: entry.path for name, entry in headers.items()}
        # float8 weight key -> its own weight_scale_inv key; such tensors are dequantized before any slicing
        self.fp8, self.scale_of = checkpoint_fp8(self.source, headers)
        self.mxfp4 = checkpoint_mxfp4(self.source, headers)  # fused expert name -> its (blocks, scales) keys
        self._fused_keys: dict[str, str | None] = {}  # fused expert tensor name -> its checkpoint key, if fused there
        self.per_expert: dict[tuple[int, int, str], str] = {}  # (layer, expert, gate|up|down) -> key
        for name in self.file_of:
            if (e := self.layout.expert_key(name)) is not None:
                self.per_expert[(e.layer, e.expert, e.role)] = name

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def release(self) -> None:
        """Close the open files. safetensors reads through mmap and every page read stays mapped — and counted
        in the process's RSS — while its file is open, so the loader releases after each tensor: what a rank
        holds stays its shards plus one tensor's pages, not every page of the checkpoint it read."""
        self._stack.close()
        self._stack = contextlib.ExitStack()
        self._handles = {}

    def _handle(self, path: Path):
        if path not in self._handles:
            self._handles[path] = self._stack.enter_context(safe_open(str(path), framework="pt", device="cpu"))
        return self._handles[path]

    def _slice(self, key: str):
        return self._handle(self.file_of[key]).get_slice(key)

    def _range(self, key: str, start: int, stop: int) -> Tensor:
        """Rows ``[start, stop)`` of checkpoint tensor ``key``; a block-FP8 weight dequantized (float32) first."""
        if key in self.scale_of:
            return self.fp8.read_rows(key, self._slice(key), self._slice(self.scale_of[key]), start, stop)
        return self._slice(key)[start:stop]

    def _rows(self, key: str, rows: slice | Tensor) -> Tensor:
        """Rows of checkpoint tensor ``key``: a range, or sorted ids (read as their covering range)."""
        if isinstance(rows, slice):
            start, stop, step = rows.indices(self._slice(key).get_shape()[0])
            if step != 1:
                raise ValueError(f"{key}: rows {rows} (only contiguous ranges are read)")
            return self._range(key, start, max(start, stop))
        if rows.numel() == 0:
            return self._range(key, 0, 0)
        lo, hi = int(rows.min()), int(rows.max()) + 1
        return self._range(key, lo, hi).index_select(0, rows.to(torch.long) - lo)

    def _stored_key(self, name: str) -> str | None:
        """``name`` itself, or its key in a multimodal wrapper's hub layout, where the checkpoint holds it."""
        for key in (name, self.layout.hub_key(name)):
            if key is not None and key in self.file_of:
                return key
        return None

    def _fused_key(self, name: str) -> str | None:
        """The checkpoint tensor holding the fused expert tensor ``name`` whole, None where the checkpoint keeps it
        per expert: the in-memory name, a wrapper's hub key, or one renamed whole by save_pretrained (Granite:
        ``block_sparse_moe.input_linear.weight`` / ``output_linear.weight``). A reverse conversion that splits the
        tensor into per-expert keys (Qwen, Mixtral) is not a fused key: those are read by :meth:`_expert_key`."""
        if name not in self._fused_keys:
            key = self._stored_key(name)
            if key is None:
                from transformers.core_model_loading import revert_weight_conversion

                stand_in = torch.empty(self.model.get_parameter(name).shape, device="meta")
                candidates = list(revert_weight_conversion(self.model, {name: stand_in}))
                key = self._stored_key(candidates[0]) if len(candidates) == 1 else None
            self._fused_keys[name] = key
        return self._fused_keys[name]

    def checkpoint_key(self, name: str, like: Tensor) -> str:
        """The checkpoint tensor holding model tensor ``name`` (not for fused experts)."""
        if (key := self._stored_key(name)) is not None:
            return key
        from transformers.core_model_loading import revert_weight_conversion

        # save_pretrained's own renaming (e.g. PhiMoE mlp.router -> block_sparse_moe.gate), on a meta stand-in.
        candidates = list(revert_weight_conversion(self.model, {name: torch.empty(like.shape, device="meta")}))
        for candidate in candidates:
            if (key := self._stored_key(candidate)) is not None:
                return key
        raise KeyError(f"{self.source}: no checkpoint tensor for model parameter {name!r} (looked for "
                       f"{sorted({name, *candidates})}); is this the checkpoint of a {self.model.config.model_type} "
                       "model with this config?")

    def blocks(self, name: str, like: Tensor, start: int, stop: int) -> Iterator[tuple[int, Tensor]]:
        """``(offset, block)`` pieces covering rows ``[start, stop)`` of model tensor ``name`` (shaped like
        ``like``, the final model's global tensor); offsets are relative to ``start``."""
        if stop <= start:
            return
        if (fused := self.layout.fused_key(name) or self.layout.fused_bias_key(name)) is not None:
            yield from self._expert_blocks(name, fused.layer, fused.proj, like, start, stop)
            return
        key = self.checkpoint_key(name, like)
        selection = (None if self.keep is None else
                     self.layout.plain_selection(name, self.keep, stored_rows=self._slice(key).get_shape()[0]))
        indexed = self.layout.expert_indexed(name)
        if selection is None and indexed is not None and indexed[0] in self.kept_experts:
            # expert removal: the router (and its score-correction bias) keeps the entries of the kept experts
            selection = (indexed[1], self.kept_experts[indexed[0]].sort().values)
        if like.dim() == 0:
            yield 0, self._handle(self.file_of[key]).get_tensor(key)
        elif selection is not None and selection[0] == 0:
            yield 0, self._rows(key, selection[1][start:stop])
        else:
            block = self._rows(key, slice(start, stop))
            yield 0, block if selection is None else block.index_select(selection[0], selection[1])

    def _expert_blocks(self, name: str, layer: int, proj: str, like: Tensor, start: int, stop: int):
        """Fused experts, one expert at a time: from a fused checkpoint tensor or from per-expert keys."""
        for e_new in range(start, stop):
            yield e_new - start, self._expert_piece(name, layer, proj, e_new)[None]

    def _expert_piece(self, name: str, layer: int, proj: str, e_new: int, rows: int | None = None) -> Tensor:
        """Expert ``e_new`` of the final model: ``(2W, H)`` for gate_up_proj, ``(H, W)`` for down_proj; with
        ``rows``, only its first rows (gate rows only for gate_up_proj), reading no more than those."""
        ids = self.kept_experts.get(layer)
        e = int(ids.sort().values[e_new]) if ids is not None else e_new
        keep_EW = self.keep.experts.get(layer) if self.keep is not None else None  # (E, W), of the kept experts
        k_W = None if keep_EW is None else keep_EW[e_new].to(torch.long)
        if check_expert_layout(self.model.get_submodule(name.rpartition(".")[0])).transposed:
            piece = self._transposed_expert_piece(name, proj, e, k_W)  # gpt-oss
            return piece if rows is None else piece[:rows]
        fused = self._fused_key(name)
        if proj == "gate_up_proj":
            if fused:
                w_2IH = self._rows(fused, slice(e, e + 1))[0]  # (2I, H): gate rows then up rows
                width = w_2IH.shape[0] // 2
                gate_IH, up_IH = w_2IH[:width], w_2IH[width:]
                if k_W is not None:
                    gate_IH, up_IH = gate_IH.index_select(0, k_W), up_IH.index_select(0, k_W)
            else:
                if rows is not None:  # a prefix of the gate rows
                    wanted = slice(0, rows) if k_W is None else k_W[:rows]
                    return self._rows(self._expert_key(layer, e, "gate", name), wanted)
                wanted = slice(None) if k_W is None else k_W
                gate_IH = self._rows(self._expert_key(layer, e, "gate", name), wanted)
                up_IH = self._rows(self._expert_key(layer, e, "up", name), wanted)
            piece = torch.cat([gate_IH, up_IH], dim=0)  # (2W, H)
        else:
            w_HI = (self._rows(fused, slice(e, e + 1))[0] if fused
                    else self._rows(self._expert_key(layer, e, "down", name), slice(None) if rows is None else slice(0, rows)))
            piece = w_HI if k_W is None else w_HI.index_select(1, k_W)  # (H, W)
        return piece if rows is None else piece[:rows]

    def _transposed_expert_piece(self, name: str, proj: str, e: int, k_W: Tensor | None) -> Tensor:
        """Expert ``e`` of gpt-oss's layout, its kept neurons ``k_W`` only: ``(H, 2W)`` for gate_up_proj (gate/up
        columns interleaved), ``(2W,)`` for gate_up_proj_bias, ``(W, H)`` for down_proj, ``(H,)`` for down_proj_bias
        (per expert: nothing to select). An MXFP4 hub checkpoint's ``<name>_blocks`` / ``_scales`` are dequantized
        first (dequantize.py), whole expert by whole expert: down_proj's 32-value blocks run along the neurons."""
        if (key := self._stored_key(name)) is not None:
            piece = self._rows(key, slice(e, e + 1))[0]
        elif (pair := self.mxfp4.get(name)) is not None:
            piece = dequantize_mxfp4_expert(self._slice(pair[0]), self._slice(pair[1]), e)
        else:
            raise KeyError(f"{self.source}: no checkpoint tensor for {name!r} (neither it nor its MXFP4 "
                           f"{name}_blocks / _scales)")
        if k_W is None or proj == "down_proj_bias":
            return piece
        if proj == "down_proj":
            return piece.index_select(0, k_W)
        layout = check_expert_layout(self.model.get_submodule(name.rpartition(".")[0]))
        # gate_up_proj (H, 2I) or its bias (2I,): gpt-oss's interleaved pairs, Llama-4's gate then up columns
        return piece.index_select(-1, fused_columns(layout, k_W[None], piece.shape[-1] // 2)[0])

    def first_values(self, name: str, like: Tensor, n: int = 16) -> Tensor:
        """The first ``n`` values of the flattened model tensor ``name``, reading only the rows they lie in."""
        fused = self.layout.fused_key(name)
        if fused is not None and like.dim() == 3:
            rows = -(-n // like.shape[2])  # rows of expert 0's (2W, H) or (H, W) block
            if rows <= (like.shape[1] // 2 if fused.proj == "gate_up_proj" else like.shape[1]):
                return self._expert_piece(name, fused.layer, fused.proj, 0, rows=rows).reshape(-1)[:n]
        row = math.prod(like.shape[1:]) if like.dim() else 1
        stop = min(like.shape[0], -(-n // max(row, 1))) if like.dim() else 1
        blocks = [b.reshape(-1) for _, b in self.blocks(name, like, 0, stop)]
        return (torch.cat(blocks) if blocks else torch.empty(0))[:n]

    def _expert_key(self, layer: int, expert: int, role: str, name: str) -> str:
        key = self.per_expert.get((layer, expert, role))
        if key is None:
            raise KeyError(f"{self.source}: no checkpoint tensor for expert {expert} ({role}) of layer {layer}, "
                           f"needed by {name!r} (neither the fused key nor a per-expert key is present)")
        return key


# ---------------------------------------------------------------------------------------------------
# Filling a (sharded) model
# ---------------------------------------------------------------------------------------------------
@torch.no_grad()
def load_sharded_(model: nn.Module, source: str | Path, keep: KeepIndices | None = None,
                  kept_experts: dict[int, Tensor] | None = None) -> nn.Module:
    """Fill every parameter and persistent buffer of ``model`` (materialised, e.g. ``fully_shard`` +
    ``to_empty``; plain or sharded) from the safetensors checkpoint ``source``, this rank's rows only,
    with ``kept_experts`` / ``keep`` applied at read time; then recompute the non-persistent buffers."""
    with CheckpointReader(source, model, keep, kept_experts) as reader:
        for name, tensor in persistent_tensors(model):
            if tensor.is_meta:
                raise RuntimeError(f"{name} is still on the meta device: materialise the model (to_empty) first")
            local, start, stop = local_rows(tensor)
            for offset, block in reader.blocks(name, tensor, start, stop):
                target = local if local.dim() == 0 else local[offset:offset + block.shape[0]]
                if block.shape != target.shape:
                    raise ValueError(f"{source}: checkpoint gives shape {tuple(block.shape)} for rows "
                                     f"{start + offset}..{start + offset + len(target)} of {name!r} "
                                     f"{tuple(tensor.shape)} (model expects {tuple(target.shape)}); the checkpoint "
                                     "does not match the config")
                target.copy_(block)
            reader.release()
    init_non_persistent_buffers_(model)
    return model


def materialize_(model: nn.Module, device: torch.device | str) -> bool:
    """Allocate a meta-built (and possibly ``fully_shard``-ed) model on ``device`` and load its pending
    weights, each rank its own shards. Returns False (and does nothing) for a model holding its weights,
    so callers may call it again (``configure_model`` must be idempotent)."""
    pending = pending_load(model)
    if pending is None:
        return False
    model.to_empty(device=device)  # FSDP2 re-registers its padded local shards on to_empty
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()  # to_empty made separate tensors of tied ones: tie before loading (one key on disk)
    load_sharded_(model, pending.source, pending.keep, pending.kept_experts)
    delattr(model, PENDING_ATTR)
    return True


def pending_fingerprint(model: nn.Module) -> str:
    """:func:`lightning_slimmoe.module.model_fingerprint` of the model a pending load will produce, without
    loading it: the config, and the name, shape and first 16 values (in the model's dtype) of every state-dict
    tensor, read from the checkpoint (the first rows only). A sharded run and a single process therefore
    record the same teacher fingerprint, which resume checks."""
    pending = pending_load(model)
    if pending is None:
        raise ValueError("pending_fingerprint: the model has no pending load (use model_fingerprint)")
    first_name: dict[int, str] = {}
    with CheckpointReader(pending.source, model, pending.keep, pending.kept_experts) as reader:
        def entries():
            for name, tensor in model.state_dict(keep_vars=True).items():
                source_name = first_name.setdefault(id(tensor), name)  # a tied tensor is read under its first name
                yield name, tensor.shape, reader.first_values(source_name, tensor).to(tensor.dtype)
        return fingerprint(model.config, entries())


def fingerprint(config, entries: Iterable[tuple[str, torch.Size, Tensor]]) -> str:
    """The hash behind :func:`lightning_slimmoe.module.model_fingerprint` and :func:`pending_fingerprint`: the
    config, then per state-dict tensor its name, shape and first 16 values (as float32). One definition, so a
    loaded model and the same model still pending its load hash the same."""
    h = hashlib.sha256(config.to_json_string(use_diff=False).encode())
    for name, shape, first in entries:
        h.update(f"{name}:{tuple(shape)}".encode())
        h.update(first.float().cpu().numpy().tobytes())
    return h.hexdigest()


def own_mapped_tensors_(model: nn.Module) -> int:
    """Copy into the process's own memory every parameter and buffer of ``model`` that is still a view of a
    memory-mapped safetensors file, and return the bytes copied.

    ``from_pretrained`` keeps tensors already in the checkpoint's dtype as zero-copy views of the file's mmap (the
    embeddings and the output head of a bf16 checkpoint). Such a view keeps the whole file mapped, and every page the
    load touched stays resident and counted in the RSS for the rest of the run, including the pages of the per-expert
    tensors it copied into fused ones: a 1-layer Qwen3-30B-A3B checkpoint loaded as teacher and student kept 3.5 GiB
    of file pages resident beside the 4.6 GiB of the two models (bench/memory.py). Copied, the mapping is closed and
    only the models stay. Linux only (``/proc/self/maps``); elsewhere nothing is copied."""
    try:
        with open("/proc/self/maps") as f:
            ranges = [tuple(int(x, 16) for x in line.split()[0].split("-")) for line in f
                      if line.rstrip().endswith(".safetensors")]
    except OSError:
        return 0
    if not ranges:
        return 0
    mapped = []  # (module's table, name, tensor): the views of a mapped file
    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for name, t in table.items():
                if t is None or t.device.type != "cpu" or t.is_meta:
                    continue
                pointer = t.untyped_storage().data_ptr()
                if any(lo <= pointer < hi for lo, hi in ranges):
                    mapped.append((table, name, t))
    copied, done = 0, set()
    with torch.no_grad():
        for table, name, t in mapped:
            if isinstance(t, nn.Parameter):
                if id(t) in done:  # a tied Parameter is listed once per module holding it
                    continue
                t.data = t.data.clone()  # the same Parameter object: ties and references stay
            else:
                table[name] = t.clone()
            done.add(id(t))
            copied += t.numel() * t.element_size()
    return copied  # the mapping closes with its last view
