"""Export a stage checkpoint — sharded (DCP) or a single file — as a stock Hugging Face model dir, in one process.

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

A single-process (or FSDP1) stage's checkpoint is one ``torch.save`` file whose ``state_dict`` holds the
student's tensors as ``student.*`` (the teacher is never saved; module.py). It is read with ``weights_only=True``
(no code in it runs) and ``mmap=True`` (the tensors are paged in from the file as they are written, not copied
into memory first; the optimizer state is never touched), the student is built on the meta device from the same
stage-dir config and takes those tensors strictly, and it is written by the stage export's own ``export_hf``:
``save_pretrained`` into ``<out>.tmp``, reloaded with stock ``from_pretrained`` to bit-identical logits (that
reload holds a second copy of the student; ``--no-verify`` skips it), then renamed into place.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lightning_slimmoe.hf_dir import HFDirWriter, read_back_problem
from lightning_slimmoe.models import init_non_persistent_buffers_, model_on_meta, persistent_tensors
from lightning_slimmoe.module import STUDENT_PREFIX
from lightning_slimmoe.run_dir import RunDir, StageDir
from lightning_slimmoe.strategies import DCP_METADATA, LIGHTNING_META

_MODEL_KEY = "state_dict"  # Lightning's checkpoint section holding the module's tensors


class ConsolidateError(ValueError):
    """A checkpoint that cannot be exported (missing, damaged, incomplete, or not matching the config)."""


def _check_checkpoint_dir(checkpoint: Path) -> None:
    if not checkpoint.exists():
        raise ConsolidateError(f"--checkpoint {str(checkpoint)!r}: no such file or directory")
    missing = [name for name in (DCP_METADATA, LIGHTNING_META) if not (checkpoint / name).is_file()]
    if missing:
        raise ConsolidateError(
            f"--checkpoint {str(checkpoint)!r}: not a complete sharded checkpoint (missing {', '.join(missing)}; "
            f"a DCP checkpoint is complete only once {DCP_METADATA} and then {LIGHTNING_META} are written). "
            "Use the newest complete step*.ckpt or last.ckpt")


def _check_matches(checkpoint: Path, config, config_path: str | None, model: nn.Module,
                   stored: dict[str, tuple[int, ...]]) -> None:
    """The checkpoint's student tensors (name -> shape) are exactly the model's, each with the model's shape."""
    expected = dict(persistent_tensors(model))
    aliases = set(model.state_dict())  # a tied tensor may be stored under each of its names
    missing = sorted(set(expected) - set(stored))
    unexpected = sorted(set(stored) - aliases)
    wrong = [f"{n}: checkpoint {stored[n]} vs config {tuple(t.shape)}" for n, t in model.state_dict().items()
             if n in stored and stored[n] != tuple(t.shape)]
    if missing or unexpected or wrong:
        problems = ([f"missing from the checkpoint: {missing[:8]}" + (" ..." if len(missing) > 8 else "")] if missing else []) \
            + ([f"not in the model: {unexpected[:8]}" + (" ..." if len(unexpected) > 8 else "")] if unexpected else []) \
            + ([f"shapes differ: {'; '.join(wrong[:8])}"] if wrong else [])
        raise ConsolidateError(f"--checkpoint {str(checkpoint)!r} does not match the config "
                               f"({config.model_type}, {config_path or 'the stage dir config.json'}): "
                               + " | ".join(problems))


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
    """Write the student of the stage checkpoint ``checkpoint`` (a sharded DCP directory, or a single file) as a
    stock HF dir ``out_dir``; returns it."""
    from torch.distributed.checkpoint import FileSystemReader, TensorStorageMetadata

    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    if checkpoint.is_file():
        return export_single_file_checkpoint(checkpoint, out_dir, config_path, tokenizer_path, with_tokenizer,
                                             max_shard_bytes, verify)
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
    _check_matches(checkpoint, config, config_path, model, {n: tuple(getattr(md, "size", ())) for n, md in stored.items()})
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


# Reload check of a single-file export: stock from_pretrained must give the checkpoint's model's logits on these ids.
PROBE_TOKENS = 32


def _read_single_file(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The student's tensors (``student.`` stripped) of a single-file stage checkpoint, memory-mapped."""
    try:
        # weights_only: no code in the file runs; mmap: tensors are read from the file when used, not copied first.
        state = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # truncated, not a torch file, or objects weights_only refuses: one line, no traceback
        first_line = (str(err).strip().splitlines() or [""])[0]
        raise ConsolidateError(
            f"--checkpoint {str(checkpoint)!r}: not a readable checkpoint file ({type(err).__name__}: {first_line}); "
            "checkpoints written by a run are complete or absent: use another step*.ckpt or last.ckpt of the "
            "stage") from err
    model_state = state.get(_MODEL_KEY) if isinstance(state, dict) else None
    if not isinstance(model_state, dict):
        keys = sorted(state)[:8] if isinstance(state, dict) else type(state).__name__
        raise ConsolidateError(f"--checkpoint {str(checkpoint)!r} has no {_MODEL_KEY!r} (holds {keys}): not a "
                               "Lightning checkpoint of a lightning_slimmoe stage")
    student = {k[len(STUDENT_PREFIX):]: v for k, v in model_state.items() if k.startswith(STUDENT_PREFIX)}
    if not student or not all(isinstance(v, torch.Tensor) for v in student.values()):
        raise ConsolidateError(f"--checkpoint {str(checkpoint)!r} holds no {STUDENT_PREFIX}* tensors (its "
                               f"{_MODEL_KEY} keys start with {sorted({k.split('.')[0] for k in model_state})}): "
                               "not a lightning_slimmoe stage checkpoint")
    return student


def export_single_file_checkpoint(checkpoint: Path, out_dir: Path, config_path: str | None = None,
                                  tokenizer_path: str | None = None, with_tokenizer: bool = True,
                                  max_shard_bytes: int = 2 * 2**30, verify: bool = True) -> Path:
    """Write the student of a single-file stage checkpoint (single process, or FSDP1's full student state dict) as a
    stock HF dir ``out_dir``, reload-checked unless ``verify`` is False; returns it. See the module docstring."""
    from lightning_slimmoe.export import export_hf

    state = _read_single_file(checkpoint)  # first: a damaged file is named as such, whatever else is missing
    config = _find_config(checkpoint, config_path)
    tokenizer = _find_tokenizer(checkpoint, tokenizer_path) if with_tokenizer else None
    model = model_on_meta(config)
    _check_matches(checkpoint, config, config_path, model, {n: tuple(t.shape) for n, t in state.items()})
    # assign: the parameters become the checkpoint's (memory-mapped) tensors, in the dtypes they were trained in
    model.load_state_dict(state, strict=True, assign=True)
    for module in model.modules():  # what no checkpoint holds (rotary inv_freq) is still on meta: recomputed
        for name in module._non_persistent_buffers_set:
            buffer = module._buffers.get(name)
            if buffer is not None and buffer.is_meta:
                module._buffers[name] = torch.empty_like(buffer, device="cpu")
    init_non_persistent_buffers_(model)
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()  # assign gave each of the tied names its own Parameter; one again, as from_pretrained has
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise ConsolidateError(f"--checkpoint {str(checkpoint)!r}: the model still has tensors no checkpoint holds "
                               f"after loading: {left[:8]}")
    model.eval()
    probe_ids = None
    if verify:
        generator = torch.Generator().manual_seed(0)
        probe_ids = torch.randint(0, config.vocab_size, (1, PROBE_TOKENS), generator=generator)
    return export_hf(model, out_dir, tokenizer=tokenizer, probe_ids=probe_ids, max_shard_bytes=max_shard_bytes)
