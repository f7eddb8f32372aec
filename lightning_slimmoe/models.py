"""Models built from configs alone: on the meta device, their checkpointed tensors, their derived buffers.

The pieces every loader and writer shares: :func:`model_on_meta` (shapes without memory, for planning, sharded
loading and consolidation), :func:`persistent_tensors` (the tensors a checkpoint holds, each tied tensor once) and
:func:`init_non_persistent_buffers_` (the buffers no checkpoint holds, recomputed after ``to_empty``).
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch
from torch import Tensor, nn
from transformers import AutoModelForCausalLM


def model_on_meta(config, dtype: torch.dtype | None = None, trust_remote_code: bool = False) -> nn.Module:
    """The causal LM ``config`` describes, on the meta device: every shape, no memory, no weights."""
    kwargs = {"dtype": dtype} if dtype is not None else {}
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code, **kwargs)
    if dtype is not None:
        keep_fp32_(model, dtype)
    return model


def _kept_fp32_tensors(model: nn.Module, dtype: torch.dtype) -> Iterator[tuple[dict, str, Tensor]]:
    """(table, name, tensor) of every floating tensor that transformers keeps in fp32 when the model's weights are in
    ``dtype`` (its ``_keep_in_fp32_modules_strict`` plan, e.g. the routers' score-correction biases)."""
    plan = model._get_dtype_plan(dtype) if hasattr(model, "_get_dtype_plan") else {}
    if not plan:
        return
    from transformers.core_model_loading import build_glob_alternation

    pattern, _, _ = build_glob_alternation(list(plan))
    for module_name, module in model.named_modules():
        for table in (module._parameters, module._buffers):
            for name, tensor in list(table.items()):
                full = f"{module_name}.{name}" if module_name else name
                if tensor is not None and tensor.is_floating_point() and pattern.search(full):
                    yield table, name, tensor


def keep_fp32_(model: nn.Module, dtype: torch.dtype) -> None:
    """Upcast the tensors the model keeps in fp32 whatever the dtype (``_keep_in_fp32_modules_strict``, e.g. the
    routers' score-correction biases), as ``from_pretrained`` does and ``from_config`` does not: a model built here
    then holds the dtypes of one loaded whole."""
    for table, name, tensor in _kept_fp32_tensors(model, dtype):
        table[name] = (nn.Parameter(tensor.to(torch.float32), requires_grad=tensor.requires_grad)
                       if isinstance(tensor, nn.Parameter) else tensor.to(torch.float32))


def dtype_fixed_tensors(root: nn.Module) -> set[int]:
    """ids of the tensors under ``root`` whose dtype transformers fixes whatever the weights' dtype: the buffers no
    checkpoint holds (rotary ``inv_freq``, computed in fp32) and the fp32-kept tensors of every transformers model
    under ``root`` (:func:`keep_fp32_`). ``from_pretrained(dtype=torch.bfloat16)`` holds them in fp32; a plain
    ``module.to(torch.bfloat16)`` (Lightning's ``*-true`` precision) would round them."""
    fixed = set()
    for module in root.modules():
        for name in module._non_persistent_buffers_set:
            buffer = module._buffers.get(name)
            if buffer is not None and buffer.is_floating_point():
                fixed.add(id(buffer))
        if hasattr(module, "_get_dtype_plan"):  # a transformers model: its fp32-kept tensors, where still fp32
            fixed.update(id(t) for _, _, t in _kept_fp32_tensors(module, torch.bfloat16) if t.dtype == torch.float32)
    return fixed


def keeping_fixed_dtypes(root: nn.Module, fn: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    """``fn`` (what ``nn.Module._apply`` applies to every tensor) changed so that the tensors of
    :func:`dtype_fixed_tensors` keep their dtype: a conversion moves them to the new device but does not cast them."""
    fixed = dtype_fixed_tensors(root)

    def apply(tensor: Tensor) -> Tensor:
        converted = fn(tensor)
        if id(tensor) in fixed and converted.dtype != tensor.dtype:
            return tensor.to(device=converted.device)
        return converted
    return apply


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
