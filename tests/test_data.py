"""Tests for lightning_slimmoe.data (packing, the resumable stream) and the corpus readers and tokenizer training
it builds on (lightning_slimmoe.corpora, lightning_slimmoe.tokenizer)."""

import json
import random
import warnings
from pathlib import Path
from types import SimpleNamespace

import datasets
import lightning.pytorch as pl
import pytest
import torch
from transformers import AutoTokenizer

from lightning_slimmoe import corpora
from lightning_slimmoe.data import ResumableBlockStream, TextDataModule
from lightning_slimmoe.tokenizer import train_bpe_tokenizer

SEQ_LEN = 16
BATCH_SIZE = 4
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau".split()


def make_texts(num_documents: int = 6, words_per_document: int = 120) -> list[str]:
    rng = random.Random(1234)
    texts = []
    for index in range(num_documents):
        words = [rng.choice(WORDS) for _ in range(words_per_document)]
        # Punctuation, newlines and non-ASCII characters exercise the byte-level round trip.
        texts.append(f"Document {index}: " + " ".join(words) + ".\n  Ünïcode ✓ end\n")
    return texts


def write_txt(directory: Path, texts: list[str]) -> list[str]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, text in enumerate(texts):
        path = directory / f"doc_{index:02d}.txt"
        path.write_text(text, encoding="utf-8")
        paths.append(str(path))
    return paths


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return make_texts()


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory, texts) -> Path:
    corpus_dir = tmp_path_factory.mktemp("tokenizer_corpus")
    save_dir = tmp_path_factory.mktemp("tokenizer")
    TextDataModule(files=write_txt(corpus_dir, texts), seq_len=SEQ_LEN).train_tokenizer(300, str(save_dir))
    return save_dir


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return AutoTokenizer.from_pretrained(str(tokenizer_dir))


@pytest.fixture()
def datamodule(tmp_path, texts, tokenizer) -> TextDataModule:
    dm = TextDataModule(files=write_txt(tmp_path / "txt", texts), seq_len=SEQ_LEN, batch_size=BATCH_SIZE, seed=3)
    dm.set_tokenizer(tokenizer)
    dm.setup("fit")
    return dm


def take(iterable, count: int) -> list:
    iterator = iter(iterable)
    return [next(iterator) for _ in range(count)]


def stream_samples(dm: TextDataModule, start_sample: int, count: int, rank: int = 0, world_size: int = 1):
    stream = dm.train_stream(start_sample=start_sample, rank=rank, world_size=world_size)
    return torch.stack([sample["input_ids"] for sample in take(stream, count)])


# ---------------------------------------------------------------- tokenizer


def test_trained_tokenizer_round_trips_and_reloads(tmp_path, texts):
    dm = TextDataModule(files=write_txt(tmp_path / "txt", texts), seq_len=SEQ_LEN)
    trained = dm.train_tokenizer(vocab_size=300, save_dir=str(tmp_path / "tok"))
    assert dm.tokenizer is trained
    assert len(trained) == 300
    reloaded = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    assert reloaded.eos_token == reloaded.bos_token == reloaded.pad_token == reloaded.unk_token == "<|endoftext|>"
    samples = texts[:2] + ["never seen: 日本語 \t\r\n  x  ,. ß 🙂", " leading and trailing spaces  "]
    for text in samples:
        for tok in (trained, reloaded):
            ids = tok(text, add_special_tokens=False)["input_ids"]
            assert tok.decode(ids) == text
    assert reloaded(texts[0])["input_ids"] == trained(texts[0])["input_ids"]


def test_tokenizer_training_is_deterministic(tmp_path, texts, tokenizer_dir):
    dm = TextDataModule(files=write_txt(tmp_path / "txt", texts), seq_len=SEQ_LEN)
    dm.train_tokenizer(vocab_size=300, save_dir=str(tmp_path / "tok"))
    assert (tmp_path / "tok" / "tokenizer.json").read_text() == (tokenizer_dir / "tokenizer.json").read_text()


def test_tokenizer_vocab_too_small_is_rejected(tmp_path, texts):
    dm = TextDataModule(files=write_txt(tmp_path / "txt", texts))
    with pytest.raises(ValueError, match="vocab_size must be >= 257"):
        dm.train_tokenizer(vocab_size=100, save_dir=str(tmp_path / "tok"))


def test_train_bpe_tokenizer_function(texts, tokenizer):
    trained = train_bpe_tokenizer(texts, vocab_size=300)
    assert len(trained) == 300 and trained.eos_token_id == tokenizer.eos_token_id
    # The function is what train_tokenizer() runs: same corpus, same vocabulary.
    assert trained.get_vocab() == tokenizer.get_vocab()
    text = "unseen: ß 🙂 \t x  "
    assert trained.decode(trained(text, add_special_tokens=False)["input_ids"]) == text
    with pytest.raises(ValueError, match="vocab_size must be >= 257"):
        train_bpe_tokenizer(texts, vocab_size=256)
    with pytest.raises(ValueError, match="cannot train a tokenizer: the corpus has no text"):
        train_bpe_tokenizer([], vocab_size=300)


def test_tokenizer_loaded_from_path_argument(tmp_path, texts, tokenizer_dir, datamodule):
    dm = TextDataModule(files=write_txt(tmp_path / "txt", texts), seq_len=SEQ_LEN, seed=3, tokenizer=str(tokenizer_dir))
    dm.setup("fit")
    assert torch.equal(dm.train_blocks, datamodule.train_blocks)


# ---------------------------------------------------------------- formats


def test_all_file_formats_pack_identically(tmp_path, texts, tokenizer):
    records = [{"text": text, "id": index} for index, text in enumerate(texts)]
    json_list = tmp_path / "list.json"
    json_list.write_text(json.dumps(records), encoding="utf-8")
    json_dict = tmp_path / "dict.json"
    json_dict.write_text(json.dumps({"data": records}), encoding="utf-8")
    jsonl = tmp_path / "records.jsonl"
    jsonl.write_text("\n".join(json.dumps(record) for record in records) + "\n", encoding="utf-8")
    parquet = tmp_path / "records.parquet"
    datasets.Dataset.from_dict({"text": texts, "id": list(range(len(texts)))}).to_parquet(str(parquet))
    txt_dir = tmp_path / "txt_dir"
    txt_files = write_txt(txt_dir, texts)

    sources = {
        "txt files": txt_files,
        "txt directory": [str(txt_dir)],
        "json list": [str(json_list)],
        "json dict": [str(json_dict)],
        "jsonl": [str(jsonl)],
        "parquet": [str(parquet)],
    }
    packed = {}
    for name, files in sources.items():
        dm = TextDataModule(files=files, seq_len=SEQ_LEN)
        assert dm.load_documents() == texts, name
        dm.set_tokenizer(tokenizer)
        dm.setup("fit")
        packed[name] = (dm.train_blocks, dm.val_blocks)
    reference = packed["txt files"]
    for name, (train, val) in packed.items():
        assert torch.equal(train, reference[0]) and torch.equal(val, reference[1]), name


def test_custom_text_field(tmp_path, texts):
    path = tmp_path / "records.jsonl"
    path.write_text("\n".join(json.dumps({"content": text}) for text in texts), encoding="utf-8")
    assert TextDataModule(files=[str(path)], text_field="content").load_documents() == texts


def test_max_chars_caps_the_corpus(tmp_path, texts):
    dm = TextDataModule(files=write_txt(tmp_path / "txt", texts), max_chars=len(texts[0]) + 10)
    assert dm.load_documents() == [texts[0], texts[1][:10]]


def test_readers_on_tiny_files(tmp_path):
    txt = tmp_path / "one.txt"
    txt.write_text("whole file\nis one document", encoding="utf-8")
    assert list(corpora.read_txt(txt)) == ["whole file\nis one document"]
    as_list = tmp_path / "list.json"
    as_list.write_text(json.dumps([{"body": "a"}, {"body": "b"}]), encoding="utf-8")
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"meta": 1, "rows": [{"body": "a"}, {"body": "b"}]}), encoding="utf-8")
    assert list(corpora.read_json(as_list, "body")) == list(corpora.read_json(wrapped, "body")) == ["a", "b"]
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text('{"text": "a"}\n\n  \n{"text": "b"}\n', encoding="utf-8")  # blank lines are skipped
    assert list(corpora.read_jsonl(jsonl)) == ["a", "b"]
    parquet = tmp_path / "rows.parquet"
    datasets.Dataset.from_dict({"text": ["a", "b"]}).to_parquet(str(parquet))
    assert list(corpora.read_parquet(parquet)) == ["a", "b"]
    # read_file_documents dispatches on the extension.
    assert list(corpora.read_file_documents(txt)) == ["whole file\nis one document"]
    assert list(corpora.read_file_documents(as_list, "body")) == ["a", "b"]
    assert list(corpora.read_file_documents(jsonl)) == list(corpora.read_file_documents(parquet)) == ["a", "b"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n{"text": 3}\n', encoding="utf-8")
    with pytest.raises(corpora.CorpusError, match=r"bad\.jsonl: line 2: 'text' must be a string, got int"):
        list(corpora.read_jsonl(bad))
    with pytest.raises(corpora.CorpusError, match=r"list\.json: record 0: no key text_field='text'"):
        list(corpora.read_json(as_list, "text"))


def test_expand_files_and_describe_source(tmp_path):
    (tmp_path / "corpus" / "sub").mkdir(parents=True)
    for name in ("b.txt", "a.jsonl", "sub/c.PARQUET", "notes.md"):
        (tmp_path / "corpus" / name).write_text("x")
    single = tmp_path / "single.txt"
    single.write_text("y")
    expanded = corpora.expand_files([str(single), str(tmp_path / "corpus")])
    assert [p.relative_to(tmp_path).as_posix() for p in expanded] == [
        "single.txt", "corpus/a.jsonl", "corpus/b.txt", "corpus/sub/c.PARQUET"
    ]
    assert corpora.describe_source(files=["x.txt"]) == "files ['x.txt']"
    assert corpora.describe_source(hub_dataset="d", hub_split="test") == "hub dataset 'd' (config=None, split='test')"
    assert corpora.describe_source().startswith("the Python standard library sources in ")


def test_load_documents_function_caps_and_skips_empty(tmp_path, texts):
    files = write_txt(tmp_path / "txt", [texts[0], "", texts[1], texts[2]])
    assert corpora.load_documents(files=files) == texts[:3]  # the empty document is skipped
    assert corpora.load_documents(files=files, max_chars=len(texts[0])) == [texts[0]]
    assert corpora.load_documents(files=files, max_chars=len(texts[0]) + 1) == [texts[0], texts[1][:1]]
    assert corpora.load_documents(files=files, max_chars=5) == [texts[0][:5]]
    assert corpora.load_documents(max_chars=50_000, seed=7) == TextDataModule(max_chars=50_000, seed=7).load_documents()


def test_arguments_are_kept_once_in_hparams(tmp_path, texts, tokenizer):
    dm = TextDataModule(files=write_txt(tmp_path / "txt", texts), seq_len=SEQ_LEN, batch_size=3, val_batch_size=2)
    assert dm.batch_size == dm.hparams.batch_size == 3  # read by callbacks through trainer.datamodule
    with pytest.raises(AttributeError):
        dm.batch_size = 5
    assert not hasattr(dm, "files") and not hasattr(dm, "seq_len") and not hasattr(dm, "tokens_per_sample")
    dm.set_tokenizer(tokenizer)
    dm.setup("fit")
    assert next(iter(dm.val_dataloader()))["input_ids"].shape[0] == min(2, dm.num_val_blocks)
    assert next(iter(dm.train_dataloader()))["input_ids"].shape[0] == 3


# ---------------------------------------------------------------- packing and split


def test_packing_shapes_and_shifted_targets(datamodule, texts, tokenizer):
    dm = datamodule
    block_len = SEQ_LEN + 1
    assert dm.hparams.seq_len == SEQ_LEN
    assert dm.train_blocks.dtype == torch.int64 and dm.train_blocks.shape == (dm.num_train_blocks, block_len)
    assert dm.val_blocks.shape == (dm.num_val_blocks, block_len)
    num_blocks = dm.num_train_blocks + dm.num_val_blocks
    assert num_blocks >= 30
    assert dm.num_val_blocks == max(1, round(0.05 * num_blocks))

    # The corpus is the documents joined by EOS, cut into whole blocks; the split keeps corpus order per side.
    eos = tokenizer.eos_token_id
    stream = []
    for index, text in enumerate(texts):
        if index:
            stream.append(eos)
        stream.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
    expected_blocks = torch.tensor(stream[: num_blocks * block_len]).view(num_blocks, block_len)
    all_blocks = {tuple(block.tolist()) for block in torch.cat([dm.train_blocks, dm.val_blocks])}
    assert all_blocks == {tuple(block.tolist()) for block in expected_blocks}

    batch = next(iter(dm.val_dataloader()))
    assert set(batch) == {"input_ids", "labels"}
    assert batch["input_ids"].shape == batch["labels"].shape == (min(BATCH_SIZE, dm.num_val_blocks), SEQ_LEN)
    assert torch.equal(batch["input_ids"][:, 1:], batch["labels"][:, :-1])
    assert torch.equal(batch["input_ids"][0], dm.val_blocks[0, :-1])
    assert torch.equal(batch["labels"][0], dm.val_blocks[0, 1:])


def test_split_is_deterministic_disjoint_and_seeded(tmp_path, texts, tokenizer, datamodule):
    def split(seed: int):
        dm = TextDataModule(files=write_txt(tmp_path / "txt", texts), seq_len=SEQ_LEN, seed=seed, val_fraction=0.2)
        dm.set_tokenizer(tokenizer)
        dm.setup("fit")
        return dm

    first, second, other_seed = split(3), split(3), split(4)
    assert torch.equal(first.train_blocks, second.train_blocks)
    assert torch.equal(first.val_blocks, second.val_blocks)
    # Block contents can repeat in principle, so check disjointness on positions in the packed corpus instead.
    num_blocks = first.num_train_blocks + first.num_val_blocks
    permutation = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(3))
    val_positions = set(permutation[: first.num_val_blocks].tolist())
    train_positions = set(permutation[first.num_val_blocks :].tolist())
    assert not val_positions & train_positions and len(val_positions | train_positions) == num_blocks
    assert not torch.equal(first.val_blocks, other_seed.val_blocks)


def test_setup_is_idempotent(datamodule, tokenizer):
    train_blocks = datamodule.train_blocks
    datamodule.setup("fit")
    datamodule.setup("validate")
    assert datamodule.train_blocks is train_blocks
    datamodule.set_tokenizer(tokenizer)  # the same tokenizer keeps the packed blocks
    assert datamodule.train_blocks is train_blocks


# ---------------------------------------------------------------- training stream


def test_stream_follows_seeded_epoch_permutations(datamodule):
    dm = datamodule
    num_train = dm.num_train_blocks
    samples = stream_samples(dm, start_sample=0, count=2 * num_train + 5)
    for index, sample in enumerate(samples):
        epoch, position = divmod(index, num_train)
        permutation = torch.randperm(num_train, generator=torch.Generator().manual_seed(dm.hparams.seed + epoch))
        assert torch.equal(sample, dm.train_blocks[permutation[position], :-1])
    # Every block appears exactly once per epoch.
    first_epoch = {tuple(sample.tolist()) for sample in samples[:num_train]}
    assert first_epoch == {tuple(block[:-1].tolist()) for block in dm.train_blocks}


def test_stream_resume_continues_at_next_unseen_batch(datamodule):
    dm = datamodule
    total = 2 * dm.num_train_blocks + 3 * BATCH_SIZE  # crosses two epoch boundaries
    reference = stream_samples(dm, start_sample=0, count=total)
    for batches_done in (1, 3, dm.num_train_blocks // BATCH_SIZE, dm.num_train_blocks // BATCH_SIZE + 1):
        start = batches_done * BATCH_SIZE
        resumed = stream_samples(dm, start_sample=start, count=total - start)
        assert torch.equal(resumed, reference[start:]), batches_done


def test_two_ranks_interleave_to_the_single_rank_global_batches(datamodule):
    dm = datamodule
    num_global_batches = dm.num_train_blocks // BATCH_SIZE + 2  # crosses an epoch boundary
    start = 3 * 2 * BATCH_SIZE  # resumed after three global batches of two ranks
    single = stream_samples(dm, start, num_global_batches * 2 * BATCH_SIZE).view(num_global_batches, 2 * BATCH_SIZE, -1)
    rank0 = stream_samples(dm, start, num_global_batches * BATCH_SIZE, rank=0, world_size=2)
    rank1 = stream_samples(dm, start, num_global_batches * BATCH_SIZE, rank=1, world_size=2)
    interleaved = torch.cat(
        [rank0.view(num_global_batches, BATCH_SIZE, -1), rank1.view(num_global_batches, BATCH_SIZE, -1)], dim=1
    )
    assert torch.equal(interleaved, single)


def test_train_dataloader_start_comes_from_trainer(datamodule):
    dm = datamodule
    reference = stream_samples(dm, 0, 2 * dm.num_train_blocks + 8 * BATCH_SIZE)

    batch = next(iter(dm.train_dataloader()))  # no trainer: start at 0
    assert batch["input_ids"].shape == batch["labels"].shape == (BATCH_SIZE, SEQ_LEN)
    assert torch.equal(batch["input_ids"], reference[:BATCH_SIZE])
    assert batch["input_ids"].dtype == torch.int64

    # 5 optimizer steps x 2 accumulated micro-batches x 2 ranks have been consumed; rank 1 takes the second chunk.
    dm.trainer = SimpleNamespace(global_step=5, accumulate_grad_batches=2, global_rank=1, world_size=2)
    start = 5 * 2 * BATCH_SIZE * 2
    batch = next(iter(dm.train_dataloader()))
    assert torch.equal(batch["input_ids"], reference[start + BATCH_SIZE : start + 2 * BATCH_SIZE])


def test_stream_rejects_multiple_workers(datamodule):
    loader = torch.utils.data.DataLoader(datamodule.train_stream(), batch_size=BATCH_SIZE, num_workers=2)
    with pytest.raises(RuntimeError, match="num_workers"):
        next(iter(loader))


def test_stream_argument_validation():
    blocks = torch.zeros(4, SEQ_LEN + 1, dtype=torch.int64)
    with pytest.raises(ValueError, match="rank"):
        ResumableBlockStream(blocks, batch_size=2, rank=2, world_size=2)
    with pytest.raises(ValueError, match="start_sample"):
        ResumableBlockStream(blocks, batch_size=2, start_sample=-1)


class RecordingModule(pl.LightningModule):
    """A tiny next-token model that records which samples it trained on."""

    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.embedding = torch.nn.Embedding(vocab_size, 8)
        self.head = torch.nn.Linear(8, vocab_size)
        self.seen: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        self.seen.append(batch["input_ids"].clone())
        logits = self.head(self.embedding(batch["input_ids"]))
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lightning_resume_continues_the_stream(tmp_path, texts, tokenizer):
    """A fit resumed from a mid-stream checkpoint trains on exactly the batches an uninterrupted fit would."""

    def fit(max_steps: int, ckpt_path=None):
        dm = TextDataModule(files=write_txt(tmp_path / "txt", texts), seq_len=SEQ_LEN, batch_size=BATCH_SIZE)
        dm.set_tokenizer(tokenizer)
        model = RecordingModule(len(tokenizer))
        trainer = pl.Trainer(
            max_steps=max_steps,
            accumulate_grad_batches=2,
            limit_val_batches=0,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
            default_root_dir=tmp_path,
        )
        trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
        return trainer, dm, torch.cat(model.seen)

    first_trainer, dm, first_part = fit(max_steps=2)
    first_trainer.save_checkpoint(tmp_path / "step2.ckpt")
    _, _, second_part = fit(max_steps=6, ckpt_path=tmp_path / "step2.ckpt")
    # 6 optimizer steps x 2 accumulated micro-batches of the stream that starts at sample 0.
    uninterrupted = stream_samples(dm, start_sample=0, count=6 * 2 * BATCH_SIZE)
    assert torch.equal(torch.cat([first_part, second_part]), uninterrupted)


# ---------------------------------------------------------------- calibration and step counts


def test_calibration_batches(datamodule):
    dm = datamodule
    batches = dm.calibration_batches(num_tokens=5 * SEQ_LEN + 1)  # 6 samples
    assert [batch["input_ids"].shape for batch in batches] == [(BATCH_SIZE, SEQ_LEN), (2, SEQ_LEN)]
    reference = stream_samples(dm, 0, 6)
    assert torch.equal(torch.cat([batch["input_ids"] for batch in batches]), reference)
    assert torch.equal(batches[0]["input_ids"][:, 1:], batches[0]["labels"][:, :-1])
    assert sum(batch["input_ids"].shape[0] for batch in dm.calibration_batches(1)) == 1
    assert sum(batch["input_ids"].shape[0] for batch in dm.calibration_batches(10**9)) == dm.num_train_blocks
    assert torch.equal(dm.calibration_batches(100)[0]["input_ids"], dm.calibration_batches(100)[0]["input_ids"])


def test_steps_for_tokens():
    dm = TextDataModule(seq_len=16, batch_size=4)
    assert dm.steps_for_tokens(64) == 1
    assert dm.steps_for_tokens(65) == 2
    assert dm.steps_for_tokens(1) == 1
    assert dm.steps_for_tokens(1000, accumulate_grad_batches=2, world_size=2) == 4  # 256 tokens per step
    with pytest.raises(ValueError, match="max_tokens"):
        dm.steps_for_tokens(0)


# ---------------------------------------------------------------- stdlib corpus


def test_stdlib_corpus(tmp_path):
    dm = TextDataModule(max_chars=200_000, seq_len=64, batch_size=4, seed=7)
    with warnings.catch_warnings():
        # The demo corpus is read as it always was: its few non-UTF-8 fixtures are replaced silently.
        warnings.simplefilter("error", corpora.CorpusWarning)
        documents = dm.load_documents()
    assert sum(len(document) for document in documents) == 200_000
    assert len(documents) > 1
    assert documents == TextDataModule(max_chars=200_000, seed=7).load_documents()
    assert documents != TextDataModule(max_chars=200_000, seed=8).load_documents()
    dm.train_tokenizer(vocab_size=512, save_dir=str(tmp_path / "tok"))
    dm.setup("fit")
    assert dm.num_train_blocks > 100 and dm.num_val_blocks >= 1
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (4, 64)


# ---------------------------------------------------------------- errors


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        TextDataModule(files=[str(missing)]).load_documents()


def test_unknown_extension(tmp_path):
    path = tmp_path / "corpus.csv"
    path.write_text("a,b\n")
    with pytest.raises(ValueError, match=r"corpus\.csv.*\.txt, \.json, \.jsonl, \.parquet"):
        TextDataModule(files=[str(path)]).load_documents()


def test_missing_text_field(tmp_path):
    path = tmp_path / "records.jsonl"
    path.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"body": "oops"}) + "\n")
    with pytest.raises(ValueError, match=r"records\.jsonl: line 2: no key text_field='text'"):
        TextDataModule(files=[str(path)]).load_documents()
    parquet = tmp_path / "records.parquet"
    datasets.Dataset.from_dict({"body": ["oops"]}).to_parquet(str(parquet))
    with pytest.raises(ValueError, match=r"records\.parquet: columns: no column text_field='text'"):
        TextDataModule(files=[str(parquet)]).load_documents()


def test_too_short_corpus(tmp_path, tokenizer):
    dm = TextDataModule(files=write_txt(tmp_path / "txt", ["tiny text"]), seq_len=SEQ_LEN)
    dm.set_tokenizer(tokenizer)
    with pytest.raises(ValueError, match=r"files .*doc_00\.txt.* has \d+ tokens.*seq_len \+ 1 = 17"):
        dm.setup("fit")


def test_no_tokenizer(tmp_path, texts):
    dm = TextDataModule(files=write_txt(tmp_path / "txt", texts))
    with pytest.raises(RuntimeError, match="no tokenizer"):
        dm.setup("fit")


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"seq_len": 0}, "seq_len"),
        ({"batch_size": 0}, "batch_size"),
        ({"val_fraction": 1.0}, "val_fraction"),
        ({"max_chars": 0}, "max_chars"),
        ({"files": []}, "files"),
        ({"files": ["a.txt"], "hub_dataset": "x"}, "hub_dataset"),
    ],
)
def test_invalid_arguments(kwargs, field):
    with pytest.raises(ValueError, match=field):
        TextDataModule(**kwargs)


def test_hub_dataset_source(tmp_path, texts, tokenizer):
    # A local data directory goes through the same datasets.load_dataset path as a hub name, without a network.
    data_dir = tmp_path / "hub_like"
    data_dir.mkdir()
    (data_dir / "train.jsonl").write_text("\n".join(json.dumps({"body": text}) for text in texts), encoding="utf-8")
    dm = TextDataModule(hub_dataset=str(data_dir), text_field="body", seq_len=SEQ_LEN)
    assert dm.load_documents() == texts
    missing_field = TextDataModule(hub_dataset=str(data_dir), seq_len=SEQ_LEN)
    with pytest.raises(ValueError, match=r"hub dataset .*: columns: no column text_field='text'.*\['body'\]"):
        missing_field.load_documents()
