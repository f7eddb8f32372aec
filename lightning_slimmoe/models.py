"""Models built from configs alone: on the meta device, their checkpointed tensors, their derived buffers.

The pieces every loader and writer shares: :func:`model_on_meta` (shapes without memory, for planning, sharded
loading and consolidation), :func:`persistent_tensors` (the tensors a checkpoint holds, each tied tensor once) and
:func:`init_non_persistent_buffers_` (the buffers no checkpoint holds, recomputed after ``to_empty``).
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import Tensor, nn
from transformers import AutoModelForCausalLM


def model_on_meta(config, dtype: torch.dtype | None = None, trust_remote_code: bool = False) -> nn.Module:
    """The causal LM ``config`` describes, on the meta device: every shape, no memory, no weights."""
    kwargs = {"dtype": dtype} if dtype is not None else {}
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code, **kwargs)


def persistent_tensors(model: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """Parameters and persistent buffers in ``state_dict`` order, each shared (tied) tensor once — the
    tensors a checkpoint holds. Sharded (FSDP2) parameters come as DTensors."""
    seen: set[int] = set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        yield name, tensor


@torch.no_grad()
def init_non_persistent_buffers_(model: nn.Module) -> None:
    """``to_empty`` leaves buffers that no checkpoint holds (rotary ``inv_freq``) uninitialised: recompute them
    with the model's own ``_init_weights``, as ``from_pretrained`` does for missing keys."""
    for name, module in model.named_modules():
        if not module._non_persistent_buffers_set:
            continue
        if any(True for _ in module.parameters(recurse=False)):
            raise NotImplementedError(f"{name} ({type(module).__name__}) has parameters and non-persistent buffers: "
                                      "re-initialising it would overwrite loaded weights")
        model._init_weights(module)
        for buffer_name in module._non_persistent_buffers_set:
            buffer = getattr(module, buffer_name, None)
            if buffer is not None and buffer.is_floating_point() and not bool(torch.isfinite(buffer).all()):
                raise RuntimeError(f"buffer {name}.{buffer_name} was not re-initialised by {type(model).__name__}"
                                   "._init_weights")
