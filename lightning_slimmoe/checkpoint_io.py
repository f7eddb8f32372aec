"""Checkpoints written atomically: temp file, fsync, rename. A kill mid-write leaves the previous
checkpoint intact and no half-written file under the final name."""

from __future__ import annotations

import os
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO


def atomic_torch_save(obj: Any, path: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO does not take storage_options")
        os.makedirs(os.path.dirname(str(path)) or ".", exist_ok=True)
        atomic_torch_save(checkpoint, str(path))

    def load_checkpoint(self, path, map_location=None, weights_only=None):
        # Our checkpoints hold tensors, numbers, strings and dicts only: load without unpickling code.
        return super().load_checkpoint(path, map_location=map_location or (lambda s, loc: s), weights_only=True)
