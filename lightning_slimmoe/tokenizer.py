"""Byte-level BPE tokenizer training, for runs whose corpus has no teacher tokenizer to borrow (e.g. the demo).

This module owns how such a tokenizer is built: GPT-2-style byte-level pre-tokenization and decoding, so that every
string is encodable and ``decode(encode(s)) == s``, with ``<|endoftext|>`` as bos/eos/unk/pad. Reading the corpus is
:mod:`lightning_slimmoe.corpora`'s job; saving the tokenizer and packing with it is :mod:`lightning_slimmoe.data`'s.
"""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedTokenizerFast

from lightning_slimmoe.errors import ConfigError

END_OF_TEXT = "<|endoftext|>"


def check_vocab_size(vocab_size: int) -> None:
    """Raise unless ``vocab_size`` holds the 256 byte symbols plus ``<|endoftext|>``."""
    from tokenizers import pre_tokenizers

    minimum_vocab = len(pre_tokenizers.ByteLevel.alphabet()) + 1
    if vocab_size < minimum_vocab:
        raise ConfigError(
            f"vocab_size must be >= {minimum_vocab} (256 byte symbols + {END_OF_TEXT}) for a byte-level BPE "
            f"tokenizer, got {vocab_size}"
        )


def train_bpe_tokenizer(
    documents: Sequence[str], vocab_size: int, corpus_name: str = "the corpus"
) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer of ``vocab_size`` tokens trained on ``documents``; deterministic for the same input.

    ``corpus_name`` names the documents in the error raised when there are none.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    check_vocab_size(vocab_size)
    if not documents:
        raise ConfigError(f"cannot train a tokenizer: {corpus_name} has no text")

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

    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=END_OF_TEXT,
        eos_token=END_OF_TEXT,
        unk_token=END_OF_TEXT,
        pad_token=END_OF_TEXT,
        # Clean-up would rewrite " ." to "." and break the exact round trip.
        clean_up_tokenization_spaces=False,
    )
