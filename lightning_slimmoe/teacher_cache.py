"""Teacher top-k cache: the frozen teacher's top-k (values, ids) for the training tokens, computed once and read
back by every KD stage instead of running the teacher forward (2 x teacher-active FLOPs per token).

The teacher is the same original model in every stage (SlimMoE §3) and its top-k for a sample depends only on the
sample's tokens, so the cache is keyed by *training-block index* (training samples carry ``block_index``, see
``data.py``). It holds the blocks that the run's KD stages read — every training block once they read an epoch or
more — so building it never costs more teacher forwards than the stages would run live.

A cache directory:

    building.json            written first: what is being built; marks the directory as a (partial) cache of ours
    blocks.safetensors       ``block_index`` (M,) int64, sorted: the cached training blocks
    part-000000.safetensors  ``block_index`` (F,), ``values`` (F, T, k), ``ids`` (F, T, k): the blocks at positions
                             [c*F, (c+1)*F) of that list (the last part may hold fewer), written by rank
                             c % world_size under a temporary name and renamed into place
    meta.json                written LAST, atomically: a cache is complete exactly when meta.json exists

Only safetensors (memory-mapped) and JSON are read: no pickle. ``values`` are float32 (the KD loss equals the live
teacher's) or bfloat16 (half the size); ``ids`` are uint16 when the vocabulary fits, else int32: 48 or 64 B/token
at k = 8 in float32, 32 or 48 B/token in bfloat16. A complete cache that does not match the run (teacher
fingerprint, training data, seq_len, top_k, value kind, dtypes) is refused naming the field; a directory we began
but did not finish (building.json, no meta.json) is rebuilt from scratch; any other non-empty directory is never
written into.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor

from lightning_slimmoe.storage import save_safetensors_atomic, write_json_atomic
from lightning_slimmoe.distill import KDConfig

FORMAT = "lightning_slimmoe.teacher_cache/1"
META, BUILDING, BLOCKS = "meta.json", "building.json", "blocks.safetensors"
# Target size of one part file: bounds the host memory a rank holds while building (the environment variable is
# for tests that want many small parts).
PART_BYTES = int(os.environ.get("SLIMMOE_CACHE_PART_BYTES", 256 * 2**20))
VALUE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
ID_DTYPES = {"uint16": torch.uint16, "int32": torch.int32}
_HASH_BLOCKS = 65536  # blocks hashed at a time (bounded memory on large corpora)


class TeacherCacheError(ValueError):
    """A teacher cache this run must not use or write; raised before any compute."""


def part_name(index: int) -> str:
    return f"part-{index:06d}.safetensors"


def id_dtype_for(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 2**16 else "int32"


def data_digest(blocks: Tensor, indices: Tensor) -> str:
    """sha256 of the block indices and those blocks' tokens: a cache is valid for data whose training blocks at
    these indices hold these tokens (what the corpus, tokenizer, seq_len and data seed decide)."""
    h = hashlib.sha256(indices.to(torch.int64).contiguous().numpy().tobytes())
    for start in range(0, len(indices), _HASH_BLOCKS):
        h.update(blocks[indices[start:start + _HASH_BLOCKS]].to(torch.int64).contiguous().numpy().tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class CacheKey:
    """What the cached numbers are. Every field is compared with a complete cache's meta.json (``top_k``: the
    cache may hold more ids than a stage uses)."""

    seq_len: int
    top_k: int
    values: str  # "logits" (raw teacher logits) | "log_probs" (full-softmax log-probs at `temperature`: tail_bucket)
    temperature: float | None  # only for "log_probs"; raw logits are tempered at loss time, by each stage
    value_dtype: str  # float32 | bfloat16
    id_dtype: str  # uint16 | int32
    vocab_size: int
    teacher_dtype: str  # the frozen teacher's weights
    precision: str  # Lightning precision of the teacher forward (autocast changes the numbers)

    @property
    def bytes_per_token(self) -> int:
        return self.top_k * (VALUE_DTYPES[self.value_dtype].itemsize + ID_DTYPES[self.id_dtype].itemsize)


RULES = {
    "format": "written by another version of lightning_slimmoe",
    "vocab_size": "the teacher's vocabulary differs",
    "seq_len": "data.seq_len differs, so the blocks hold other tokens",
    "top_k": "the cache holds fewer teacher ids per token than a stage's kd.top_k needs",
    "values": "one cache holds either raw logits (kd.tail_bucket: false) or full-softmax log-probs (true)",
    "temperature": "tail_bucket log-probs are taken at one kd.temperature",
    "value_dtype": "teacher_cache_dtype differs",
    "id_dtype": "the teacher's vocabulary size differs",
    "teacher_dtype": "the teacher is loaded in another dtype (trainer.precision / parallel.param_dtype)",
    "precision": "the teacher forward ran under another trainer.precision",
    "teacher_fingerprint": "it was computed by a different teacher",
    "data_sha256": "the training blocks hold other tokens (data files, tokenizer, max_chars, val_fraction or "
                   "data seed changed since it was built)",
    "blocks": "this run's KD stages read training blocks the cache lacks (more max_tokens, another data seed or "
              "batch geometry than it was built for)",
}


def cache_key(stages: Iterable[tuple[str, KDConfig]], *, seq_len: int, vocab_size: int, value_dtype: str,
              teacher_dtype: str, precision: str) -> CacheKey:
    """The key of a cache that serves every KD stage: the largest ``top_k`` of them, and one value kind."""
    stages = list(stages)
    if not stages:
        raise TeacherCacheError("teacher_cache: no stage distils from a teacher, so there is nothing to cache; "
                                "remove teacher_cache")
    if value_dtype not in VALUE_DTYPES:
        raise TeacherCacheError(f"teacher_cache_dtype={value_dtype!r}: must be one of {sorted(VALUE_DTYPES)}")
    kinds = {(kd.tail_bucket, kd.temperature if kd.tail_bucket else None) for _, kd in stages}
    if len(kinds) > 1:
        detail = ", ".join(f"{name}: tail_bucket={kd.tail_bucket}, temperature={kd.temperature}" for name, kd in stages)
        raise TeacherCacheError(
            f"teacher_cache: the KD stages disagree on what the teacher's values are ({detail}); one cache holds "
            "raw logits (every stage kd.tail_bucket: false, any temperature) or log-probs at one temperature "
            "(every stage tail_bucket: true with the same temperature). Align the stages or drop teacher_cache")
    (tail_bucket, temperature), = kinds
    return CacheKey(seq_len=seq_len, top_k=max(kd.top_k for _, kd in stages),
                    values="log_probs" if tail_bucket else "logits", temperature=temperature,
                    value_dtype=value_dtype, id_dtype=id_dtype_for(vocab_size), vocab_size=vocab_size,
                    teacher_dtype=teacher_dtype, precision=precision)


class TeacherCache:
    """One cache directory for one run: checked before any weight loads, built once under the first KD stage's
    fit (every rank computing its share of the parts), then read by every KD stage.

    Args:
        directory: ``teacher_cache:``.
        key: what the cached numbers must be (:func:`cache_key`).
        train_blocks: the run's packed training blocks ``(N, seq_len + 1)``.
        needed: indices of the training blocks the run's KD stages read.
    """

    def __init__(self, directory: str | os.PathLike, key: CacheKey, train_blocks: Tensor, needed: Tensor) -> None:
        self.dir = Path(directory)
        self.key = key
        self.train_blocks = train_blocks  # (N, T + 1)
        self.needed = torch.as_tensor(needed, dtype=torch.int64).unique()  # (M,) sorted
        self.teacher_fingerprint: str | None = None  # known once the teacher is loaded
        self._verified: dict | None = None  # a meta.json that passed every check but the fingerprint

    # ---- checks ------------------------------------------------------------------------------------
    @property
    def complete(self) -> bool:
        return (self.dir / META).is_file()

    def _mismatch(self, field: str, cached, current) -> TeacherCacheError:
        return TeacherCacheError(
            f"teacher_cache={str(self.dir)!r}: {field} of the cache is {cached!r} but this run's is {current!r} "
            f"({RULES[field]}); refusing to use it. Point teacher_cache at another directory, or delete this "
            "one to rebuild it")

    def _read_meta(self) -> dict:
        try:
            return json.loads((self.dir / META).read_text())
        except (OSError, ValueError) as err:
            raise TeacherCacheError(f"teacher_cache={str(self.dir)!r}: unreadable {META}: {err}") from err

    def check(self) -> str:
        """Everything that needs no weights. Returns 'complete' (meta.json matches, every needed block is
        cached), 'partial' (begun by us, will be rebuilt) or 'new'; raises TeacherCacheError otherwise."""
        if self.dir.exists() and not self.dir.is_dir():
            raise TeacherCacheError(f"teacher_cache={str(self.dir)!r}: is a file; it must be a directory")
        if self.complete:
            self._check_meta(self._read_meta())
            return "complete"
        entries = sorted(p.name for p in self.dir.iterdir()) if self.dir.is_dir() else []
        if entries and BUILDING not in entries:
            raise TeacherCacheError(
                f"teacher_cache={str(self.dir)!r}: the directory is not empty and is no teacher cache (no {META} "
                f"or {BUILDING}; it holds {entries[:5]}); refusing to write into it. Give a new or empty directory")
        existing = self.dir
        while not existing.exists():
            existing = existing.parent
        if not os.access(existing, os.W_OK | os.X_OK):
            raise TeacherCacheError(f"teacher_cache={str(self.dir)!r}: {str(existing)!r} is not writable; the cache "
                                    "is written there before the first KD stage")
        return "partial" if entries else "new"

    def _check_meta(self, meta: dict) -> None:
        if meta == self._verified:
            self._check_fingerprint(meta)
            return
        if meta.get("format") != FORMAT:
            raise self._mismatch("format", meta.get("format"), FORMAT)
        for field, current in asdict(self.key).items():
            cached = meta.get(field)
            if field == "top_k" and isinstance(cached, int) and cached >= current:
                continue  # a stage may use fewer of the cached ids
            if cached != current:
                raise self._mismatch(field, cached, current)
        cached_blocks = self._cached_blocks()  # (M,)
        if len(cached_blocks) and int(cached_blocks[-1]) >= len(self.train_blocks):
            raise self._mismatch("data_sha256", f"{meta.get('data_sha256', '')[:12]}… (block {int(cached_blocks[-1])})",
                                 f"{len(self.train_blocks)} training blocks")
        digest = data_digest(self.train_blocks, cached_blocks)
        if digest != meta.get("data_sha256"):
            raise self._mismatch("data_sha256", str(meta.get("data_sha256"))[:12] + "…", digest[:12] + "…")
        missing = self.needed[~torch.isin(self.needed, cached_blocks)]
        if len(missing):
            raise self._mismatch("blocks", f"{len(cached_blocks)} blocks",
                                 f"{len(self.needed)} blocks, {len(missing)} of them not cached "
                                 f"(e.g. {missing[:3].tolist()})")
        self._check_fingerprint(meta)
        self._verified = meta

    def _check_fingerprint(self, meta: dict) -> None:
        if self.teacher_fingerprint is not None and meta.get("teacher_fingerprint") != self.teacher_fingerprint:
            raise self._mismatch("teacher_fingerprint", str(meta.get("teacher_fingerprint"))[:12] + "…",
                                 self.teacher_fingerprint[:12] + "…")

    def check_teacher(self, fingerprint: str) -> None:
        """Once the teacher is loaded (before it computes anything): a complete cache must be its own."""
        self.teacher_fingerprint = fingerprint
        if self.complete:
            self._check_meta(self._read_meta())

    def _cached_blocks(self) -> Tensor:
        try:
            return load_file(str(self.dir / BLOCKS))["block_index"]  # (M,) int64, sorted
        except (OSError, KeyError, RuntimeError) as err:  # a truncated/garbled file is a SafetensorError (RuntimeError)
            raise TeacherCacheError(f"teacher_cache={str(self.dir)!r}: unreadable {BLOCKS}: {err}") from err

    # ---- build -------------------------------------------------------------------------------------
    @property
    def blocks_per_file(self) -> int:
        return max(1, PART_BYTES // (self.key.seq_len * self.key.bytes_per_token))

    def _meta(self) -> dict:
        num_files = math.ceil(len(self.needed) / self.blocks_per_file)
        return {"format": FORMAT, **asdict(self.key), "teacher_fingerprint": self.teacher_fingerprint,
                "num_train_blocks": len(self.train_blocks), "data_sha256": data_digest(self.train_blocks, self.needed),
                "num_blocks": len(self.needed), "blocks_per_file": self.blocks_per_file, "num_files": num_files,
                "tokens": len(self.needed) * self.key.seq_len, "bytes_per_token": self.key.bytes_per_token}

    def _remove_partial(self) -> None:
        """Delete what an unfinished build of ours left (only our own file names; anything else stays)."""
        for path in self.dir.iterdir():
            if path.name in (BUILDING, BLOCKS) or (path.name.startswith("part-") and ".safetensors" in path.name) \
                    or path.name.endswith(".tmp"):
                path.unlink()

    def build(self, targets: Callable[[Tensor], tuple[Tensor, Tensor]], batch_size: int, *, rank: int = 0,
              world_size: int = 1, barrier: Callable[[], None] = lambda: None, broadcast: Callable = lambda x: x,
              progress: Callable[[Iterable], Iterable] = lambda it: it) -> bool:
        """Compute and write the cache unless it is complete (then only check it). Collective: every rank calls
        it. ``targets(input_ids (B, T)) -> (values (B*T, k), ids (B*T, k))`` is the teacher's top-k at
        ``key.top_k``. Returns whether it was built now."""
        if broadcast(self.complete):  # one decision for every rank
            self._check_meta(self._read_meta())
            return False
        if self.teacher_fingerprint is None:
            raise RuntimeError("TeacherCache.check_teacher() must run before build()")
        meta = self._meta()
        if rank == 0:
            if self.dir.is_dir():
                self._remove_partial()
            self.dir.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.dir / BUILDING, meta)
            save_safetensors_atomic({"block_index": self.needed}, self.dir / BLOCKS, what="teacher cache")
        barrier()

        per_file, num_blocks, k, seq_len = self.blocks_per_file, len(self.needed), self.key.top_k, self.key.seq_len
        value_dtype, id_dtype = VALUE_DTYPES[self.key.value_dtype], ID_DTYPES[self.key.id_dtype]

        def batches_of(r: int) -> list[tuple[int, int, int]]:  # (part, first position, end position)
            return [(part, start, min(start + batch_size, (part + 1) * per_file, num_blocks))
                    for part in range(r, meta["num_files"], world_size)
                    for start in range(part * per_file, min((part + 1) * per_file, num_blocks), batch_size)]

        mine = batches_of(rank)
        # A sharded teacher all-gathers every layer in every forward: every rank runs as many (the extra ones
        # recompute a block whose result is dropped), as callbacks/expert_slimming.py pads scoring batches.
        forwards = max(len(batches_of(r)) for r in range(world_size))
        values, ids = [], []
        for i in progress(range(forwards)):
            if i >= len(mine):
                targets(self.train_blocks[self.needed[:1], :-1])
                continue
            part, start, end = mine[i]
            values_NK, ids_NK = targets(self.train_blocks[self.needed[start:end], :-1])  # N = (end - start) * T
            values.append(values_NK.reshape(end - start, seq_len, k).to("cpu", value_dtype))  # (b, T, k)
            ids.append(ids_NK.reshape(end - start, seq_len, k).to("cpu").to(id_dtype))  # (b, T, k)
            if end == min((part + 1) * per_file, num_blocks):  # the part is full: to disk, free the memory
                save_safetensors_atomic({"block_index": self.needed[part * per_file:end], "values": torch.cat(values),
                                         "ids": torch.cat(ids)}, self.dir / part_name(part), what="teacher cache")
                values, ids = [], []
        barrier()
        if rank == 0:
            absent = [part_name(p) for p in range(meta["num_files"]) if not (self.dir / part_name(p)).is_file()]
            if absent:
                raise RuntimeError(f"teacher_cache={str(self.dir)!r}: parts {absent[:3]} written by other ranks are "
                                   "not visible on rank 0; the cache must be on a filesystem every rank shares")
            meta["bytes"] = sum((self.dir / part_name(p)).stat().st_size for p in range(meta["num_files"]))
            write_json_atomic(self.dir / META, meta)  # last: from now on the cache is complete
            (self.dir / BUILDING).unlink()
        barrier()
        self._verified = self._read_meta()
        return True

    # ---- read --------------------------------------------------------------------------------------
    def open(self) -> TeacherCacheReader:
        self._check_meta(self._read_meta())
        return TeacherCacheReader(self.dir, self._verified)

    def info(self) -> dict:
        meta = self._read_meta() if self.complete else {}
        return {"dir": str(self.dir), "blocks": meta.get("num_blocks"), "tokens": meta.get("tokens"),
                "bytes": meta.get("bytes"), "bytes_per_token": meta.get("bytes_per_token"),
                "top_k": meta.get("top_k"), "values": meta.get("values"), "value_dtype": meta.get("value_dtype")}


class TeacherCacheReader:
    """The teacher's top-k of training blocks, read from a complete cache's memory-mapped safetensors parts."""

    def __init__(self, directory: Path, meta: dict) -> None:
        self.dir = Path(directory)
        self.meta = meta
        self.blocks = load_file(str(self.dir / BLOCKS))["block_index"]  # (M,) sorted
        self.per_file = int(meta["blocks_per_file"])
        # Parts are opened on first use and kept open (a safe_open maps the file; reads copy one row).
        self._part = functools.lru_cache(maxsize=64)(self._open_part)

    def _open_part(self, index: int):
        return safe_open(str(self.dir / part_name(index)), framework="pt")

    def lookup(self, block_index: Tensor, top_k: int | None = None) -> tuple[Tensor, Tensor]:
        """``block_index`` (B,) -> values (B, T, k) float32, ids (B, T, k) int64, for the first ``top_k``
        (default: all cached) of the teacher's ids by value."""
        wanted = block_index.to("cpu", torch.int64).reshape(-1)  # (B,)
        pos = torch.searchsorted(self.blocks, wanted)  # (B,)
        found = (pos < len(self.blocks)) & (self.blocks[pos.clamp(max=len(self.blocks) - 1)] == wanted)
        if not bool(found.all()):
            raise KeyError(f"training blocks {wanted[~found][:5].tolist()} are not in the teacher cache {self.dir}")
        values, ids = [], []
        for p in pos.tolist():
            part, row = self._part(p // self.per_file), p % self.per_file
            if int(part.get_slice("block_index")[row:row + 1]) != int(self.blocks[p]):
                raise RuntimeError(f"teacher cache {self.dir}: {part_name(p // self.per_file)} row {row} does not hold "
                                   f"block {int(self.blocks[p])}; the cache is corrupt, delete it to rebuild")
            values.append(part.get_slice("values")[row:row + 1])  # (1, T, K)
            ids.append(part.get_slice("ids")[row:row + 1])  # (1, T, K)
        values_BTK, ids_BTK = torch.cat(values).float(), torch.cat(ids).long()
        if top_k is not None and top_k < values_BTK.shape[-1]:
            # The largest top_k of the cached values (teacher_topk sorts, except at top_k == V: take them anyway).
            values_BTK, order = values_BTK.topk(top_k, dim=-1)  # (B, T, k)
            ids_BTK = ids_BTK.gather(-1, order)  # (B, T, k)
        return values_BTK, ids_BTK
