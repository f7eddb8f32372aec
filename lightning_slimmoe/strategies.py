"""The distributed strategies a stage runs under, and the swap of Lightning's stock classes for them.

:class:`AtomicModelParallelStrategy` (FSDP2) and :class:`SlimFSDPStrategy` (FSDP1) are Lightning's own strategies
with student-only, complete-or-absent, finite-checked checkpoints; a recipe may name them directly, and a recipe
that names the stock ``ModelParallelStrategy`` / ``FSDPStrategy`` (or ``"fsdp"``) gets them in its place, with
the same arguments and a log line that says so (:func:`with_atomic_checkpoints`). A strategy given as a class name
or dotted path on the command line is resolved to its class first (:func:`resolve_strategy`).

Lightning's ``ModelParallelStrategy`` writes a distributed (DCP) checkpoint *into* its target directory: the
stage's ``last.ckpt/`` is rewritten in place every time, so a kill half-way through leaves the previous
``.metadata`` next to half-new shard files — a directory that looks complete and is not. PyTorch DCP's own
rule is that a checkpoint is complete only when its metadata is written last; this strategy extends that to
the directory: every rank writes its shards into ``<path>.tmp/``, DCP writes ``.metadata`` after all
shards, rank 0 writes Lightning's ``meta.pt`` after that, and only then is the directory renamed into place
(the previous one, if any, is first moved aside to ``<path>.old`` and deleted after). A reader therefore
sees either the old or the new checkpoint under ``<path>``; :func:`latest_complete_checkpoint` also accepts a
``.old`` left by a kill between the two renames.

Before anything is written, every rank checks its local shards of the weights and optimizer state for
NaN/Inf and the ranks agree (all-gather): a poisoned checkpoint is refused on *every* rank, naming the rank
and tensor, so retention never replaces the last finite checkpoint (torchtitan's rule).

Checkpoints written without sharding (``save_distributed_checkpoint: false``) go through the Trainer's
``CheckpointIO`` on rank 0 (``AtomicCheckpointIO``), which applies the same two rules to a single file.
"""

from __future__ import annotations

import importlib
import inspect
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import lightning.pytorch.strategies as lightning_strategies
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy, Strategy, StrategyRegistry
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)

from lightning_slimmoe.checkpoint_io import CHECKED_KEYS, first_non_finite
from lightning_slimmoe.config import ConfigError
from lightning_slimmoe.distributed import fsdp1_full_state_dict_options, is_fsdp1_sharded
from lightning_slimmoe.module import STUDENT_PREFIX
from lightning_slimmoe import storage

DCP_METADATA = ".metadata"  # written by torch.distributed.checkpoint after every shard
LIGHTNING_META = "meta.pt"  # Lightning's loop/callback state, written by rank 0 after DCP finished


def is_complete_checkpoint(path: Path) -> bool:
    """A single-file checkpoint exists only once complete (atomic rename); a sharded one needs both
    metadata files, which are written last."""
    if path.is_file():
        return True
    return path.is_dir() and (path / DCP_METADATA).is_file() and (path / LIGHTNING_META).is_file()


_STEP = re.compile(r"step(\d+)\.ckpt$")


def checkpoint_global_step(path: Path) -> int:
    """The ``global_step`` a complete checkpoint was saved at, without reading its tensors: a sharded one's from
    Lightning's ``meta.pt``, a single file memory-mapped (its tensors stay on disk)."""
    path = Path(path)
    source = path / LIGHTNING_META if path.is_dir() else path
    return int(torch.load(source, map_location="cpu", weights_only=True, mmap=True)["global_step"])


def latest_complete_checkpoint(ckpt_dir: Path) -> Path | None:
    """The checkpoint ``--resume true`` continues from: ``last.ckpt`` when complete; else (a kill between
    the two renames of a sharded save) ``last.ckpt.old``; else the newest complete ``step*.ckpt``."""
    for name in ("last.ckpt", "last.ckpt.old"):
        if is_complete_checkpoint(ckpt_dir / name):
            return ckpt_dir / name
    steps = sorted((int(m.group(1)), p) for p in ckpt_dir.glob("step*.ckpt") if (m := _STEP.search(p.name)))
    for _, path in reversed(steps):
        if is_complete_checkpoint(path):
            return path
    return None


class AtomicModelParallelStrategy(ModelParallelStrategy):
    """Lightning's FSDP2 strategy (``fully_shard`` in ``configure_model``) with atomic, finite-checked
    sharded checkpoints that hold the student only. Same constructor arguments as ``ModelParallelStrategy``."""

    # --- the student only: the frozen teacher is never gathered, saved or expected in a checkpoint --------
    def lightning_module_state_dict(self) -> dict[str, Any]:
        student = getattr(self.lightning_module, "student", None)
        if student is None:
            return super().lightning_module_state_dict()
        options = StateDictOptions(full_state_dict=not self._save_distributed_checkpoint, cpu_offload=True)
        return {STUDENT_PREFIX + k: v for k, v in get_model_state_dict(student, options=options).items()}

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict[str, Any]:
        """Lightning's sharded load asks DCP for *every* key of the module, the teacher's included, which a
        checkpoint never holds; load the student's keys (strictly) and the optimizer state instead."""
        path = Path(self.broadcast(str(checkpoint_path)))
        module = self.lightning_module
        student = getattr(module, "student", None)
        if student is None or not path.is_dir():
            return super().load_checkpoint(path, weights_only=weights_only)
        model_state = {"state_dict": {STUDENT_PREFIX + k: v for k, v in get_model_state_dict(student).items()}}
        dcp.load(model_state, checkpoint_id=path)
        module.load_state_dict(model_state["state_dict"], strict=True)
        for idx, optimizer in enumerate(self.optimizers):
            key = f"optimizer_{idx}"
            optim_state = {key: get_optimizer_state_dict(self.model, optimizer)}
            dcp.load(optim_state, checkpoint_id=path)
            set_optimizer_state_dict(self.model, optimizer, optim_state_dict=optim_state[key],
                                     options=StateDictOptions(cpu_offload=True))
        return torch.load(path / LIGHTNING_META, weights_only=True if weights_only is None else weights_only)

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options: Any | None = None) -> None:
        if not self._save_distributed_checkpoint:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        path = Path(self.broadcast(str(filepath)))
        self._refuse_non_finite(checkpoint, path)
        tmp = path.with_name(path.name + ".tmp")
        if self.global_rank == 0 and tmp.exists():
            shutil.rmtree(tmp)  # a half-written leftover of a killed save
        self.barrier("atomic_checkpoint_clean")
        with storage.writing("sharded checkpoint", path):
            super().save_checkpoint(checkpoint, tmp, storage_options)  # shards, then .metadata, then meta.pt
        self.barrier("atomic_checkpoint_written")
        if self.global_rank == 0:
            with storage.writing("sharded checkpoint", path):
                storage.replace_dir(tmp, path)  # the previous one moved aside to <path>.old, deleted after
        self.barrier("atomic_checkpoint_renamed")

    def _refuse_non_finite(self, checkpoint: dict[str, Any], path: Path) -> None:
        """Every rank checks its own shards; all ranks refuse together (a one-rank raise would deadlock)."""
        bad = None
        for key in CHECKED_KEYS:
            bad = bad or first_non_finite(checkpoint.get(key, {}), key)
        found = [bad]
        if dist.is_available() and dist.is_initialized() and self.world_size > 1:
            found = [None] * self.world_size
            dist.all_gather_object(found, bad)
        culprits = [(rank, name) for rank, name in enumerate(found) if name is not None]
        if culprits:
            where = "; ".join(f"rank {rank}: tensor {name}" for rank, name in culprits)
            raise FloatingPointError(
                f"refusing to write checkpoint {path} at global step {checkpoint.get('global_step')} "
                f"(this is rank {self.global_rank}): non-finite values (NaN/Inf) in {where}; the previous "
                "checkpoint is kept")


LIGHTNING_ACTIVATION_CHECKPOINTING = (
    "FSDPStrategy(activation_checkpointing...): Lightning's checkpoint wrapper renames the parameters (breaking "
    "export and resume); set `parallel.activation_checkpointing: true` instead")


class SlimFSDPStrategy(FSDPStrategy):
    """Lightning's FSDP1 strategy for a stage. ``StageModule.configure_model`` wraps the FSDP units itself
    (``distributed.shard_model_fsdp1``: the units FSDP2 uses), so Lightning never makes the whole module one
    root unit, which would mix the frozen teacher with the trainable student in one flat parameter.
    Checkpoints hold the student only, as a full state dict written by rank 0 through the Trainer's
    ``AtomicCheckpointIO`` (complete-or-absent, finite-checked), and resume on any number of ranks.

    Same constructor as ``FSDPStrategy``. Not taken: ``state_dict_type="sharded"`` (use ``ModelParallelStrategy``,
    whose sharded checkpoints are atomic and student-only) and Lightning's ``activation_checkpointing*``
    (its wrapper renames parameters; use ``parallel.activation_checkpointing``). Unlike the stock class it
    also runs on CPU ranks (gloo), which is how the tests run it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self._state_dict_type != "full":
            raise ValueError(f"FSDPStrategy(state_dict_type={self._state_dict_type!r}) is not supported: FSDP1 "
                             "checkpoints here are full student state dicts (state_dict_type: full). For sharded "
                             "checkpoints use trainer.strategy=ModelParallelStrategy (FSDP2)")
        if self._activation_checkpointing_kwargs:
            raise ValueError(LIGHTNING_ACTIVATION_CHECKPOINTING)

    def _setup_model(self, model):
        if not is_fsdp1_sharded(model):
            raise RuntimeError(f"{type(model).__name__}: FSDP1 units are made by StageModule.configure_model; "
                               "this strategy does not wrap whole modules")
        return super()._setup_model(model)

    # --- the student only, whole: gathered unit by unit (to rank 0's CPU on accelerators; rank 0 writes) ----
    def lightning_module_state_dict(self) -> dict[str, Any]:
        student = getattr(self.lightning_module, "student", None)
        if student is None:
            return super().lightning_module_state_dict()
        state = get_model_state_dict(student, options=fsdp1_full_state_dict_options(self.root_device))
        return {STUDENT_PREFIX + k: v for k, v in state.items()}

    def optimizer_state(self, optimizer) -> dict[str, Any]:
        """Keyed by the student's parameter names (the teacher, never in the optimizer, is not traversed)."""
        student = getattr(self.lightning_module, "student", None)
        if student is None:
            return super().optimizer_state(optimizer)
        optimizer = getattr(optimizer, "_optimizer", optimizer)  # a LightningOptimizer's wrapped optimizer
        return get_optimizer_state_dict(student, optimizer, options=fsdp1_full_state_dict_options(self.root_device))

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict[str, Any]:
        """A full student checkpoint, read on every rank and loaded into its shards (weights strictly, then
        the optimizer state when fitting); whatever else it holds goes back to Lightning."""
        student = getattr(self.lightning_module, "student", None)
        path = Path(self.broadcast(str(checkpoint_path)))
        if student is None or not path.is_file():
            return super().load_checkpoint(path, weights_only=weights_only)
        checkpoint = torch.load(path, map_location="cpu", weights_only=True if weights_only is None else weights_only)
        state = {k[len(STUDENT_PREFIX):]: v for k, v in checkpoint.pop("state_dict").items()}
        set_model_state_dict(student, state, options=StateDictOptions(full_state_dict=True, strict=True))
        optimizer_states = checkpoint.pop("optimizer_states", None)
        if optimizer_states is not None and self.lightning_module.trainer.state.fn == TrainerFn.FITTING:
            if len(optimizer_states) != len(self.optimizers):
                raise RuntimeError(f"the checkpoint holds {len(optimizer_states)} optimizer states for "
                                   f"{len(self.optimizers)} optimizers")
            for optimizer, optimizer_state in zip(self.optimizers, optimizer_states):
                set_optimizer_state_dict(student, optimizer, optimizer_state,
                                         options=StateDictOptions(full_state_dict=True))
        return checkpoint


_SAID: set[str] = set()


def _say_once(message: str) -> None:
    """One log line per process for each swap (a Trainer is built per stage)."""
    if message not in _SAID:
        _SAID.add(message)
        rank_zero_info(message)


def with_atomic_checkpoints(strategy):
    """Lightning's stock ``ModelParallelStrategy`` rewrites a sharded checkpoint in place (a kill mid-save
    leaves a directory that looks complete); :class:`AtomicModelParallelStrategy`, with the same arguments, takes
    its place. ``FSDPStrategy`` (FSDP1, also as "fsdp" / "fsdp_cpu_offload") becomes :class:`SlimFSDPStrategy`
    (per-layer units for teacher and student, student-only checkpoints). Each swap is logged; every other
    strategy (our own classes included) is returned as given."""
    if strategy in ("fsdp", "fsdp_cpu_offload"):
        _say_once(f"trainer.strategy={strategy!r}: using {__name__}.SlimFSDPStrategy (FSDP1 units per decoder "
                  "layer for teacher and student, student-only checkpoints)")
        return SlimFSDPStrategy(cpu_offload=strategy == "fsdp_cpu_offload")
    if type(strategy) is FSDPStrategy:
        if strategy._activation_checkpointing_kwargs:  # not passed on below: refused here, as the class does
            raise ValueError(LIGHTNING_ACTIVATION_CHECKPOINTING)
        _say_once(f"trainer.strategy=FSDPStrategy: using {__name__}.SlimFSDPStrategy with the same arguments "
                  "(FSDP1 units per decoder layer for teacher and student, student-only checkpoints)")
        return SlimFSDPStrategy(
            process_group_backend=strategy._process_group_backend, timeout=strategy._timeout,
            cpu_offload=strategy.cpu_offload, mixed_precision=strategy.mixed_precision,
            sharding_strategy=strategy.sharding_strategy, state_dict_type=strategy._state_dict_type,
            **strategy.kwargs)
    if type(strategy) is not ModelParallelStrategy:
        return strategy
    _say_once(f"trainer.strategy=ModelParallelStrategy: using {__name__}.AtomicModelParallelStrategy with the same "
              "arguments (atomic, finite-checked, student-only sharded checkpoints)")
    return AtomicModelParallelStrategy(
        data_parallel_size=strategy._data_parallel_size, tensor_parallel_size=strategy._tensor_parallel_size,
        save_distributed_checkpoint=strategy._save_distributed_checkpoint,
        process_group_backend=strategy._process_group_backend, timeout=strategy._timeout)


def resolve_strategy(strategy):
    """``trainer.strategy`` as the Trainer takes it, resolved once where the recipe's ``trainer`` section is read (so
    that planning, the memory plan and every stage see the same strategy class).

    jsonargparse keeps any string given for ``strategy`` (its type is ``str | Strategy``) and Lightning accepts only
    ``"auto"`` and its registry's names (``ddp``, ``fsdp``, ...), so ``--trainer.strategy ModelParallelStrategy``
    failed with Lightning's "invalid strategy name". A string that is not one of those names a strategy class: short
    (Lightning's ``ModelParallelStrategy``, ``FSDPStrategy``, ``DDPStrategy``, ... or this module's
    ``AtomicModelParallelStrategy`` / ``SlimFSDPStrategy``) or a dotted path
    (``lightning.pytorch.strategies.ModelParallelStrategy``); it becomes an instance with the class's defaults (then
    :func:`with_atomic_checkpoints` swaps the stock classes, as for a YAML ``class_path``). Anything else is a
    :class:`ConfigError` that lists the forms that work. Instances (a YAML ``class_path``) are returned as given."""
    if not isinstance(strategy, str) or strategy == "auto" or strategy in StrategyRegistry.available_strategies():
        return strategy
    cls = _strategy_class(strategy)
    if cls is None:
        registry = StrategyRegistry.available_strategies()
        names = sorted(n for n in registry if "_find_unused_parameters_" not in n)  # their variants, said once
        variants = " (and the ddp* names with _find_unused_parameters_true/_false)" if len(names) < len(registry) else ""
        raise ConfigError(
            f"trainer.strategy={strategy!r} is neither a Lightning strategy name nor a strategy class; give a name "
            f"({', '.join(['auto', *names])}){variants}, a class name ({', '.join(_short_strategy_classes())}), a dotted class path (e.g. "
            "lightning.pytorch.strategies.ModelParallelStrategy), or in a YAML a class_path with init_args")
    try:
        return cls()
    except Exception as err:  # e.g. a class whose package is missing (DeepSpeedStrategy without deepspeed)
        raise ConfigError(f"trainer.strategy={strategy!r}: {cls.__module__}.{cls.__name__}() with its default "
                          f"arguments failed: {err}") from err


def _concrete_strategy(obj) -> bool:
    return isinstance(obj, type) and issubclass(obj, Strategy) and not inspect.isabstract(obj)


def _short_strategy_classes() -> list[str]:
    """Strategy classes a recipe may name without a module: Lightning's and this module's."""
    lightning = [n for n in dir(lightning_strategies) if _concrete_strategy(getattr(lightning_strategies, n, None))]
    return [*lightning, AtomicModelParallelStrategy.__name__, SlimFSDPStrategy.__name__]


def _strategy_class(name: str) -> type[Strategy] | None:
    if "." in name:
        module, _, attr = name.rpartition(".")
        try:
            found = getattr(importlib.import_module(module), attr, None)
        except ImportError:
            return None
    elif name in _short_strategy_classes():
        found = getattr(lightning_strategies, name, None) or globals()[name]
    else:
        return None
    return found if _concrete_strategy(found) else None
