"""Consolidate a sharded (DCP) stage checkpoint into a stock Hugging Face model dir, in one process.

Under ``ModelParallelStrategy`` a stage's ``checkpoints/*.ckpt/`` are ``torch.distributed.checkpoint``
directories (``state_dict.student.*`` tensors, optimizer state, ``.metadata``) plus Lightning's ``meta.pt``
(strategies.py). ``python -m lightning_slimmoe export --checkpoint DIR --out DIR`` turns one into what
``save_pretrained`` would have written, without a process group and without ever holding the model: the
student is built on the meta device from the config the pipeline wrote into the stage dir when the stage
started (``StageDir.config_file``), then each tensor is read alone from the DCP files
(``dcp.load(..., no_dist=True)``, which reassembles a tensor from every rank's shards) and handed to the
HF-directory writer (hf_dir.py, the one the sharded stage export uses). Peak memory: one full tensor plus one
output shard. The written dir is read back tensor by tensor (the same reader the sharded loader uses) and
compared bit for bit with the checkpoint before it is renamed into place.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lightning_slimmoe.hf_dir import HFDirWriter, read_back_problem
from lightning_slimmoe.models import model_on_meta, persistent_tensors
from lightning_slimmoe.module import STUDENT_PREFIX
from lightning_slimmoe.run_dir import RunDir, StageDir
from lightning_slimmoe.strategies import DCP_METADATA, LIGHTNING_META

_MODEL_KEY = "state_dict"  # Lightning's checkpoint section holding the module's tensors


class ConsolidateError(ValueError):
    """A checkpoint that cannot be consolidated (not a DCP dir, incomplete, or not matching the config)."""


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

    path = Path(config_path) if config_path else StageDir.of_checkpoint(checkpoint).config_file
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
    run_dir = RunDir.of_stage(StageDir.of_checkpoint(checkpoint))
    run_file = run_dir.run_file
    if not run_file.is_file():
        raise ConsolidateError(f"no {run_file.name} in {str(run_dir.path)!r} (the run dir the checkpoint lies in): "
                               "pass --tokenizer PATH, or --no-tokenizer to write the weights and config only")
    teacher = run_dir.read_record().get("teacher")
    source = teacher if teacher is not None else str(run_dir.tokenizer_dir)
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

    model: nn.Module = model_on_meta(config)  # shapes only: the weights come from the checkpoint, tensor by tensor
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

    writer = HFDirWriter(out_dir, model, max_shard_bytes)
    dtypes: dict[torch.dtype, int] = {}
    with torch.no_grad():
        for name in expected:
            tensor = _read_tensor(checkpoint, prefix + name, empty_like_stored(name))
            if tensor.is_floating_point():
                dtypes[tensor.dtype] = dtypes.get(tensor.dtype, 0) + tensor.numel()
            writer.add(name, tensor)
            del tensor
    # save_pretrained records the dtype the tensors are stored in.
    tmp = writer.finish(config, max(dtypes, key=dtypes.get) if dtypes else torch.float32, tokenizer=tokenizer)
    if verify:  # read back through the reader the sharded loader uses (per test_loading, what from_pretrained reads)
        wanted = ((name, like, _read_tensor(checkpoint, prefix + name, empty_like_stored(name)), 0)
                  for name, like in expected.items())
        problem = read_back_problem(tmp, model, wanted)
        if problem is not None:
            raise ConsolidateError(f"export {tmp}: {problem} from {checkpoint} (not renamed into place)")
    return writer.commit()
