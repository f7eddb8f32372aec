"""Lightning's ``CheckpointIO`` for single-file checkpoints, and the finite check of every checkpoint.

Checkpoints are written atomically (storage.py: temp file, fsync, rename), so a kill mid-write leaves the
previous checkpoint intact and no half-written file under the final name. A checkpoint whose weights or
optimizer state hold NaN/Inf is refused before anything is written, so retention (``save_top_k``) never
replaces the last finite checkpoint with a poisoned one."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch.distributed.tensor import DTensor
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.rank_zero import rank_zero_only

from lightning_slimmoe.storage import atomic_torch_save

CHECKED_KEYS = ("state_dict", "optimizer_states")  # loop/callback state may legitimately hold +-inf


def first_non_finite(obj: Any, name: str) -> str | None:
    """Name of the first floating-point tensor inside ``obj`` (nested dicts/lists) that holds NaN or Inf.
    A sharded (DTensor) entry is checked on this rank's local shard only: no collective per tensor."""
    if isinstance(obj, torch.Tensor):
        local = obj.to_local() if isinstance(obj, DTensor) else obj
        return name if local.is_floating_point() and not bool(torch.isfinite(local).all()) else None
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    for key, value in items:
        found = first_non_finite(value, f"{name}[{key!r}]")
        if found is not None:
            return found
    return None


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO does not take storage_options")
        for key in CHECKED_KEYS:
            bad = first_non_finite(checkpoint.get(key, {}), key)
            if bad is not None:
                raise FloatingPointError(
                    f"refusing to write checkpoint {path} at global step {checkpoint.get('global_step')} on rank "
                    f"{getattr(rank_zero_only, 'rank', 0)}: tensor {bad} holds non-finite values (NaN/Inf); the "
                    "previous checkpoint is kept")
        os.makedirs(os.path.dirname(str(path)) or ".", exist_ok=True)
        atomic_torch_save(checkpoint, str(path), what="checkpoint")

    def load_checkpoint(self, path, map_location=None, weights_only=None):
        # Our checkpoints hold tensors, numbers, strings and dicts only: load without unpickling code.
        return super().load_checkpoint(path, map_location=map_location or (lambda s, loc: s), weights_only=True)
