"""Consolidate a sharded (DCP) stage checkpoint into a stock Hugging Face model dir, in one process.

Under ``ModelParallelStrategy`` a stage's ``checkpoints/*.ckpt/`` are ``torch.distributed.checkpoint``
directories (``state_dict.student.*`` tensors, optimizer state, ``.metadata``) plus Lightning's ``meta.pt``
(strategies.py). ``python -m lightning_slimmoe export --checkpoint DIR --out DIR`` turns one into what
``save_pretrained`` would have written, without a process group and without ever holding the model: the
student is built on the meta device from the config the pipeline wrote into the stage dir when the stage
started (:class:`StudentConfigWriter`), then each tensor is read alone from the DCP files
(``dcp.load(..., no_dist=True)``, which reassembles a tensor from every rank's shards), converted to the
``save_pretrained`` layout by transformers' own ``revert_weight_conversion`` and appended to a safetensors
shard (streaming.py's writer). Peak memory: one full tensor plus one output shard. The written dir is read
back tensor by tensor (loading.py's reader, the same code the sharded loader uses) and compared bit for bit
with the checkpoint before it is renamed into place.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from lightning_slimmoe.module import STUDENT_PREFIX
from lightning_slimmoe.strategies import DCP_METADATA, LIGHTNING_META

STAGE_CONFIG = "config.json"  # the stage's (slimmed) student config, in the stage dir
_MODEL_KEY = "state_dict"  # Lightning's checkpoint section holding the module's tensors


class ConsolidateError(ValueError):
    """A checkpoint that cannot be consolidated (not a DCP dir, incomplete, or not matching the config)."""


class StudentConfigWriter(Callback):
    """Writes the student's config (after slimming: ``on_fit_start`` runs after ExpertSlimming.setup and
    configure_model) to ``<stage_dir>/config.json`` on rank 0, atomically. It is what makes a sharded
    checkpoint of the stage readable on its own: DCP stores tensors, not the architecture."""

    def __init__(self, stage_dir: str | Path):
        self.stage_dir = Path(stage_dir)

    def on_fit_start(self, trainer, pl_module) -> None:
        if trainer.global_rank != 0:
            return
        student = pl_module.student
        config = copy.deepcopy(student.config)
        # What save_pretrained records besides the weights (as export_sharded_hf does).
        config.architectures = [type(student).__name__.removeprefix("FSDP")]
        self.stage_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.stage_dir / (STAGE_CONFIG + ".tmp")
        config.to_json_file(str(tmp))
        os.replace(tmp, self.stage_dir / STAGE_CONFIG)


def _check_checkpoint_dir(checkpoint: Path) -> None:
    if not checkpoint.exists():
        raise ConsolidateError(f"--checkpoint {str(checkpoint)!r}: no such file or directory")
    if checkpoint.is_file():
        raise ConsolidateError(
            f"--checkpoint {str(checkpoint)!r} is a single-file checkpoint, not a sharded (DCP) directory; "
            "only ModelParallelStrategy checkpoints need consolidating (a finished stage's hf/ is the export)")
    missing = [name for name in (DCP_METADATA, LIGHTNING_META) if not (checkpoint / name).is_file()]
    if missing:
        raise ConsolidateError(
            f"--checkpoint {str(checkpoint)!r}: not a complete sharded checkpoint (missing {', '.join(missing)}; "
            f"a DCP checkpoint is complete only once {DCP_METADATA} and then {LIGHTNING_META} are written). "
            "Use the newest complete step*.ckpt or last.ckpt")


def _find_config(checkpoint: Path, config_path: str | None):
    from transformers import AutoConfig

    path = Path(config_path) if config_path else checkpoint.resolve().parent.parent / STAGE_CONFIG
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ConsolidateError(
            f"student config {str(path)!r} not found: the pipeline writes it into the stage dir when the stage "
            "starts (<stage_dir>/config.json, next to checkpoints/); pass --config with the slimmed student's "
            "config.json (or an HF dir holding it)")
    return AutoConfig.from_pretrained(str(path))


def _find_tokenizer(checkpoint: Path, tokenizer_path: str | None):
    """``--tokenizer``, else the run's: the teacher's (``run.json``), or the ``tokenizer/`` a pretrain run saved."""
    from transformers import AutoTokenizer

    if tokenizer_path:
        return AutoTokenizer.from_pretrained(tokenizer_path)
    run_dir = checkpoint.resolve().parent.parent.parent  # <run>/stage_<k>_<name>/checkpoints/<ckpt>
    run_file = run_dir / "run.json"
    if not run_file.is_file():
        raise ConsolidateError(f"no run.json in {str(run_dir)!r} (the run dir the checkpoint lies in): pass "
                               "--tokenizer PATH, or --no-tokenizer to write the weights and config only")
    teacher = json.loads(run_file.read_text()).get("teacher")
    source = teacher if teacher is not None else str(run_dir / "tokenizer")
    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise ConsolidateError(f"the run's tokenizer {source!r} (from {run_file}) cannot be loaded ({err}); pass "
                               "--tokenizer PATH or --no-tokenizer") from err


def _read_tensor(checkpoint: Path, key: str, like: torch.Tensor) -> torch.Tensor:
    """One whole tensor of the checkpoint, reassembled from every rank's shards, in this process alone."""
    import torch.distributed.checkpoint as dcp

    name = key[len(_MODEL_KEY) + 1:]
    state = {_MODEL_KEY: {name: like}}
    dcp.load(state, checkpoint_id=str(checkpoint), no_dist=True)
    return state[_MODEL_KEY][name]


def consolidate_checkpoint(checkpoint: str | Path, out_dir: str | Path, config_path: str | None = None,
                           tokenizer_path: str | None = None, with_tokenizer: bool = True,
                           max_shard_bytes: int = 2 * 2**30, verify: bool = True) -> Path:
    """Write the student of the sharded checkpoint ``checkpoint`` as a stock HF dir ``out_dir``; returns it."""
    from torch.distributed.checkpoint import FileSystemReader, TensorStorageMetadata
    from transformers import AutoModelForCausalLM
    from transformers.core_model_loading import revert_weight_conversion

    from lightning_slimmoe.export import replace_dir
    from lightning_slimmoe.loading import CheckpointReader, persistent_tensors
    from lightning_slimmoe.streaming import _ShardWriter

    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    _check_checkpoint_dir(checkpoint)
    config = _find_config(checkpoint, config_path)
    tokenizer = _find_tokenizer(checkpoint, tokenizer_path) if with_tokenizer else None
    prefix = f"{_MODEL_KEY}.{STUDENT_PREFIX}"
    metadata = FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata
    stored = {k[len(prefix):]: v for k, v in metadata.items() if k.startswith(prefix)}
    if not stored:
        raise ConsolidateError(f"--checkpoint {str(checkpoint)!r} holds no {prefix}* tensors (keys start with "
                               f"{sorted({k.split('.')[0] for k in metadata})}): not a lightning_slimmoe stage "
                               "checkpoint")

    with torch.device("meta"):  # shapes only: the weights come from the checkpoint, tensor by tensor
        model: nn.Module = AutoModelForCausalLM.from_config(config)
    expected = dict(persistent_tensors(model))
    aliases = set(model.state_dict())  # a tied tensor may be stored under each of its names
    missing = sorted(set(expected) - set(stored))
    unexpected = sorted(set(stored) - aliases)
    wrong = [f"{n}: checkpoint {tuple(stored[n].size)} vs config {tuple(t.shape)}" for n, t in expected.items()
             if n in stored and tuple(stored[n].size) != tuple(t.shape)]
    if missing or unexpected or wrong:
        problems = ([f"missing from the checkpoint: {missing[:8]}" + (" ..." if len(missing) > 8 else "")] if missing else []) \
            + ([f"not in the model: {unexpected[:8]}" + (" ..." if len(unexpected) > 8 else "")] if unexpected else []) \
            + ([f"shapes differ: {'; '.join(wrong[:8])}"] if wrong else [])
        raise ConsolidateError(f"--checkpoint {str(checkpoint)!r} does not match the config "
                               f"({config.model_type}, {config_path or 'the stage dir config.json'}): "
                               + " | ".join(problems))
    for name in expected:
        if not isinstance(stored[name], TensorStorageMetadata):
            raise ConsolidateError(f"--checkpoint {str(checkpoint)!r}: {prefix}{name} is not stored as a tensor")

    def empty_like_stored(name: str) -> torch.Tensor:
        md = stored[name]
        return torch.empty(tuple(md.size), dtype=md.properties.dtype)

    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    writer = _ShardWriter(tmp, max_shard_bytes)
    dtypes: dict[torch.dtype, int] = {}
    with torch.no_grad():
        for name in expected:
            tensor = _read_tensor(checkpoint, prefix + name, empty_like_stored(name))
            if tensor.is_floating_point():
                dtypes[tensor.dtype] = dtypes.get(tensor.dtype, 0) + tensor.numel()
            for key, piece in revert_weight_conversion(model, {name: tensor}).items():
                writer.add(key, piece)
            del tensor
    writer.finish()
    # What save_pretrained records besides the weights: the dtype the tensors are stored in, the class.
    dtype = max(dtypes, key=dtypes.get) if dtypes else torch.float32
    config.dtype = str(dtype).removeprefix("torch.")
    config.architectures = [type(model).__name__]
    config.save_pretrained(tmp)
    if model.can_generate():
        model.generation_config.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    if verify:  # read back through loading.py (what the sharded loader and, per test_loading, from_pretrained read)
        with CheckpointReader(tmp, model) as reader, torch.no_grad():
            for name, like in expected.items():
                want = _read_tensor(checkpoint, prefix + name, empty_like_stored(name))
                rows = want.shape[0] if want.dim() else 1
                for offset, block in reader.blocks(name, like, 0, rows):
                    mine = want if want.dim() == 0 else want[offset:offset + block.shape[0]]
                    if block.shape != mine.shape or not torch.equal(block.to(mine.dtype), mine):
                        raise ConsolidateError(f"export {tmp}: {name} rows {offset}.. read back differently from "
                                               f"{checkpoint} (not renamed into place)")
                reader.release()
    replace_dir(tmp, out_dir)
    return out_dir


def main(args: list[str]) -> Path:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m lightning_slimmoe export",
        description="Consolidate a sharded (ModelParallelStrategy / DCP) stage checkpoint into a stock HF dir, "
                    "in one process, one tensor at a time.")
    parser.add_argument("--checkpoint", required=True, help="<run>/stage_<k>_<name>/checkpoints/<name>.ckpt/")
    parser.add_argument("--out", required=True, help="HF model dir to write (replaced atomically)")
    parser.add_argument("--config", help="student config.json or HF dir (default: <stage_dir>/config.json)")
    parser.add_argument("--tokenizer", help="tokenizer dir / hub id (default: the run's, from run.json)")
    parser.add_argument("--no-tokenizer", action="store_true", help="write weights and config only")
    parser.add_argument("--max-shard-gib", type=float, default=2.0)
    parser.add_argument("--no-verify", action="store_true", help="skip reading the result back (a second pass)")
    opts = parser.parse_args(args)
    try:
        out = consolidate_checkpoint(opts.checkpoint, opts.out, config_path=opts.config,
                                     tokenizer_path=opts.tokenizer, with_tokenizer=not opts.no_tokenizer,
                                     max_shard_bytes=int(opts.max_shard_gib * 2**30), verify=not opts.no_verify)
    except ConsolidateError as err:
        import sys

        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {out}")
    return out
