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
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import save_file

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"


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
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path beside ``path`` to write; on success it is fsync-ed and renamed to ``path``.
    On an exception the temporary file is removed and ``path`` keeps what it held."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
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


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    with atomic_file(path) as tmp:
        with open(tmp, "wb") as f:
            torch.save(obj, f)


def save_safetensors_atomic(tensors: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    with atomic_file(path) as tmp:
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
def atomic_dir(final: str | os.PathLike) -> Iterator[Path]:
    """Yields an empty ``<final>.tmp`` to fill; on success it replaces ``final`` (:func:`replace_dir`). On an
    exception ``final`` is left as it was (the partial ``.tmp`` stays for inspection and is cleared next time)."""
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
