"""On-disk primitives: atomic files and directories, and safetensors shards.

Every file the project writes goes through here, so each one is complete-or-absent: it is written under a
temporary name, flushed and ``fsync``-ed, renamed into place with ``os.replace`` and the parent directory is
``fsync``-ed, so that a kill (or a power loss) at any point leaves either the previous version or the new one
under the final name, never half of one.

* :func:`atomic_file` — one file (the base of :func:`write_json_atomic`, :func:`write_text_atomic`,
  :func:`atomic_torch_save`, :func:`save_safetensors_atomic`).
* :func:`atomic_dir` — one directory, written under ``<dir>.tmp`` and swapped in by :func:`replace_dir`.
* :func:`weight_files` / :class:`ShardWriter` — the safetensors files of an HF model dir: which ones there are
  (``model.safetensors`` or the ``model.safetensors.index.json`` shards), and writing tensors into size-capped
  shards with their index, in the layout ``save_pretrained`` writes.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import struct
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import save_file

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"


class StorageError(OSError):
    """A write that failed (disk full, quota, read-only or failing disk): what, where, and how much space is left.
    The previous version of the file or directory is still in place."""


_FULL = (errno.ENOSPC, errno.EDQUOT)


def _disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it: torch, safetensors and DCP wrap the OS error) is a full disk or quota."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _FULL:
            return True
        if any(s in str(exc) for s in ("No space left on device", "os error 28", "Disk quota exceeded")):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _free_space(path: Path) -> str:
    for candidate in (path, *path.parents):
        if candidate.exists():
            try:
                return f"{shutil.disk_usage(candidate).free / 2**20:,.1f} MiB free on {candidate}"
            except OSError:
                break
    return "free space unknown"


@contextlib.contextmanager
def writing(what: str, path: str | os.PathLike) -> Iterator[None]:
    """Turn a failed write of ``what`` at ``path`` into one :class:`StorageError` line that says what was being
    written, where, and how much space is left (the run's last complete files are untouched: every write here goes
    to a temporary name first)."""
    try:
        yield
    except StorageError:
        raise
    except Exception as err:
        path = Path(path)
        if _disk_full(err):
            raise StorageError(errno.ENOSPC, f"no space left on the device writing {what} {path} "
                                             f"({_free_space(path)}); the previous {what} is kept: free space, "
                                             "then continue with --resume true") from err
        if isinstance(err, OSError):
            raise StorageError(err.errno, f"could not write {what} {path}: {err.strerror or err} "
                                          f"({_free_space(path)}); the previous {what} is kept") from err
        raise


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename inside ``path`` durable (POSIX: the directory entry is data of the directory)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    fsync_dir(root)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, what: str | None = None) -> Iterator[Path]:
    """Yields a temporary path beside ``path`` to write; on success it is fsync-ed and renamed to ``path``.
    On an exception the temporary file is removed and ``path`` keeps what it held; a failed write is a
    :class:`StorageError` naming ``what`` (default: the file name) and ``path``."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with writing(what or path.name, path):
        try:
            yield tmp
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()
        fsync_dir(path.parent)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """``data`` as indented JSON at ``path`` (never half-written)."""
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def atomic_torch_save(obj: Any, path: str | os.PathLike, what: str | None = None) -> None:
    with atomic_file(path, what) as tmp:
        with open(tmp, "wb") as f:
            torch.save(obj, f)


def save_safetensors_atomic(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                            what: str | None = None) -> None:
    with atomic_file(path, what) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"format": "pt"})


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def replace_dir(tmp: Path, final: Path) -> None:
    """Swap the complete directory ``tmp`` in as ``final`` (a directory or a file): the old one is moved aside to
    ``<final>.old`` first and deleted after, so a kill between the renames leaves ``final.old`` (complete) rather
    than nothing."""
    tmp, final = Path(tmp), Path(final)
    _fsync_tree(tmp)
    old = final.with_name(final.name + ".old")
    _remove(old)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    _remove(old)


def fresh_tmp_dir(final: str | os.PathLike) -> Path:
    """``<final>.tmp``, emptied (a leftover of a killed write is removed) and created."""
    tmp = Path(final).with_name(Path(final).name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike, what: str | None = None) -> Iterator[Path]:
    """Yields an empty ``<final>.tmp`` to fill; on success it replaces ``final`` (:func:`replace_dir`). On an
    exception ``final`` is left as it was (the partial ``.tmp`` stays for inspection and is cleared next time);
    a failed write is a :class:`StorageError` naming ``what`` (default: the directory name)."""
    with writing(what or Path(final).name, final):
        tmp = fresh_tmp_dir(final)
        yield tmp
        replace_dir(tmp, Path(final))


# ---------------------------------------------------------------------------------------------------
# safetensors
# ---------------------------------------------------------------------------------------------------
def weight_files(model_dir: str | os.PathLike) -> list[Path]:
    """The safetensors files of an HF model dir: the shards its index names, or its single file."""
    model_dir = Path(model_dir)
    index = model_dir / SAFETENSORS_INDEX
    if index.exists():
        return sorted({model_dir / f for f in json.loads(index.read_text())["weight_map"].values()})
    single = model_dir / SAFETENSORS_SINGLE
    if not single.exists():
        raise FileNotFoundError(f"{model_dir}: no {SAFETENSORS_SINGLE} or {SAFETENSORS_INDEX}; only safetensors "
                                "checkpoints are read")
    return [single]


class ShardWriter:
    """Appends tensors to ``model-XXXXX-of-YYYYY.safetensors`` shards of at most ``max_shard_bytes`` (one tensor
    may exceed it alone) in ``out``, then writes ``model.safetensors.index.json``. Memory: one pending shard."""

    def __init__(self, out: str | os.PathLike, max_shard_bytes: int = 2 * 2**30):
        self.out, self.max_bytes = Path(out), max_shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.files: list[tuple[str, list[str]]] = []

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self.flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += size

    def flush(self) -> None:
        if not self.pending:
            return
        filename = f"model-{len(self.files) + 1:05d}.safetensors"
        save_file(self.pending, str(self.out / filename), metadata={"format": "pt"})
        self.files.append((filename, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> None:
        self.flush()
        total = len(self.files)
        weight_map = {}
        for i, (old, names) in enumerate(self.files, start=1):
            new = f"model-{i:05d}-of-{total:05d}.safetensors"
            (self.out / old).rename(self.out / new)
            weight_map.update({n: new for n in names})
        (self.out / SAFETENSORS_INDEX).write_text(
            json.dumps({"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))


# bytes per element of the safetensors dtypes (F4 and other sub-byte types are not size-checked)
_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "I16": 2, "U16": 2, "F16": 2,
                "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
_MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit on the JSON header


def safetensors_header(path: str | os.PathLike) -> tuple[dict | None, str | None]:
    """``(header, problem)`` of a safetensors file, reading its header only: the tensors it declares, or what is wrong
    (truncated, not safetensors, a tensor whose byte range does not match its shape, data past the end of the file)."""
    path = Path(path)
    size = path.stat().st_size
    if size < 8:
        return None, f"{size} bytes: truncated (no safetensors header)"
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > min(size - 8, _MAX_HEADER_BYTES):
            return None, f"header length {header_len:,} exceeds the file's {size:,} bytes: truncated or not safetensors"
        raw = f.read(header_len)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None, "its header is not valid JSON: damaged or not a safetensors file"
    if not isinstance(header, dict):
        return None, "its header is not a JSON object: damaged or not a safetensors file"
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    data_end = 0
    for name, info in tensors.items():
        try:
            begin, end = (int(x) for x in info["data_offsets"])
            shape, dtype = [int(d) for d in info["shape"]], info["dtype"]
        except (KeyError, TypeError, ValueError):
            return None, f"tensor {name!r} has a malformed header entry {info!r}"
        count = 1
        for d in shape:
            count *= d
        if dtype in _DTYPE_BYTES and end - begin != count * _DTYPE_BYTES[dtype]:
            return None, (f"tensor {name!r} ({dtype} {shape}) spans {end - begin:,} bytes, "
                          f"{count * _DTYPE_BYTES[dtype]:,} expected")
        data_end = max(data_end, end)
    if 8 + header_len + data_end > size:
        return None, f"truncated: {size:,} bytes, its header describes {8 + header_len + data_end:,}"
    return tensors, None


def model_weights_problem(model_dir: str | os.PathLike) -> str | None:
    """What is wrong with the safetensors weights of an HF model dir (headers only, no tensor is read): a damaged
    index, a shard it names that is missing or damaged, a tensor the index places in a shard that lacks it."""
    model_dir = Path(model_dir)
    index_file = model_dir / SAFETENSORS_INDEX
    if index_file.exists():
        try:
            weight_map = json.loads(index_file.read_text())["weight_map"]
            placed: dict[str, list[str]] = {}
            for key, file in weight_map.items():
                placed.setdefault(file, []).append(key)
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError):
            return f"{index_file.name}: not a valid safetensors index (JSON with a weight_map of tensor -> file)"
    else:
        placed = {SAFETENSORS_SINGLE: []}
    for file, keys in sorted(placed.items()):
        path = model_dir / file
        if not path.is_file():
            return f"{file}: missing (named by {index_file.name} for {len(keys)} tensors)"
        tensors, problem = safetensors_header(path)
        if problem is not None:
            return f"{file}: {problem}"
        absent = [k for k in keys if k not in tensors]
        if absent:
            return f"{file}: lacks {len(absent)} tensors that {index_file.name} places there, e.g. {absent[0]!r}"
    return None
