"""FSDP2 (``fully_shard``) for teacher and student, applied in one place, per decoder layer.

Used from ``StageModule.configure_model`` under Lightning's ``ModelParallelStrategy`` (FSDP2; also runs
on CPU with gloo). The student's decoder layers and the frozen teacher's decoder layers are separate
FSDP units: the teacher has no gradients, so it does no reduce-scatter and has no optimizer state; it
all-gathers a layer for its forward and frees it again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lightning_slimmoe.families import get_family

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class ParallelConfig:
    """Top-level ``parallel:`` key of a recipe (used when ``trainer.strategy`` is ModelParallelStrategy)."""

    param_dtype: Optional[str] = None  # FSDP2 compute dtype of the all-gathered params, e.g. bfloat16
    reduce_dtype: Optional[str] = "float32"  # gradient reduce-scatter dtype
    activation_checkpointing: bool = False  # recompute each student decoder layer in backward
    reshard_after_forward: bool = True  # ZeRO-3 (True) or keep gathered params until backward (ZeRO-2)

    def __post_init__(self):
        for name in ("param_dtype", "reduce_dtype"):
            value = getattr(self, name)
            if value is not None and value not in _DTYPES:
                raise ValueError(f"parallel.{name}={value!r}: must be one of {sorted(_DTYPES)} or null")

    def dtype(self, name: str) -> torch.dtype | None:
        value = getattr(self, name)
        return None if value is None else _DTYPES[value]


def is_sharded(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in module.modules())


def fsdp_mesh(device: torch.device):
    """A 1-D mesh over every rank: FSDP only (no tensor parallelism in this project)."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (dist.get_world_size(),), mesh_dim_names=("fsdp",))


def shard_model(model: nn.Module, mesh, cfg: ParallelConfig, trainable: bool) -> nn.Module:
    """``fully_shard`` every decoder layer, then the base model (embeddings, final norm) and the lm_head."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if is_sharded(model):
        return model
    mp = MixedPrecisionPolicy(param_dtype=cfg.dtype("param_dtype"), reduce_dtype=cfg.dtype("reduce_dtype"))
    layers = get_family(model).decoder_layers(model)
    if trainable and cfg.activation_checkpointing:
        # transformers' own per-layer checkpointing keeps parameter names (a wrapper module would rename
        # them and break HF export and resume).
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp, reshard_after_forward=cfg.reshard_after_forward or not trainable)
    # The pipeline calls `model.model` (hidden states) and `lm_head` chunk by chunk (distill.py), never the
    # *ForCausalLM forward, so the base model (embeddings + final norm) and the head are units of their own.
    # The head is called once per chunk: it stays gathered for the step (resharded by its backward, or by
    # `reshard_head` for the teacher) instead of being all-gathered again for every chunk.
    fully_shard(model.model, mesh=mesh, mp_policy=mp, reshard_after_forward=cfg.reshard_after_forward or not trainable)
    fully_shard(model.get_output_embeddings(), mesh=mesh, mp_policy=mp, reshard_after_forward=False)
    return model


def local_rows(tensor: Tensor) -> tuple[Tensor, int, int]:
    """``(local tensor, first row, last row + 1)``: the part of dim 0 this rank holds.

    A plain tensor is held whole. A DTensor's local chunk and its offset come from DTensor's own
    ``compute_local_shape_and_global_offset`` (FSDP2 shards dim 0, ``torch.chunk`` style, possibly unevenly).
    """
    from torch.distributed.tensor import DTensor

    if not isinstance(tensor, DTensor):
        return tensor, 0, (tensor.shape[0] if tensor.dim() else 1)
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, tensor.placements)
    if tuple(shape[1:]) != tuple(tensor.shape[1:]) or any(offset[1:]):
        raise NotImplementedError(f"only dim-0 sharding (FSDP2's) is supported, got placements {tensor.placements} "
                                  f"for a tensor of shape {tuple(tensor.shape)}")
    return tensor.to_local(), int(offset[0]), int(offset[0]) + int(shape[0])


def reshard_head(model: nn.Module) -> None:
    """Free the gathered lm_head of a model that runs no backward (the teacher)."""
    head = model.get_output_embeddings()
    if hasattr(head, "reshard"):
        head.reshard()


def all_reduce_scores_(tables: list[dict[int, torch.Tensor]]) -> None:
    """Sum per-structure scores over ranks (each rank scored different calibration batches), in fp64 so
    that every rank ends with the same numbers and slices exactly the same neurons and groups."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    for table in tables:
        for key in sorted(table):
            t = table[key].double()
            dist.all_reduce(t)
            table[key] = t
