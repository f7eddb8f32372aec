"""FSDP for teacher and student, applied in one place, per decoder layer.

Used from ``StageModule.configure_model``: FSDP2 (``fully_shard``) under Lightning's ``ModelParallelStrategy``,
FSDP1 (``FullyShardedDataParallel`` units) under ``FSDPStrategy`` (strategies.SlimFSDPStrategy); both also
run on CPU with gloo. The units are the same in both: every decoder layer, the base model (embeddings +
final norm) and the lm_head, for the student and, apart, for the frozen teacher, so each FSDP unit is
all-trainable or all-frozen. The teacher has no gradients, so it does no reduce-scatter and has no
optimizer state; it all-gathers a layer for its forward and frees it again.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lightning_slimmoe.config import ParallelConfig
from lightning_slimmoe.families import get_family
from lightning_slimmoe.models import init_non_persistent_buffers_, model_on_meta

def is_sharded(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in module.modules())


def fsdp_mesh(device: torch.device):
    """A 1-D mesh over every rank: FSDP only (no tensor parallelism in this project)."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (dist.get_world_size(),), mesh_dim_names=("fsdp",))


def shard_model(model: nn.Module, mesh, cfg: ParallelConfig, trainable: bool) -> nn.Module:
    """``fully_shard`` every decoder layer, the input embeddings, then the base model (final norm) and the lm_head."""
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
    # The input embeddings are a unit of their own, gathered for the lookup only (and the student's backward): in the
    # base model's unit they stayed gathered through every step, a whole [V, H] table per model and rank (0.58 GiB
    # each for Qwen3-30B-A3B, bench/memory.py). Tied to the head they stay with it (one parameter, one unit).
    embeddings = model.get_input_embeddings()
    if embeddings is not None and not getattr(model.config, "tie_word_embeddings", False):
        fully_shard(embeddings, mesh=mesh, mp_policy=mp, reshard_after_forward=True)
    # The pipeline calls `model.model` (hidden states) and `lm_head` chunk by chunk (distill.py), never the
    # *ForCausalLM forward, so the base model (embeddings + final norm) and the head are units of their own.
    # The head is called once per chunk: it stays gathered for the step (resharded by its backward, or by
    # `reshard_head` for the teacher) instead of being all-gathered again for every chunk.
    fully_shard(model.model, mesh=mesh, mp_policy=mp, reshard_after_forward=cfg.reshard_after_forward or not trainable)
    fully_shard(model.get_output_embeddings(), mesh=mesh, mp_policy=mp, reshard_after_forward=False)
    return model


def is_fsdp1_sharded(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FullyShardedDataParallel

    return any(isinstance(m, FullyShardedDataParallel) for m in module.modules())


def fsdp1_mixed_precision(cfg: ParallelConfig):
    """``parallel.param_dtype`` / ``reduce_dtype`` as FSDP1's ``MixedPrecision`` (the same keys as FSDP2's)."""
    from torch.distributed.fsdp import MixedPrecision

    if cfg.param_dtype is None and cfg.reduce_dtype is None:
        return None
    return MixedPrecision(param_dtype=cfg.dtype("param_dtype"), reduce_dtype=cfg.dtype("reduce_dtype"))


def fsdp1_unit_kwargs(strategy, cfg: ParallelConfig) -> dict:
    """``FullyShardedDataParallel`` arguments of every unit, from Lightning's ``FSDPStrategy`` (sharding strategy,
    CPU offload, its extra kwargs) and the ``parallel:`` dtypes (unless the strategy was given ``mixed_precision``).
    ``device_id`` is the rank's device, a ``torch.device`` so that FSDP1 also takes a CPU (gloo) rank."""
    kwargs = {k: v for k, v in strategy.kwargs.items() if k not in ("auto_wrap_policy", "device_mesh")}
    return {**kwargs, "sharding_strategy": strategy.sharding_strategy, "cpu_offload": strategy.cpu_offload,
            "mixed_precision": strategy.mixed_precision or fsdp1_mixed_precision(cfg),
            "device_id": strategy.root_device}


def shard_model_fsdp1(model: nn.Module, unit_kwargs: dict, cfg: ParallelConfig, trainable: bool) -> nn.Module:
    """FSDP1: wrap every decoder layer, then the base model (embeddings, final norm) and the lm_head, each a
    ``FullyShardedDataParallel`` unit built with ``unit_kwargs`` (from the strategy). The base model and the
    head are FSDP1 *roots* of their own (the pipeline calls them, never the *ForCausalLM forward): a root
    keeps its parameters gathered from its forward to its backward, so the head, called once per loss chunk
    and recomputed in backward (distill.py), is gathered once per step."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    if is_fsdp1_sharded(model):
        return model
    if getattr(model.config, "tie_word_embeddings", False) and model.get_output_embeddings() is not None:
        raise ValueError(f"{model.config.model_type}: tied input/output embeddings cannot be split into FSDP1 "
                         "units (one parameter in two units); use trainer.strategy=ModelParallelStrategy")
    if trainable and cfg.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    layers = get_family(model).decoder_layers(model)
    for i in range(len(layers)):
        layers[i] = FSDP(layers[i], **unit_kwargs)
    model.model = FSDP(model.model, **unit_kwargs)
    model.set_output_embeddings(FSDP(model.get_output_embeddings(), **unit_kwargs))
    return model


def clip_grad_norm_fsdp1_(model: nn.Module, max_norm: float) -> Tensor:
    """``torch.nn.utils.clip_grad_norm_`` over a model made of several FSDP1 roots (``FSDP.clip_grad_norm_``
    only covers one root, and Lightning's FSDP precision plugin refuses norm clipping). With
    ``use_orig_params`` each rank's ``.grad`` are its disjoint shards: the squared norms are summed over each
    unit's sharding group (not for NO_SHARD, whose gradients are whole on every rank)."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP, ShardingStrategy

    units = [m for m in model.modules() if isinstance(m, FSDP)]
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    device = grads[0].device if grads else next(model.parameters()).device
    square = torch.zeros((), dtype=torch.float32, device=device)
    for g in grads:
        square += g.detach().float().pow(2).sum()
    if units and units[0].sharding_strategy != ShardingStrategy.NO_SHARD:
        dist.all_reduce(square, group=units[0].process_group)
    total = square.sqrt()
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(coef.to(g.dtype))
    return total


def fsdp1_full_state_dict_options(device: torch.device):
    """``StateDictOptions`` for gathering FSDP1 units into full tensors: to rank 0's CPU from accelerators. On
    CPU ranks every rank gets the whole dict instead: offloading a CPU rank's gathered tensors "to CPU" aliases
    memory that FSDP frees right after (a crash while cloning them)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=device.type != "cpu")


def gather_fsdp1_model(model: nn.Module) -> nn.Module | None:
    """Rank 0: a plain copy of an FSDP1-sharded model (its full state dict, gathered unit by unit to CPU)
    for the HF export; other ranks take part in the gathers and get None."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(model, options=fsdp1_full_state_dict_options(next(model.parameters()).device))
    if dist.get_rank() != 0:
        return None
    plain = model_on_meta(model.config)
    plain.to_empty(device="cpu")  # buffers no state dict holds (rotary inv_freq) get real storage
    plain.load_state_dict(state, strict=True, assign=True)
    init_non_persistent_buffers_(plain)
    return plain.eval()


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
