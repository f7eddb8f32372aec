"""Text data for SlimMoE distillation: pack a corpus into fixed-length blocks and stream them resumably.

This module owns :class:`TextDataModule` (tokenizing and packing a corpus into ``seq_len + 1``-token blocks, the
train/validation split, the loaders, calibration batches and step arithmetic) and the datasets it serves. Where the
documents come from (local files, a hub dataset, or the Python standard library's sources) is
:mod:`lightning_slimmoe.corpora`; training a byte-level BPE tokenizer on them is :mod:`lightning_slimmoe.tokenizer`.

Training reads an *infinite*, deterministic stream whose position is derived from ``trainer.global_step``; a resumed
fit therefore continues with the next unseen batch without the datamodule having to checkpoint any state of its own.
"""

from __future__ import annotations

import codecs
import math
from collections.abc import Iterator
from typing import Literal

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from lightning_slimmoe import corpora
from lightning_slimmoe.errors import ConfigError
from lightning_slimmoe.tokenizer import check_vocab_size, train_bpe_tokenizer

# Documents are handed to the tokenizer in chunks so that peak memory stays bounded on large corpora while the
# fast tokenizer still gets batches big enough to parallelize over.
TOKENIZE_CHUNK_DOCUMENTS = 1024


def _require_at_least(name: str, value: int | None, minimum: int = 1, none_means: str | None = None) -> None:
    """Raise ``ValueError`` unless ``value >= minimum``; given ``none_means``, ``None`` is accepted as well."""
    if value is None and none_means is not None:
        return
    if value < minimum:
        alternative = f" (or None for {none_means})" if none_means is not None else ""
        raise ConfigError(f"{name} must be >= {minimum}{alternative}, got {value}")


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
        encoding: the text encoding of ``.txt`` / ``.json`` / ``.jsonl`` files (a UTF-8 BOM is dropped).
        encoding_errors: what an undecodable byte in those files does: ``"replace"`` it with U+FFFD (one warning per
            file, with the count), ``"strict"`` (an error naming the file and byte offset) or ``"ignore"`` (dropped).
            Whatever it says, a file with more than 1% undecodable bytes or any NUL is refused as not text.
        skip_bad_records: skip malformed jsonl lines and records without a string ``text_field`` (one warning per
            file, with the count and the first) instead of failing on the first.

    With neither ``files`` nor ``hub_dataset`` the corpus is the Python standard library's ``.py`` sources (read as
    always, without the decoding policy). Data errors are :class:`lightning_slimmoe.corpora.CorpusError` naming the
    file and the line, record, row or byte; they are raised while the corpus is read (by :meth:`setup` or
    :meth:`train_tokenizer`), before the pipeline writes anything. The arguments are kept once, in ``self.hparams``.
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
        encoding: str = "utf-8",
        encoding_errors: Literal["replace", "strict", "ignore"] = "replace",
        skip_bad_records: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.stream_offset = 0  # global samples consumed by earlier pipeline stages (set by the pipeline)
        if files is not None and hub_dataset is not None:
            raise ConfigError(
                f"files={files!r} and hub_dataset={hub_dataset!r} were both given; configure exactly one corpus source"
            )
        if files is not None and len(files) == 0:
            raise ConfigError("files=[] is empty; give at least one path, or leave files unset to use another source")
        _require_at_least("max_chars", max_chars, none_means="no cap")
        _require_at_least("seq_len", seq_len)
        _require_at_least("batch_size", batch_size)
        _require_at_least("val_batch_size", val_batch_size, none_means="batch_size")
        if not 0.0 <= val_fraction < 1.0:
            raise ConfigError(f"val_fraction must satisfy 0 <= val_fraction < 1, got {val_fraction}")
        try:
            codecs.lookup(encoding)
            b"x".decode(encoding, "ignore")  # lookup() also knows bytes-to-bytes codecs such as base64
        except LookupError as error:
            raise ConfigError(
                f"data.encoding={encoding!r} is not a text encoding ({error}); e.g. 'utf-8', 'latin-1', 'cp1252'"
            ) from None
        if encoding_errors not in corpora.ENCODING_ERRORS:
            raise ConfigError(
                f"data.encoding_errors must be one of {', '.join(corpora.ENCODING_ERRORS)}, got {encoding_errors!r}"
            )

        self.tokenizer: PreTrainedTokenizerBase | None = None
        self.train_blocks: torch.Tensor | None = None
        self.val_blocks: torch.Tensor | None = None
        self.num_train_blocks = 0
        self.num_val_blocks = 0
        self._documents: list[str] | None = None

    @property
    def batch_size(self) -> int:
        """Per-device micro-batch size (``hparams.batch_size``); callbacks read it from ``trainer.datamodule``."""
        return self.hparams.batch_size

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

        See :func:`lightning_slimmoe.tokenizer.train_bpe_tokenizer` for the tokenizer's settings.
        """
        check_vocab_size(vocab_size)  # before reading a corpus that may be large
        documents = self.load_documents()
        tokenizer = train_bpe_tokenizer(
            documents, vocab_size, corpus_name=f"the corpus from {self.describe_source()}"
        )
        tokenizer.save_pretrained(save_dir)
        rank_zero_info(
            f"Trained a byte-level BPE tokenizer with {len(tokenizer)} tokens on {len(documents)} documents "
            f"from {self.describe_source()}; saved to {save_dir}"
        )
        self.set_tokenizer(tokenizer)
        return tokenizer

    def _require_tokenizer(self) -> PreTrainedTokenizerBase:
        if self.tokenizer is None and self.hparams.tokenizer is not None:
            self.tokenizer = AutoTokenizer.from_pretrained(self.hparams.tokenizer)
        if self.tokenizer is None:
            raise RuntimeError(
                "TextDataModule has no tokenizer: set data.tokenizer to a tokenizer directory or hub id, or call "
                "set_tokenizer() / train_tokenizer() before setup()"
            )
        return self.tokenizer

    # ------------------------------------------------------------------ corpus

    def describe_source(self) -> str:
        """Human-readable name of the corpus source, for logs and error messages."""
        hp = self.hparams
        return corpora.describe_source(hp.files, hp.hub_dataset, hp.hub_config, hp.hub_split)

    def load_documents(self) -> list[str]:
        """All documents of the corpus, in a deterministic order, capped at ``max_chars`` characters in total.

        The result is cached because both tokenizer training and packing read it.
        """
        if self._documents is None:
            hp = self.hparams
            self._documents = corpora.load_documents(
                files=hp.files,
                hub_dataset=hp.hub_dataset,
                hub_config=hp.hub_config,
                hub_split=hp.hub_split,
                text_field=hp.text_field,
                max_chars=hp.max_chars,
                seed=hp.seed,
                encoding=hp.encoding,
                encoding_errors=hp.encoding_errors,
                skip_bad_records=hp.skip_bad_records,
            )
        return self._documents

    # ------------------------------------------------------------------ packing

    def setup(self, stage: str | None = None) -> None:
        if self.train_blocks is not None:
            return
        tokenizer = self._require_tokenizer()
        documents = self.load_documents()
        token_ids = self._tokenize_documents(tokenizer, documents)
        block_len = self.hparams.seq_len + 1
        num_tokens = token_ids.shape[0]
        num_blocks = num_tokens // block_len
        if num_blocks < 2:
            raise ConfigError(
                f"the corpus from {self.describe_source()} has {num_tokens} tokens in {len(documents)} document(s), "
                f"which packs into {num_blocks} blocks of seq_len + 1 = {block_len} tokens; at least 2 blocks "
                f"({2 * block_len} tokens) are needed for one train and one validation block. Add data "
                f"(data.init_args.files), raise data.init_args.max_chars, or lower data.init_args.seq_len"
            )
        # The tail that does not fill a whole block is dropped; it is less than one sample's worth of tokens.
        blocks = token_ids[: num_blocks * block_len].view(num_blocks, block_len)

        val_fraction = self.hparams.val_fraction
        num_val = max(1, round(val_fraction * num_blocks))
        if num_val >= num_blocks:
            raise ConfigError(
                f"data.init_args.val_fraction={val_fraction} holds out {num_val} of {num_blocks} blocks, leaving none for "
                f"training; lower val_fraction or add data"
            )
        permutation = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(self.hparams.seed))
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
            batch_size=self.hparams.batch_size,
            seed=self.hparams.seed,
            start_sample=start_sample,
            rank=rank,
            world_size=world_size,
        )

    def train_dataloader(self) -> DataLoader:
        # Stages of a pipeline continue through the corpus: the pipeline sets ``stream_offset`` to the samples
        # consumed by the stages before (SlimMoE spends fresh tokens on every stage).
        batch_size = self.hparams.batch_size
        start_sample, rank, world_size = self.stream_offset, 0, 1
        if self.trainer is not None:
            rank, world_size = self.trainer.global_rank, self.trainer.world_size
            # Lightning restores global_step from the checkpoint before requesting this loader, so on resume the
            # stream skips exactly the micro-batches already consumed by every rank.
            start_sample += self.trainer.global_step * self.trainer.accumulate_grad_batches * batch_size * world_size
        if start_sample:
            rank_zero_info(f"Training stream starts at global sample {start_sample}")
        # The blocks are an in-memory tensor, so worker processes would only add start-up cost (and duplicate the
        # stream); batch_size here is per device.
        return DataLoader(
            self.train_stream(start_sample=start_sample, rank=rank, world_size=world_size),
            batch_size=batch_size,
            num_workers=0,
        )

    def val_dataloader(self) -> DataLoader:
        _, val_blocks = self._require_setup()
        val_batch_size = self.hparams.val_batch_size
        if val_batch_size is None:
            val_batch_size = self.hparams.batch_size
        return DataLoader(PackedBlockDataset(val_blocks), batch_size=val_batch_size, shuffle=False, num_workers=0)

    def calibration_batches(self, num_tokens: int, batch_size: int | None = None) -> list[dict[str, torch.Tensor]]:
        """Deterministic training batches covering about ``num_tokens`` tokens, for importance scoring.

        Blocks are taken in the training stream's epoch-0 order: ``ceil(num_tokens / seq_len)`` samples, at least
        one and at most every training block, batched by ``batch_size`` (default: the training batch size). A
        fixed calibration batch size keeps scores independent of the device count: KD-Taylor sums |θ·g| per
        batch, so the grouping of samples into batches matters.
        """
        batch_size = batch_size or self.hparams.batch_size
        _require_at_least("num_tokens", num_tokens)
        train_blocks, _ = self._require_setup()
        num_samples = min(max(1, math.ceil(num_tokens / self.hparams.seq_len)), train_blocks.shape[0])
        order = self.train_stream().epoch_permutation(0)[:num_samples]
        batches = []
        for start in range(0, num_samples, batch_size):
            blocks = train_blocks[order[start : start + batch_size]]
            batches.append({"input_ids": blocks[:, :-1].contiguous(), "labels": blocks[:, 1:].contiguous()})
        return batches

    def steps_for_tokens(self, max_tokens: int, accumulate_grad_batches: int = 1, world_size: int = 1) -> int:
        """Optimizer steps needed to consume ``max_tokens`` training tokens (at least 1)."""
        _require_at_least("max_tokens", max_tokens)
        _require_at_least("accumulate_grad_batches", accumulate_grad_batches)
        _require_at_least("world_size", world_size)
        tokens_per_step = self.hparams.seq_len * self.hparams.batch_size * accumulate_grad_batches * world_size
        return max(1, math.ceil(max_tokens / tokens_per_step))
