"""Corpus readers: the documents of a text corpus, from local files, a hub dataset, or the Python standard library.

This module owns where documents come from and in which order: ``.txt`` / ``.json`` / ``.jsonl`` / ``.parquet``
files (directories expanded recursively, sorted), a ``datasets.load_dataset`` dataset, or — when neither is
configured — the standard library's own ``.py`` sources, which are always on disk and so let the demo run with no
network and no downloads. :func:`load_documents` applies the ``max_chars`` cap. Everything here is a plain function of
its arguments; tokenizing and packing the documents is :mod:`lightning_slimmoe.data`'s job.
"""

from __future__ import annotations

import json
import random
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import Any

SUPPORTED_EXTENSIONS = (".txt", ".json", ".jsonl", ".parquet")


def describe_source(
    files: list[str] | None = None,
    hub_dataset: str | None = None, hub_config: str | None = None, hub_split: str = "train",
) -> str:
    """Human-readable name of the corpus source, for logs and error messages."""
    if files is not None:
        return f"files {files}"
    if hub_dataset is not None:
        return f"hub dataset {hub_dataset!r} (config={hub_config!r}, split={hub_split!r})"
    return f"the Python standard library sources in {sysconfig.get_paths()['stdlib']}"


def load_documents(
    files: list[str] | None = None,
    hub_dataset: str | None = None, hub_config: str | None = None, hub_split: str = "train",
    text_field: str = "text",
    max_chars: int | None = None,
    seed: int = 0,
) -> list[str]:
    """All non-empty documents of the corpus, in a deterministic order, capped at ``max_chars`` characters in total.

    The source is ``files`` if given, else ``hub_dataset`` if given, else the standard library sources shuffled by
    ``seed``. Reading stops at the document that reaches the cap, which is truncated to fit it exactly.
    """
    documents: list[str] = []
    total_chars = 0
    for document in iter_source_documents(files, hub_dataset, hub_config, hub_split, text_field, seed):
        if not document:
            continue
        if max_chars is not None and total_chars + len(document) >= max_chars:
            documents.append(document[: max_chars - total_chars])
            break
        documents.append(document)
        total_chars += len(document)
    return documents


def iter_source_documents(
    files: list[str] | None,
    hub_dataset: str | None, hub_config: str | None, hub_split: str,
    text_field: str,
    seed: int,
) -> Iterator[str]:
    """Every document of the configured source, in order, empty ones included."""
    if files is not None:
        for path in expand_files(files):
            yield from read_file_documents(path, text_field)
    elif hub_dataset is not None:
        yield from iter_hub_documents(hub_dataset, hub_config, hub_split, text_field)
    else:
        yield from iter_stdlib_documents(seed)


def expand_files(files: list[str]) -> list[Path]:
    """The data files named by ``files``, a directory standing for every supported file inside it, sorted.

    Every entry is checked before any file is read, so a missing path fails fast.
    """
    paths: list[Path] = []
    for entry in files:
        path = Path(entry).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"data file or directory not found: {entry!r}")
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUPPORTED_EXTENSIONS)
            if not found:
                raise ValueError(
                    f"directory {entry!r} in files contains no files with a supported extension "
                    f"{', '.join(SUPPORTED_EXTENSIONS)}"
                )
            paths.extend(found)
        else:
            paths.append(path)
    return paths


def read_file_documents(path: Path, text_field: str = "text") -> Iterator[str]:
    """The documents of one data file, read by its extension."""
    extension = path.suffix.lower()
    if extension == ".txt":
        yield from read_txt(path)
    elif extension == ".json":
        yield from read_json(path, text_field)
    elif extension == ".jsonl":
        yield from read_jsonl(path, text_field)
    elif extension == ".parquet":
        yield from read_parquet(path, text_field)
    else:
        raise ValueError(
            f"unsupported file extension {path.suffix!r} for data file {str(path)!r}; "
            f"supported extensions: {', '.join(SUPPORTED_EXTENSIONS)}"
        )


def read_txt(path: Path) -> Iterator[str]:
    """A ``.txt`` file is one document."""
    yield path.read_text(encoding="utf-8")


def read_json(path: Path, text_field: str = "text") -> Iterator[str]:
    """Each record of a ``.json`` list (or of the one list in a ``{"data": [...]}``-style dict) is one document."""
    with path.open(encoding="utf-8") as handle:
        content = json.load(handle)
    for index, record in enumerate(_json_records(content, path)):
        yield record_text(record, path, f"record {index}", text_field)


def read_jsonl(path: Path, text_field: str = "text") -> Iterator[str]:
    """Each non-blank line of a ``.jsonl`` file is one record, so one document."""
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if line.strip():
                yield record_text(json.loads(line), path, f"line {line_number}", text_field)


def read_parquet(path: Path, text_field: str = "text") -> Iterator[str]:
    """Each non-null ``text_field`` value of a ``.parquet`` file is one document."""
    import pyarrow.parquet as pq

    parquet_file = pq.ParquetFile(path)
    columns = parquet_file.schema_arrow.names
    if text_field not in columns:
        raise ValueError(
            f"parquet file {str(path)!r} has no column text_field={text_field!r}; its columns are {columns}"
        )
    # Reading batch by batch lets max_chars stop early on large files.
    for batch in parquet_file.iter_batches(columns=[text_field]):
        for text in batch.column(0).to_pylist():
            if text is not None:
                yield text


def _json_records(content: Any, path: Path) -> list[Any]:
    if isinstance(content, list):
        return content
    if isinstance(content, dict):
        # Accept the common {"data": [...]} wrapper, but only when it is unambiguous which list holds the records.
        lists = [value for value in content.values() if isinstance(value, list)]
        if len(lists) == 1:
            return lists[0]
    raise ValueError(
        f"JSON file {str(path)!r} must contain a list of records or a dict with exactly one list of records, "
        f"got {type(content).__name__}"
        + (f" with keys {list(content)}" if isinstance(content, dict) else "")
    )


def record_text(record: Any, path: Path, where: str, text_field: str) -> str:
    """The ``text_field`` string of one json/jsonl record; ``where`` (e.g. ``"line 3"``) names it in errors."""
    if not isinstance(record, dict):
        raise ValueError(
            f"{where} of data file {str(path)!r} must be an object with a {text_field!r} key, "
            f"got {type(record).__name__}"
        )
    if text_field not in record:
        raise ValueError(
            f"{where} of data file {str(path)!r} has no key text_field={text_field!r}; its keys are {list(record)}"
        )
    text = record[text_field]
    if not isinstance(text, str):
        raise ValueError(
            f"{where} of data file {str(path)!r}: {text_field!r} must be a string, got {type(text).__name__}"
        )
    return text


def iter_hub_documents(name: str, config: str | None, split: str, text_field: str = "text") -> Iterator[str]:
    """Each non-null ``text_field`` value of ``datasets.load_dataset(name, config, split=split)``."""
    import datasets

    dataset = datasets.load_dataset(name, config, split=split)
    if text_field not in dataset.column_names:
        raise ValueError(
            f"{describe_source(hub_dataset=name, hub_config=config, hub_split=split)} has no column "
            f"text_field={text_field!r}; its columns are {dataset.column_names}"
        )
    for batch in dataset.select_columns([text_field]).iter(batch_size=1000):
        for text in batch[text_field]:
            if text is not None:
                yield text


def iter_stdlib_documents(seed: int = 0) -> Iterator[str]:
    """The standard library's ``.py`` sources (site-packages excluded), one document each, shuffled by ``seed``."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    sources = sorted(p for p in stdlib.rglob("*.py") if "site-packages" not in p.relative_to(stdlib).parts)
    # Sorting first makes the shuffle independent of filesystem order; shuffling mixes packages so that a
    # max_chars prefix is not, say, only asyncio.
    random.Random(seed).shuffle(sources)
    for source in sources:
        # A few stdlib test fixtures are deliberately not UTF-8; replacement characters are harmless here.
        yield source.read_text(encoding="utf-8", errors="replace")
