"""Text data for SlimMoE distillation: load a corpus, pack it into fixed-length blocks, stream it resumably.

The corpus comes from local files (``.txt`` / ``.json`` / ``.jsonl`` / ``.parquet``), a hub dataset, or — when
neither is configured — the Python standard library's own ``.py`` sources, which are always on disk and so let the
demo run with no network and no downloads.

Training reads an *infinite*, deterministic stream whose position is derived from ``trainer.global_step``; a resumed
fit therefore continues with the next unseen batch without the datamodule having to checkpoint any state of its own.
"""

from __future__ import annotations

import json
import math
import random
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

SUPPORTED_EXTENSIONS = (".txt", ".json", ".jsonl", ".parquet")
END_OF_TEXT = "<|endoftext|>"
# Documents are handed to the tokenizer in chunks so that peak memory stays bounded on large corpora while the
# fast tokenizer still gets batches big enough to parallelize over.
TOKENIZE_CHUNK_DOCUMENTS = 1024


def _block_to_sample(block: torch.Tensor) -> dict[str, torch.Tensor]:
    # A block holds seq_len + 1 tokens so that every input position has its next token as the target.
    return {"input_ids": block[:-1], "labels": block[1:]}


def _train_sample(blocks: torch.Tensor, index: int) -> dict[str, torch.Tensor | int]:
    # The training block's index travels with the sample: the teacher top-k cache (teacher_cache.py) is keyed
    # by it, since the teacher's targets depend only on the block's tokens.
    return {**_block_to_sample(blocks[index]), "block_index": index}


class PackedBlockDataset(Dataset):
    """Map-style view over packed blocks ``[N, seq_len + 1]``, in stored order (used for validation)."""

    def __init__(self, blocks: torch.Tensor) -> None:
        self.blocks = blocks

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return _block_to_sample(self.blocks[index])


class ResumableBlockStream(IterableDataset):
    """Infinite, deterministic stream of training samples that can start at any global sample index.

    The global sample sequence is epoch after epoch of ``torch.randperm(N, seed + epoch)``, so global sample ``i``
    is block ``perm_{i // N}[i % N]``. Starting at ``start_sample``, consecutive runs of ``batch_size * world_size``
    samples form one global batch, and rank ``r`` yields the ``r``-th chunk of ``batch_size`` of each. Because the
    order is a pure function of the index, resuming only needs the index, which the trainer's step counter provides.
    """

    def __init__(
        self,
        blocks: torch.Tensor,
        batch_size: int,
        seed: int = 0,
        start_sample: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if blocks.ndim != 2 or blocks.shape[0] < 1:
            raise ValueError(f"blocks must be a non-empty [N, seq_len + 1] tensor, got shape {tuple(blocks.shape)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must satisfy 0 <= rank < world_size={world_size}, got {rank}")
        if start_sample < 0:
            raise ValueError(f"start_sample must be >= 0, got {start_sample}")
        self.blocks = blocks
        self.batch_size = batch_size
        self.seed = seed
        self.start_sample = start_sample
        self.rank = rank
        self.world_size = world_size

    def epoch_permutation(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.blocks.shape[0], generator=generator)

    def global_sample_indices(self) -> Iterator[int]:
        """Global sample indices this rank yields, in order, forever."""
        global_batch = self.batch_size * self.world_size
        batch_start = self.start_sample + self.rank * self.batch_size
        while True:
            yield from range(batch_start, batch_start + self.batch_size)
            batch_start += global_batch

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        worker_info = get_worker_info()
        if worker_info is not None and worker_info.num_workers > 1:
            # Every worker would replay the same stream, silently duplicating samples.
            raise RuntimeError(
                f"ResumableBlockStream must be read with num_workers <= 1, got num_workers={worker_info.num_workers}"
            )
        num_blocks = self.blocks.shape[0]
        cached_epoch, permutation = -1, None
        for sample_index in self.global_sample_indices():
            epoch, position = divmod(sample_index, num_blocks)
            if epoch != cached_epoch:
                cached_epoch, permutation = epoch, self.epoch_permutation(epoch)
            yield _train_sample(self.blocks, int(permutation[position]))

    def block_indices(self, start_sample: int, num_samples: int) -> torch.Tensor:
        """Sorted distinct block indices read by global samples ``[start_sample, start_sample + num_samples)``."""
        num_blocks = self.blocks.shape[0]
        end = start_sample + num_samples
        if -(-start_sample // num_blocks) * num_blocks + num_blocks <= end:  # holds a whole epoch: every block
            return torch.arange(num_blocks)
        parts = []
        for epoch in range(start_sample // num_blocks, (end - 1) // num_blocks + 1):
            lo, hi = max(start_sample, epoch * num_blocks), min(end, (epoch + 1) * num_blocks)
            parts.append(self.epoch_permutation(epoch)[lo - epoch * num_blocks : hi - epoch * num_blocks])
        return torch.cat(parts).unique()  # unique() sorts


class TextDataModule(pl.LightningDataModule):
    """Packs a text corpus into ``seq_len + 1``-token blocks for next-token distillation.

    Args:
        files: local ``.txt`` / ``.json`` / ``.jsonl`` / ``.parquet`` files, or directories (every such file inside,
            recursively, sorted). Each ``.txt`` file is one document; each json/jsonl/parquet record is one document.
        hub_dataset: a hub dataset name (or local data directory), loaded with
            ``datasets.load_dataset(hub_dataset, hub_config, split=hub_split)``.
        hub_config: the hub dataset's configuration name.
        hub_split: the hub dataset's split.
        text_field: the column / key holding the text in json, jsonl, parquet and hub records.
        max_chars: cap on the corpus size in characters; the last document read is truncated to fit.
        seq_len: tokens per training sample.
        batch_size: per-device micro-batch size.
        val_batch_size: validation batch size (default: ``batch_size``).
        val_fraction: fraction of packed blocks held out for validation (at least one block).
        seed: seeds the corpus file order (stdlib corpus), the train/val split and the training stream.
        tokenizer: a local directory or hub id loaded with ``AutoTokenizer``; ``None`` means the pipeline injects one
            via :meth:`set_tokenizer` (or trains one via :meth:`train_tokenizer`).

    With neither ``files`` nor ``hub_dataset`` the corpus is the Python standard library's ``.py`` sources.
    """

    def __init__(
        self,
        files: list[str] | None = None,
        hub_dataset: str | None = None,
        hub_config: str | None = None,
        hub_split: str = "train",
        text_field: str = "text",
        max_chars: int | None = None,
        seq_len: int = 256,
        batch_size: int = 8,
        val_batch_size: int | None = None,
        val_fraction: float = 0.05,
        seed: int = 0,
        tokenizer: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.stream_offset = 0  # global samples consumed by earlier pipeline stages (set by the pipeline)
        if files is not None and hub_dataset is not None:
            raise ValueError(
                f"files={files!r} and hub_dataset={hub_dataset!r} were both given; configure exactly one corpus source"
            )
        if files is not None and len(files) == 0:
            raise ValueError("files=[] is empty; give at least one path, or leave files unset to use another source")
        if max_chars is not None and max_chars < 1:
            raise ValueError(f"max_chars must be >= 1 (or None for no cap), got {max_chars}")
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if val_batch_size is not None and val_batch_size < 1:
            raise ValueError(f"val_batch_size must be >= 1 (or None for batch_size), got {val_batch_size}")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must satisfy 0 <= val_fraction < 1, got {val_fraction}")

        self.files = files
        self.hub_dataset = hub_dataset
        self.hub_config = hub_config
        self.hub_split = hub_split
        self.text_field = text_field
        self.max_chars = max_chars
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size if val_batch_size is not None else batch_size
        self.val_fraction = val_fraction
        self.seed = seed
        self.tokenizer_name_or_path = tokenizer
        self.tokens_per_sample = seq_len

        self.tokenizer: PreTrainedTokenizerBase | None = None
        self.train_blocks: torch.Tensor | None = None
        self.val_blocks: torch.Tensor | None = None
        self.num_train_blocks = 0
        self.num_val_blocks = 0
        self._documents: list[str] | None = None

    # ------------------------------------------------------------------ tokenizer

    def set_tokenizer(self, tokenizer: PreTrainedTokenizerBase) -> None:
        """Use ``tokenizer`` for packing (typically the teacher model's tokenizer)."""
        if tokenizer is not self.tokenizer:
            # Blocks packed with another vocabulary would be meaningless to the new one: repack at the next setup().
            self.train_blocks = self.val_blocks = None
            self.num_train_blocks = self.num_val_blocks = 0
        self.tokenizer = tokenizer

    def train_tokenizer(self, vocab_size: int, save_dir: str) -> PreTrainedTokenizerFast:
        """Train a byte-level BPE tokenizer on this module's corpus, save it to ``save_dir`` and use it.

        Byte-level pre-tokenization and decoding make every string encodable and ``decode(encode(s)) == s``.
        ``<|endoftext|>`` serves as bos/eos/unk/pad, as in GPT-2.
        """
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        minimum_vocab = len(pre_tokenizers.ByteLevel.alphabet()) + 1
        if vocab_size < minimum_vocab:
            raise ValueError(
                f"vocab_size must be >= {minimum_vocab} (256 byte symbols + {END_OF_TEXT}) for a byte-level BPE "
                f"tokenizer, got {vocab_size}"
            )
        documents = self.load_documents()
        if not documents:
            raise ValueError(f"cannot train a tokenizer: the corpus from {self.describe_source()} has no text")

        backend = Tokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[END_OF_TEXT],
            # Seeding all 256 byte symbols guarantees any text is encodable, even bytes absent from the corpus.
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        backend.train_from_iterator(documents, trainer=trainer)

        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=backend,
            bos_token=END_OF_TEXT,
            eos_token=END_OF_TEXT,
            unk_token=END_OF_TEXT,
            pad_token=END_OF_TEXT,
            # Clean-up would rewrite " ." to "." and break the exact round trip.
            clean_up_tokenization_spaces=False,
        )
        tokenizer.save_pretrained(save_dir)
        rank_zero_info(
            f"Trained a byte-level BPE tokenizer with {len(tokenizer)} tokens on {len(documents)} documents "
            f"from {self.describe_source()}; saved to {save_dir}"
        )
        self.set_tokenizer(tokenizer)
        return tokenizer

    def _require_tokenizer(self) -> PreTrainedTokenizerBase:
        if self.tokenizer is None and self.tokenizer_name_or_path is not None:
            self.tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_name_or_path)
        if self.tokenizer is None:
            raise RuntimeError(
                "TextDataModule has no tokenizer: set data.tokenizer to a tokenizer directory or hub id, or call "
                "set_tokenizer() / train_tokenizer() before setup()"
            )
        return self.tokenizer

    # ------------------------------------------------------------------ corpus

    def describe_source(self) -> str:
        """Human-readable name of the corpus source, for logs and error messages."""
        if self.files is not None:
            return f"files {self.files}"
        if self.hub_dataset is not None:
            return f"hub dataset {self.hub_dataset!r} (config={self.hub_config!r}, split={self.hub_split!r})"
        return f"the Python standard library sources in {sysconfig.get_paths()['stdlib']}"

    def load_documents(self) -> list[str]:
        """All documents of the corpus, in a deterministic order, capped at ``max_chars`` characters in total.

        The result is cached because both tokenizer training and packing read it.
        """
        if self._documents is None:
            documents: list[str] = []
            total_chars = 0
            for document in self._iter_source_documents():
                if not document:
                    continue
                if self.max_chars is not None and total_chars + len(document) >= self.max_chars:
                    documents.append(document[: self.max_chars - total_chars])
                    break
                documents.append(document)
                total_chars += len(document)
            self._documents = documents
        return self._documents

    def _iter_source_documents(self) -> Iterator[str]:
        if self.files is not None:
            for path in self._expand_files(self.files):
                yield from self._read_file_documents(path)
        elif self.hub_dataset is not None:
            yield from self._iter_hub_documents()
        else:
            yield from self._iter_stdlib_documents()

    @staticmethod
    def _expand_files(files: list[str]) -> list[Path]:
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

    def _read_file_documents(self, path: Path) -> Iterator[str]:
        extension = path.suffix.lower()
        if extension == ".txt":
            yield path.read_text(encoding="utf-8")
        elif extension == ".json":
            with path.open(encoding="utf-8") as handle:
                content = json.load(handle)
            for index, record in enumerate(self._json_records(content, path)):
                yield self._record_text(record, path, f"record {index}")
        elif extension == ".jsonl":
            with path.open(encoding="utf-8") as handle:
                for line_number, line in enumerate(handle, start=1):
                    if line.strip():
                        yield self._record_text(json.loads(line), path, f"line {line_number}")
        elif extension == ".parquet":
            yield from self._read_parquet_documents(path)
        else:
            raise ValueError(
                f"unsupported file extension {path.suffix!r} for data file {str(path)!r}; "
                f"supported extensions: {', '.join(SUPPORTED_EXTENSIONS)}"
            )

    @staticmethod
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

    def _record_text(self, record: Any, path: Path, where: str) -> str:
        if not isinstance(record, dict):
            raise ValueError(
                f"{where} of data file {str(path)!r} must be an object with a {self.text_field!r} key, "
                f"got {type(record).__name__}"
            )
        if self.text_field not in record:
            raise ValueError(
                f"{where} of data file {str(path)!r} has no key text_field={self.text_field!r}; "
                f"its keys are {list(record)}"
            )
        text = record[self.text_field]
        if not isinstance(text, str):
            raise ValueError(
                f"{where} of data file {str(path)!r}: {self.text_field!r} must be a string, got {type(text).__name__}"
            )
        return text

    def _read_parquet_documents(self, path: Path) -> Iterator[str]:
        import pyarrow.parquet as pq

        parquet_file = pq.ParquetFile(path)
        columns = parquet_file.schema_arrow.names
        if self.text_field not in columns:
            raise ValueError(
                f"parquet file {str(path)!r} has no column text_field={self.text_field!r}; its columns are {columns}"
            )
        # Reading batch by batch lets max_chars stop early on large files.
        for batch in parquet_file.iter_batches(columns=[self.text_field]):
            for text in batch.column(0).to_pylist():
                if text is not None:
                    yield text

    def _iter_hub_documents(self) -> Iterator[str]:
        import datasets

        dataset = datasets.load_dataset(self.hub_dataset, self.hub_config, split=self.hub_split)
        if self.text_field not in dataset.column_names:
            raise ValueError(
                f"{self.describe_source()} has no column text_field={self.text_field!r}; "
                f"its columns are {dataset.column_names}"
            )
        for batch in dataset.select_columns([self.text_field]).iter(batch_size=1000):
            for text in batch[self.text_field]:
                if text is not None:
                    yield text

    def _iter_stdlib_documents(self) -> Iterator[str]:
        stdlib = Path(sysconfig.get_paths()["stdlib"])
        sources = sorted(p for p in stdlib.rglob("*.py") if "site-packages" not in p.relative_to(stdlib).parts)
        # Sorting first makes the shuffle independent of filesystem order; shuffling mixes packages so that a
        # max_chars prefix is not, say, only asyncio.
        random.Random(self.seed).shuffle(sources)
        for source in sources:
            # A few stdlib test fixtures are deliberately not UTF-8; replacement characters are harmless here.
            yield source.read_text(encoding="utf-8", errors="replace")

    # ------------------------------------------------------------------ packing

    def setup(self, stage: str | None = None) -> None:
        if self.train_blocks is not None:
            return
        tokenizer = self._require_tokenizer()
        documents = self.load_documents()
        token_ids = self._tokenize_documents(tokenizer, documents)
        block_len = self.seq_len + 1
        num_tokens = token_ids.shape[0]
        num_blocks = num_tokens // block_len
        if num_blocks < 2:
            raise ValueError(
                f"the corpus from {self.describe_source()} has {num_tokens} tokens in {len(documents)} document(s), "
                f"which packs into {num_blocks} blocks of seq_len + 1 = {block_len} tokens; at least 2 blocks "
                f"({2 * block_len} tokens) are needed for one train and one validation block. Add data, raise "
                f"max_chars, or lower seq_len"
            )
        # The tail that does not fill a whole block is dropped; it is less than one sample's worth of tokens.
        blocks = token_ids[: num_blocks * block_len].view(num_blocks, block_len)

        num_val = max(1, round(self.val_fraction * num_blocks))
        if num_val >= num_blocks:
            raise ValueError(
                f"val_fraction={self.val_fraction} holds out {num_val} of {num_blocks} blocks, leaving none for "
                f"training; lower val_fraction or add data"
            )
        permutation = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(self.seed))
        # Sorting keeps each split in corpus order; the training stream does its own shuffling.
        self.val_blocks = blocks[permutation[:num_val].sort().values].contiguous()
        self.train_blocks = blocks[permutation[num_val:].sort().values].contiguous()
        self.num_val_blocks = num_val
        self.num_train_blocks = num_blocks - num_val
        rank_zero_info(
            f"Packed {num_tokens} tokens from {len(documents)} documents ({self.describe_source()}) into "
            f"{num_blocks} blocks of {block_len} tokens: {self.num_train_blocks} train, {self.num_val_blocks} val"
        )

    def _tokenize_documents(self, tokenizer: PreTrainedTokenizerBase, documents: list[str]) -> torch.Tensor:
        eos_id = tokenizer.eos_token_id
        pieces: list[np.ndarray] = []
        for start in range(0, len(documents), TOKENIZE_CHUNK_DOCUMENTS):
            chunk = documents[start : start + TOKENIZE_CHUNK_DOCUMENTS]
            # No special tokens per document (e.g. a BOS); documents are joined with EOS below instead.
            # verbose=False: whole documents exceed model_max_length by design, packing splits them.
            encoded = tokenizer(
                chunk,
                add_special_tokens=False,
                return_attention_mask=False,
                return_token_type_ids=False,
                verbose=False,
            )["input_ids"]
            for document_index, ids in enumerate(encoded, start=start):
                if document_index > 0 and eos_id is not None:
                    # EOS between documents tells the model where one text ends and an unrelated one begins.
                    pieces.append(np.array([eos_id], dtype=np.int64))
                pieces.append(np.asarray(ids, dtype=np.int64))
        if not pieces:
            return torch.zeros(0, dtype=torch.int64)
        return torch.from_numpy(np.concatenate(pieces))

    def _require_setup(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.train_blocks is None or self.val_blocks is None:
            raise RuntimeError("TextDataModule.setup() must run before its data is used")
        return self.train_blocks, self.val_blocks

    # ------------------------------------------------------------------ loaders

    def train_stream(self, start_sample: int = 0, rank: int = 0, world_size: int = 1) -> ResumableBlockStream:
        train_blocks, _ = self._require_setup()
        return ResumableBlockStream(
            train_blocks,
            batch_size=self.batch_size,
            seed=self.seed,
            start_sample=start_sample,
            rank=rank,
            world_size=world_size,
        )

    def train_dataloader(self) -> DataLoader:
        # Stages of a pipeline continue through the corpus: the pipeline sets ``stream_offset`` to the samples
        # consumed by the stages before (SlimMoE spends fresh tokens on every stage).
        start_sample, rank, world_size = self.stream_offset, 0, 1
        if self.trainer is not None:
            rank, world_size = self.trainer.global_rank, self.trainer.world_size
            # Lightning restores global_step from the checkpoint before requesting this loader, so on resume the
            # stream skips exactly the micro-batches already consumed by every rank.
            start_sample += (
                self.trainer.global_step * self.trainer.accumulate_grad_batches * self.batch_size * world_size
            )
        if start_sample:
            rank_zero_info(f"Training stream starts at global sample {start_sample}")
        # The blocks are an in-memory tensor, so worker processes would only add start-up cost (and duplicate the
        # stream); batch_size here is per device.
        return DataLoader(
            self.train_stream(start_sample=start_sample, rank=rank, world_size=world_size),
            batch_size=self.batch_size,
            num_workers=0,
        )

    def val_dataloader(self) -> DataLoader:
        _, val_blocks = self._require_setup()
        return DataLoader(
            PackedBlockDataset(val_blocks), batch_size=self.val_batch_size, shuffle=False, num_workers=0
        )

    def calibration_batches(self, num_tokens: int, batch_size: int | None = None) -> list[dict[str, torch.Tensor]]:
        """Deterministic training batches covering about ``num_tokens`` tokens, for importance scoring.

        Blocks are taken in the training stream's epoch-0 order: ``ceil(num_tokens / seq_len)`` samples, at least
        one and at most every training block, batched by ``batch_size`` (default: the training batch size). A
        fixed calibration batch size keeps scores independent of the device count: KD-Taylor sums |θ·g| per
        batch, so the grouping of samples into batches matters.
        """
        batch_size = batch_size or self.batch_size
        if num_tokens < 1:
            raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
        train_blocks, _ = self._require_setup()
        num_samples = min(max(1, math.ceil(num_tokens / self.seq_len)), train_blocks.shape[0])
        order = self.train_stream().epoch_permutation(0)[:num_samples]
        batches = []
        for start in range(0, num_samples, batch_size):
            blocks = train_blocks[order[start : start + batch_size]]
            batches.append({"input_ids": blocks[:, :-1].contiguous(), "labels": blocks[:, 1:].contiguous()})
        return batches

    def steps_for_tokens(self, max_tokens: int, accumulate_grad_batches: int = 1, world_size: int = 1) -> int:
        """Optimizer steps needed to consume ``max_tokens`` training tokens (at least 1)."""
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        if accumulate_grad_batches < 1:
            raise ValueError(f"accumulate_grad_batches must be >= 1, got {accumulate_grad_batches}")
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        tokens_per_step = self.seq_len * self.batch_size * accumulate_grad_batches * world_size
        return max(1, math.ceil(max_tokens / tokens_per_step))
