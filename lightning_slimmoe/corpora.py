"""Corpus readers: the documents of a text corpus, from local files, a hub dataset, or the Python standard library.

This module owns where documents come from and in which order: ``.txt`` / ``.json`` / ``.jsonl`` / ``.parquet``
files (directories expanded recursively, sorted), a ``datasets.load_dataset`` dataset, or — when neither is
configured — the standard library's own ``.py`` sources, which are always on disk and so let the demo run with no
network and no downloads. :func:`load_documents` applies the ``max_chars`` cap. Everything here is a plain function of
its arguments; tokenizing and packing the documents is :mod:`lightning_slimmoe.data`'s job.

User files are read under a :class:`ReadPolicy`: ``.txt`` / ``.json`` / ``.jsonl`` bytes are decoded in its
``encoding`` (a UTF-8 BOM is dropped), undecodable bytes are replaced (one warning per file), dropped or an error, and a
file that is not text at all (more than :data:`MAX_UNDECODABLE_FRACTION` undecodable bytes, or any NUL) is refused.
Every problem in a file's data is a :class:`CorpusError` naming the file and the line, record, row or byte; with
``skip_bad_records`` bad records are skipped instead and reported in one warning per file.
"""

from __future__ import annotations

import codecs
import contextlib
import io
import json
import random
import sysconfig
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from lightning.pytorch.utilities import rank_zero_warn

from lightning_slimmoe.errors import ConfigError, InputNotFoundError, UserError

SUPPORTED_EXTENSIONS = (".txt", ".json", ".jsonl", ".parquet")
ENCODING_ERRORS = ("replace", "strict", "ignore")

# More than 1% undecodable bytes means the file is not text in the configured encoding: binary data (an archive, a
# tokenized .bin renamed .txt) or the wrong encoding (a Latin-1 or UTF-16 file read as UTF-8 fails on every accented
# letter or every other byte). Real text with a few stray bytes (a pasted cp1252 quote, a cut multi-byte character)
# stays far below it, while replacing more would quietly train on U+FFFD soup.
MAX_UNDECODABLE_FRACTION = 0.01

# What to change when the records hold their text under another key (the recipe's key, as a user writes it).
TEXT_FIELD_HINT = "set data.init_args.text_field to the key that holds the text"


class CorpusError(UserError, ValueError):
    """A corpus file (or hub dataset) whose data cannot be used; the message is ``"<file>: <where>: <problem>"``."""

    def __init__(self, source: str | Path, where: str, problem: str) -> None:
        super().__init__(f"{source}: {where}: {problem}")
        self.source, self.where, self.problem = str(source), where, problem

    def __reduce__(self):
        return type(self), (self.source, self.where, self.problem)


class CorpusWarning(UserWarning):
    """Bytes of a corpus file were replaced, or bad records skipped."""


@dataclass(frozen=True)
class ReadPolicy:
    """How user files are read: the ``encoding`` of ``.txt`` / ``.json`` / ``.jsonl`` files, what an undecodable
    byte does (``encoding_errors``), and whether bad records are skipped (``skip_bad_records``) or an error."""

    encoding: str = "utf-8"
    encoding_errors: Literal["replace", "strict", "ignore"] = "replace"
    skip_bad_records: bool = False


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
    encoding: str = "utf-8",
    encoding_errors: Literal["replace", "strict", "ignore"] = "replace",
    skip_bad_records: bool = False,
) -> list[str]:
    """All non-empty documents of the corpus, in a deterministic order, capped at ``max_chars`` characters in total.

    The source is ``files`` if given, else ``hub_dataset`` if given, else the standard library sources shuffled by
    ``seed``. Reading stops at the document that reaches the cap, which is truncated to fit it exactly. ``encoding``,
    ``encoding_errors`` and ``skip_bad_records`` are the :class:`ReadPolicy` of user files.
    """
    policy = ReadPolicy(encoding, encoding_errors, skip_bad_records)
    documents: list[str] = []
    total_chars = 0
    # closing(): a reader stopped by the cap still checks and reports the part it read, here and not at garbage
    # collection, where its errors would be lost.
    with contextlib.closing(
        iter_source_documents(files, hub_dataset, hub_config, hub_split, text_field, seed, policy)
    ) as source_documents:
        for document in source_documents:
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
    policy: ReadPolicy = ReadPolicy(),
) -> Iterator[str]:
    """Every document of the configured source, in order, empty ones included."""
    if files is not None:
        for path in expand_files(files):
            yield from read_file_documents(path, text_field, policy)
    elif hub_dataset is not None:
        yield from iter_hub_documents(hub_dataset, hub_config, hub_split, text_field, policy)
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
            raise InputNotFoundError(f"data.init_args.files: {entry!r}: no such file or directory")
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUPPORTED_EXTENSIONS)
            if not found:
                raise ConfigError(
                    f"data.init_args.files: directory {entry!r} contains no files with a supported extension "
                    f"{', '.join(SUPPORTED_EXTENSIONS)}"
                )
            paths.extend(found)
        else:
            paths.append(path)
    return paths


def read_file_documents(path: Path, text_field: str = "text", policy: ReadPolicy = ReadPolicy()) -> Iterator[str]:
    """The documents of one data file, read by its extension."""
    extension = path.suffix.lower()
    if extension == ".txt":
        yield from read_txt(path, policy)
    elif extension == ".json":
        yield from read_json(path, text_field, policy)
    elif extension == ".jsonl":
        yield from read_jsonl(path, text_field, policy)
    elif extension == ".parquet":
        yield from read_parquet(path, text_field, policy)
    else:
        raise ConfigError(
            f"data.init_args.files: unsupported file extension {path.suffix!r} for data file {str(path)!r}; "
            f"supported extensions: {', '.join(SUPPORTED_EXTENSIONS)}"
        )


def read_txt(path: Path, policy: ReadPolicy = ReadPolicy()) -> Iterator[str]:
    """A ``.txt`` file is one document."""
    yield decode_file(path, policy)


def read_json(path: Path, text_field: str = "text", policy: ReadPolicy = ReadPolicy()) -> Iterator[str]:
    """Each record of a ``.json`` list (or of the one list in a ``{"data": [...]}``-style dict) is one document."""
    try:
        content = json.loads(decode_file(path, policy))
    except json.JSONDecodeError as error:
        # A whole-file document cannot be skipped around: malformed JSON is an error even with skip_bad_records.
        raise CorpusError(path, f"line {error.lineno} column {error.colno}", f"malformed JSON: {error.msg}") from None
    records = enumerate(_json_records(content, path))
    yield from _good_documents(
        path, ((f"record {index}", _record_text(record, text_field)) for index, record in records), policy
    )


def read_jsonl(path: Path, text_field: str = "text", policy: ReadPolicy = ReadPolicy()) -> Iterator[str]:
    """Each non-blank line of a ``.jsonl`` file is one record, so one document."""
    decoder = _FileDecoder(path, policy)

    def located_texts() -> Iterator[tuple[str, str | _BadRecord]]:
        for line_number, line in decoder.lines():
            if not line.strip():
                continue
            try:
                record = json.loads(line.rstrip("\r\n"))  # without its newline, the error's column is the line's
            except json.JSONDecodeError as error:
                yield f"line {line_number}", _BadRecord(f"malformed JSON at column {error.colno}: {error.msg}")
            else:
                yield f"line {line_number}", _record_text(record, text_field)

    yield from _good_documents(path, located_texts(), policy, decoder)


def read_parquet(path: Path, text_field: str = "text", policy: ReadPolicy = ReadPolicy()) -> Iterator[str]:
    """Each ``text_field`` value of a ``.parquet`` file is one document (a null one is a bad record)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    unreadable = (pa.ArrowException, OSError)
    try:
        parquet_file = pq.ParquetFile(path)
    except unreadable as error:
        reason = f"not a readable parquet file ({type(error).__name__}: {error})"
        raise CorpusError(path, "file metadata", reason) from None
    columns = parquet_file.schema_arrow.names
    if text_field not in columns:
        raise CorpusError(path, "columns", f"no column text_field={text_field!r}; its columns are {columns} ({TEXT_FIELD_HINT})")

    def column_batches() -> Iterator[list[Any]]:
        # Reading batch by batch lets max_chars stop early on large files.
        batches, num_rows = parquet_file.iter_batches(columns=[text_field]), 0
        while True:
            try:
                batch = next(batches, None)
            except unreadable as error:
                raise CorpusError(
                    path, f"row {num_rows} onwards", f"corrupt parquet data ({type(error).__name__}: {error})"
                ) from None
            if batch is None:
                return
            num_rows += batch.num_rows
            yield batch.column(0).to_pylist()

    yield from _good_documents(path, _row_texts(column_batches(), text_field), policy)


def _json_records(content: Any, path: Path) -> list[Any]:
    if isinstance(content, list):
        return content
    if isinstance(content, dict):
        # Accept the common {"data": [...]} wrapper, but only when it is unambiguous which list holds the records.
        lists = [value for value in content.values() if isinstance(value, list)]
        if len(lists) == 1:
            return lists[0]
    raise CorpusError(
        path, "top level",
        "a JSON file must contain a list of records or a dict with exactly one list of records, "
        f"got {type(content).__name__}" + (f" with keys {list(content)}" if isinstance(content, dict) else ""),
    )


@dataclass(frozen=True)
class _BadRecord:
    """A record that yields no document, and why."""

    problem: str


def _record_text(record: Any, text_field: str) -> str | _BadRecord:
    """The ``text_field`` string of one json/jsonl record, or what is wrong with the record."""
    if not isinstance(record, dict):
        return _BadRecord(f"must be an object with a {text_field!r} key, got {type(record).__name__}")
    if text_field not in record:
        return _BadRecord(f"no key text_field={text_field!r}; its keys are {list(record)} ({TEXT_FIELD_HINT})")
    return _checked_text(record[text_field], text_field)


def _checked_text(text: Any, text_field: str) -> str | _BadRecord:
    if text is None:
        return _BadRecord(f"{text_field!r} is null")
    if not isinstance(text, str):
        return _BadRecord(f"{text_field!r} must be a string, got {type(text).__name__}")
    return text


def _row_texts(columns: Iterable[list[Any]], text_field: str) -> Iterator[tuple[str, str | _BadRecord]]:
    """``("row <i>", text)`` for every value of a column read in batches (parquet, hub datasets)."""
    row = 0
    for values in columns:
        for value in values:
            yield f"row {row}", _checked_text(value, text_field)
            row += 1


def _good_documents(
    source: str | Path, located_texts: Iterable[tuple[str, str | _BadRecord]], policy: ReadPolicy,
    decoder: _FileDecoder | None = None,
) -> Iterator[str]:
    """The texts of ``located_texts`` (``(where, text)`` pairs); a bad record is a :class:`CorpusError`, or with
    ``skip_bad_records`` skipped, counted and reported in one warning. ``decoder`` (a file decoded while it is
    read) is checked at the end, and before a bad record is raised: binary data is refused as such, not as its
    first bad record. The end is also reached when the reader is closed early (max_chars)."""
    skipped, first_skipped = 0, None
    try:
        for where, text in located_texts:
            if isinstance(text, str):
                yield text
            elif not policy.skip_bad_records:
                if decoder is not None:
                    decoder.refuse_non_text()
                raise CorpusError(source, where, text.problem)
            else:
                skipped += 1
                first_skipped = first_skipped or f"{where}: {text.problem}"
    except GeneratorExit:
        pass  # closed early: report what was read, below
    if decoder is not None:
        decoder.check()
    if skipped:
        rank_zero_warn(f"skipped {skipped} bad records in {source}: first at {first_skipped}", category=CorpusWarning)


# ---------------------------------------------------------------------------------------------------
# Decoding user text files
# ---------------------------------------------------------------------------------------------------
_COUNTING_ERRORS = "lightning_slimmoe.corpora.counting"
_decoding = threading.local()  # .decoder: the _FileDecoder decoding on this thread, for the error handler


def _count_undecodable(error: UnicodeError) -> tuple[str, int]:
    if not isinstance(error, UnicodeDecodeError):
        raise error
    return _decoding.decoder.undecodable(error)


codecs.register_error(_COUNTING_ERRORS, _count_undecodable)


def decode_file(path: Path, policy: ReadPolicy = ReadPolicy()) -> str:
    """The text of a whole ``.txt`` / ``.json`` file under ``policy``, checked to be text (see :class:`ReadPolicy`)."""
    decoder = _FileDecoder(path, policy)
    text = decoder.decode(path.read_bytes())
    decoder.check()
    return text


class _FileDecoder:
    """Decodes one user file's bytes, whole or chunk by chunk, counting what does not decode (exactly, in bytes:
    the file may hold real U+FFFD characters), and checks at the end that the file is text."""

    def __init__(self, path: Path, policy: ReadPolicy) -> None:
        self.path, self.policy = path, policy
        self.codec = codecs.lookup(policy.encoding).name
        self.num_bytes = self.num_chars = 0
        self.undecodable_bytes, self.first_undecodable = 0, 0
        self.nul_chars, self.first_nul = 0, 0
        self._chunk_offset = 0

    def lines(self) -> Iterator[tuple[int, str]]:
        """``(line number, text)`` of every line. Where a newline is the one byte 0x0a in the encoding (UTF-8,
        Latin-1, ...) the file is read line by line, so that max_chars can stop early; otherwise (UTF-16, ...) whole."""
        if "\n".encode(self.codec) != b"\n":
            yield from enumerate(io.StringIO(self.decode(self.path.read_bytes()), newline=None), start=1)
            return
        with self.path.open("rb") as handle:
            for line_number, raw in enumerate(handle, start=1):
                yield line_number, self.decode(raw)

    def decode(self, raw: bytes) -> str:
        """The next chunk of the file (chunks must split it between characters)."""
        offset = self.num_bytes
        self.num_bytes += len(raw)
        if offset == 0 and self.codec == "utf-8" and raw.startswith(codecs.BOM_UTF8):
            raw, offset = raw[len(codecs.BOM_UTF8):], len(codecs.BOM_UTF8)  # utf-8-sig: the BOM is not text
        self._chunk_offset = offset
        if self.policy.encoding_errors == "strict":
            try:
                text = raw.decode(self.codec)
            except UnicodeDecodeError as error:
                raise CorpusError(
                    self.path, f"byte {offset + error.start}",
                    f"cannot decode as {self.policy.encoding} ({error.reason}) and data.encoding_errors is 'strict'; "
                    "set data.encoding to the file's encoding, or encoding_errors to 'replace'",
                ) from None
        else:
            _decoding.decoder = self
            try:
                text = raw.decode(self.codec, _COUNTING_ERRORS)
            finally:
                _decoding.decoder = None
        nul = text.find("\x00")
        if nul >= 0 and not self.nul_chars:
            self.first_nul = self.num_chars + nul
        self.nul_chars += text.count("\x00")
        self.num_chars += len(text)
        return text

    def undecodable(self, error: UnicodeDecodeError) -> tuple[str, int]:
        """The error handler's work: count ``error``'s bytes, replace them with U+FFFD (or nothing: 'ignore')."""
        if not self.undecodable_bytes:
            self.first_undecodable = self._chunk_offset + error.start
        self.undecodable_bytes += error.end - error.start
        return ("" if self.policy.encoding_errors == "ignore" else "\ufffd"), error.end

    def refuse_non_text(self) -> None:
        """Raise :class:`CorpusError` if what was read so far is not text, whatever ``encoding_errors`` says."""
        fraction = self.undecodable_bytes / max(1, self.num_bytes)
        if fraction > MAX_UNDECODABLE_FRACTION:
            raise CorpusError(
                self.path, f"first at byte {self.first_undecodable}",
                f"{self.undecodable_bytes} of {self.num_bytes} bytes ({fraction:.2%}) do not decode as "
                f"{self.policy.encoding}, more than the {MAX_UNDECODABLE_FRACTION:.0%} a text file may have: this is "
                "binary data, or text in another encoding (set data.encoding)",
            )
        if self.nul_chars:
            raise CorpusError(
                self.path, f"first at character {self.first_nul}",
                f"{self.nul_chars} NUL characters ({self.nul_chars / self.num_chars:.2%} of {self.num_chars}); text "
                f"has none: this is binary data, or text in another encoding (UTF-16 read as {self.policy.encoding}?)",
            )

    def check(self) -> None:
        """At the end of the file (or of the part read): refuse non-text, then warn once about replaced bytes."""
        self.refuse_non_text()
        if self.undecodable_bytes and self.policy.encoding_errors == "replace":
            rank_zero_warn(
                f"{self.path}: replaced {self.undecodable_bytes} undecodable byte(s) of {self.num_bytes} with U+FFFD "
                f"(first at byte {self.first_undecodable}) while decoding as {self.policy.encoding}; set "
                "data.encoding to the file's encoding, or data.encoding_errors to 'strict' to refuse such files",
                category=CorpusWarning,
            )


def iter_hub_documents(
    name: str, config: str | None, split: str, text_field: str = "text", policy: ReadPolicy = ReadPolicy()
) -> Iterator[str]:
    """Each ``text_field`` value of ``datasets.load_dataset(name, config, split=split)``; a null is a bad record.

    The rows are already text, so of ``policy`` only ``skip_bad_records`` applies."""
    import datasets

    source = describe_source(hub_dataset=name, hub_config=config, hub_split=split)
    dataset = datasets.load_dataset(name, config, split=split)
    if text_field not in dataset.column_names:
        raise CorpusError(
            source, "columns",
            f"no column text_field={text_field!r}; its columns are {dataset.column_names} ({TEXT_FIELD_HINT})")
    batches = (batch[text_field] for batch in dataset.select_columns([text_field]).iter(batch_size=1000))
    yield from _good_documents(source, _row_texts(batches, text_field), policy)


def iter_stdlib_documents(seed: int = 0) -> Iterator[str]:
    """The standard library's ``.py`` sources (site-packages excluded), one document each, shuffled by ``seed``."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    sources = sorted(p for p in stdlib.rglob("*.py") if "site-packages" not in p.relative_to(stdlib).parts)
    # Sorting first makes the shuffle independent of filesystem order; shuffling mixes packages so that a
    # max_chars prefix is not, say, only asyncio.
    random.Random(seed).shuffle(sources)
    for source in sources:
        # A few stdlib test fixtures are deliberately not UTF-8; replacement characters are harmless here. This
        # reader deliberately bypasses ReadPolicy (no warning, no refusal, no BOM stripping): the policy is for user
        # files, and the demo corpus must stay byte-for-byte what it always was.
        yield source.read_text(encoding="utf-8", errors="replace")
