"""Real-world corpus files: the decoding policy (``encoding``, ``encoding_errors``), bad records
(``skip_bad_records``) and the named errors of lightning_slimmoe.corpora, raised before a run writes anything."""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import warnings
from pathlib import Path

import datasets
import pytest
from transformers import AutoTokenizer

from helpers import tiny_recipe
from lightning_slimmoe.cli import main
from lightning_slimmoe.corpora import MAX_UNDECODABLE_FRACTION, CorpusError, CorpusWarning
from lightning_slimmoe.data import TextDataModule

SEQ_LEN = 16
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma".split()


def prose(num_words: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(num_words)) + ".\n Ünïcode ✓\n"


def documents(path: Path, **kwargs) -> list[str]:
    return TextDataModule(files=[str(path)], **kwargs).load_documents()


def corpus_warnings(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, CorpusWarning)]


def jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """A 300-token byte-level BPE, trained the way tests/test_data.py trains its tokenizer."""
    corpus = tmp_path_factory.mktemp("tok_corpus") / "corpus.txt"
    corpus.write_text("\n".join(prose(120, seed) for seed in range(6)), encoding="utf-8")
    save_dir = tmp_path_factory.mktemp("tokenizer")
    TextDataModule(files=[str(corpus)], seq_len=SEQ_LEN).train_tokenizer(300, str(save_dir))
    return AutoTokenizer.from_pretrained(str(save_dir))


# ---------------------------------------------------------------- decoding


def test_corpus_error_message_format_and_pickling():
    error = CorpusError("data/a.jsonl", "line 3", "malformed JSON")
    assert isinstance(error, ValueError)
    assert str(error) == "data/a.jsonl: line 3: malformed JSON"
    assert str(pickle.loads(pickle.dumps(error))) == str(error)


def test_stray_byte_in_large_corpus_is_replaced_and_warned_once(tmp_path, tokenizer):
    # A legitimate U+FFFD in the text must not be counted as a replaced byte.
    text = prose(400_000)
    assert len(text.encode()) > 2_000_000
    half = len(text) // 2
    raw = text[:half].encode() + b"\xa9" + text[half:].encode() + "real \ufffd kept\n".encode()
    path = tmp_path / "big.txt"
    path.write_bytes(raw)
    dm = TextDataModule(files=[str(path)], seq_len=64)
    dm.set_tokenizer(tokenizer)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        dm.setup("fit")
    messages = corpus_warnings(record)
    assert len(messages) == 1, messages
    assert "big.txt: replaced 1 undecodable byte(s)" in messages[0]
    assert f"first at byte {len(text[:half].encode())}" in messages[0]
    assert dm.num_train_blocks > 1000
    assert dm.load_documents()[0].count("\ufffd") == 2  # the replaced byte and the real one


def test_strict_names_the_file_encoding_and_byte_offset(tmp_path):
    path = tmp_path / "latin.txt"
    path.write_bytes(b"plain ascii, then caf\xe9 and more text" * 3)
    with pytest.raises(CorpusError, match=r"latin\.txt: byte 21: cannot decode as utf-8 \(invalid continuation"):
        documents(path, encoding_errors="strict")
    lines = jsonl(tmp_path / "rows.jsonl", ['{"text": "one"}', '{"text": "caf\u00e9"}'])
    lines.write_bytes(lines.read_bytes().replace("é".encode(), b"\xe9"))  # a Latin-1 é on line 2
    with pytest.raises(CorpusError, match=r"rows\.jsonl: byte 29: cannot decode as utf-8"):
        documents(lines, encoding_errors="strict")  # the offset is in the file, not in the line
    # The same file in its real encoding decodes cleanly, even strictly.
    assert documents(path, encoding="latin-1", encoding_errors="strict")[0].startswith("plain ascii, then café")


def test_ignore_drops_the_bytes_without_a_warning(tmp_path):
    path = tmp_path / "stray.txt"
    path.write_bytes(prose(2000).encode() + b"\x80 end")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        (text,) = documents(path, encoding_errors="ignore")
    assert text.endswith(" end") and "\ufffd" not in text and not corpus_warnings(record)


@pytest.mark.parametrize("policy", ["replace", "ignore", "strict"])
def test_binary_garbage_is_refused_whatever_the_policy(tmp_path, policy):
    path = tmp_path / "garbage.txt"
    path.write_bytes(os.urandom(64 * 1024))
    expected = r"byte \d+: cannot decode" if policy == "strict" else (
        r"first at byte \d+: \d+ of 65536 bytes \(\d+\.\d\d%\) do not decode as utf-8, more than the 1%"
    )
    with pytest.raises(CorpusError, match=r"garbage\.txt: " + expected):
        documents(path, encoding_errors=policy)


def test_more_than_one_percent_undecodable_is_refused(tmp_path):
    assert MAX_UNDECODABLE_FRACTION == 0.01
    text = prose(2000).encode()[:10_000]
    ok, refused = tmp_path / "ok.txt", tmp_path / "refused.txt"
    ok.write_bytes(b"\xff" * 100 + text[100:])  # exactly 1%: replaced and warned
    refused.write_bytes(b"\xff" * 101 + text[101:])
    with pytest.warns(CorpusWarning, match="replaced 100 undecodable"):
        documents(ok)
    with pytest.raises(CorpusError, match=r"refused\.txt: first at byte 0: 101 of 10000 bytes \(1\.01%\)"):
        documents(refused)


def test_nul_byte_is_refused(tmp_path):
    text = prose(500)
    path = tmp_path / "nul.txt"
    path.write_text(text[:100] + "\x00" + text[100:], encoding="utf-8")
    with pytest.raises(CorpusError, match=r"nul\.txt: first at character 100: 1 NUL characters \(0\.\d\d% of"):
        documents(path)
    records = jsonl(tmp_path / "nul.jsonl", [json.dumps({"text": text}), '{"text": "a\x00b"}'])
    with pytest.raises(CorpusError, match=r"nul\.jsonl: first at character \d+: 1 NUL characters"):
        documents(records)  # binary data, not the malformed line it also is
    with pytest.raises(CorpusError, match=r"nul\.jsonl: .*NUL characters"):
        documents(records, skip_bad_records=True)


def test_bom_is_stripped(tmp_path, tokenizer):
    text = prose(300)
    txt = tmp_path / "bom.txt"
    txt.write_bytes(b"\xef\xbb\xbf" + text.encode())
    (document,) = documents(txt)
    assert document == text
    dm = TextDataModule(files=[str(txt)], seq_len=SEQ_LEN, val_fraction=0.2)
    dm.set_tokenizer(tokenizer)
    dm.setup("fit")
    first_ids = tokenizer(text[:40], add_special_tokens=False)["input_ids"]
    assert dm.train_blocks[0, :5].tolist() == first_ids[:5]  # starts with the text, not the BOM's bytes
    records = tmp_path / "bom.json"
    records.write_bytes(b"\xef\xbb\xbf" + json.dumps([{"text": "a"}, {"text": "b"}]).encode())
    assert documents(records) == ["a", "b"]  # json.loads would refuse a BOM
    lines = tmp_path / "bom.jsonl"
    lines.write_bytes(b"\xef\xbb\xbf" + b'{"text": "a"}\n{"text": "b"}\n')
    assert documents(lines) == ["a", "b"]


def test_utf16_jsonl_is_read_whole(tmp_path):
    path = tmp_path / "wide.jsonl"
    path.write_text('{"text": "é one"}\r\n{"text": "two"}\n', encoding="utf-16")
    assert documents(path, encoding="utf-16") == ["é one", "two"]


def test_reading_stopped_by_max_chars_still_reports(tmp_path):
    path = jsonl(tmp_path / "long.jsonl", [json.dumps({"text": prose(50, seed)}) for seed in range(200)])
    path.write_bytes(path.read_bytes().replace(b"alpha", b"alph\xe1", 1))
    with pytest.warns(CorpusWarning, match=r"long\.jsonl: replaced 1 undecodable byte\(s\) of \d+ "):
        assert len(documents(path, max_chars=100)) == 1


@pytest.mark.parametrize("encoding", ["no-such-codec", "base64"])
def test_bad_encoding_name_fails_in_init(encoding):
    with pytest.raises(ValueError, match=rf"data\.encoding='{encoding}' is not a text encoding"):
        TextDataModule(files=["never-read.txt"], encoding=encoding)
    with pytest.raises(ValueError, match=r"data\.encoding_errors must be one of replace, strict, ignore"):
        TextDataModule(files=["never-read.txt"], encoding_errors="surrogateescape")


# ---------------------------------------------------------------- records


def test_malformed_jsonl_line_names_the_line(tmp_path):
    path = jsonl(tmp_path / "rows.jsonl", ['{"text": "one"}', "", '{"text": "three"', '{"text": "four"}'])
    with pytest.raises(CorpusError, match=r"rows\.jsonl: line 3: malformed JSON at column 17: Expecting ',' "):
        documents(path)


def test_malformed_json_names_line_and_column(tmp_path):
    path = tmp_path / "list.json"
    path.write_text('[\n  {"text": "a"},\n  {"text": "b",}\n]\n', encoding="utf-8")
    with pytest.raises(CorpusError, match=r"list\.json: line 3 column 16: malformed JSON: Expecting property name"):
        documents(path)
    path.write_text('{"a": [], "b": []}', encoding="utf-8")
    with pytest.raises(CorpusError, match=r"list\.json: top level: .*got dict with keys \['a', 'b'\]"):
        documents(path)


@pytest.mark.parametrize(
    ("record", "problem"),
    [
        ('["not", "an", "object"]', "must be an object with a 'text' key, got list"),
        ('{"body": "x"}', r"no key text_field='text'; its keys are \['body'\]"),
        ('{"text": null}', "'text' is null"),
        ('{"text": 7}', "'text' must be a string, got int"),
    ],
)
def test_bad_record_names_file_and_place(tmp_path, record, problem):
    lines = jsonl(tmp_path / "rows.jsonl", ['{"text": "fine"}', record])
    with pytest.raises(CorpusError, match=rf"rows\.jsonl: line 2: {problem}"):
        documents(lines)
    array = tmp_path / "rows.json"
    array.write_text(f'[{{"text": "fine"}}, {record}]', encoding="utf-8")
    with pytest.raises(CorpusError, match=rf"rows\.json: record 1: {problem}"):
        documents(array)


def test_skip_bad_records_skips_and_reports_the_count(tmp_path):
    path = jsonl(tmp_path / "mixed.jsonl", [
        '{"text": "one"}', '{"text": "two"', '{"text": null}', '{"text": 3}', '{"body": "x"}', "[1]",
        '{"text": "seven"}',
    ])
    with pytest.warns(CorpusWarning) as record:
        assert documents(path, skip_bad_records=True) == ["one", "seven"]
    (message,) = corpus_warnings(record)
    assert re.fullmatch(r"skipped 5 bad records in .*mixed\.jsonl: first at line 2: malformed JSON at column 15: .*",
                        message), message
    parquet = tmp_path / "nulls.parquet"
    datasets.Dataset.from_dict({"text": ["a", None, "b", None]}).to_parquet(str(parquet))
    with pytest.warns(CorpusWarning, match=r"skipped 2 bad records in .*nulls\.parquet: first at row 1: 'text' is null"):
        assert documents(parquet, skip_bad_records=True) == ["a", "b"]


def test_every_record_bad_ends_in_the_no_text_error(tmp_path, tokenizer):
    path = jsonl(tmp_path / "all_bad.jsonl", ['{"text": null}', "{oops", '{"text": 1}'])
    dm = TextDataModule(files=[str(path)], seq_len=SEQ_LEN, skip_bad_records=True)
    with pytest.warns(CorpusWarning, match="skipped 3 bad records"):
        with pytest.raises(ValueError, match=r"cannot train a tokenizer: the corpus from files .*all_bad\.jsonl.* has no text"):
            dm.train_tokenizer(300, str(tmp_path / "tok"))
    dm = TextDataModule(files=[str(path)], seq_len=SEQ_LEN, skip_bad_records=True)
    dm.set_tokenizer(tokenizer)
    with pytest.warns(CorpusWarning), pytest.raises(ValueError, match=r"has 0 tokens in 0 document\(s\)"):
        dm.setup("fit")


def test_parquet_null_text_names_the_row(tmp_path):
    path = tmp_path / "rows.parquet"
    datasets.Dataset.from_dict({"text": ["a", "b", None, "d"]}).to_parquet(str(path))
    with pytest.raises(CorpusError, match=r"rows\.parquet: row 2: 'text' is null"):
        documents(path)
    ints = tmp_path / "ints.parquet"
    datasets.Dataset.from_dict({"text": [1, 2]}).to_parquet(str(ints))
    with pytest.raises(CorpusError, match=r"ints\.parquet: row 0: 'text' must be a string, got int"):
        documents(ints)


def test_corrupt_parquet_names_the_file(tmp_path):
    good = tmp_path / "good.parquet"
    datasets.Dataset.from_dict({"text": [prose(50, seed) for seed in range(50)]}).to_parquet(str(good))
    truncated = tmp_path / "truncated.parquet"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CorpusError, match=r"truncated\.parquet: file metadata: not a readable parquet file \(\w+: .+\)"):
        documents(truncated)
    not_parquet = tmp_path / "text.parquet"
    not_parquet.write_text("just some text\n")
    with pytest.raises(CorpusError, match=r"text\.parquet: file metadata: not a readable parquet file"):
        documents(not_parquet)


def test_hub_dataset_null_text_names_dataset_and_row(tmp_path):
    data_dir = tmp_path / "hub_like"
    data_dir.mkdir()
    jsonl(data_dir / "train.jsonl", ['{"text": "a"}', '{"text": null}', '{"text": "c"}'])
    with pytest.raises(CorpusError, match=r"hub dataset '.*hub_like' \(config=None, split='train'\): row 1: 'text' is null"):
        TextDataModule(hub_dataset=str(data_dir)).load_documents()
    with pytest.warns(CorpusWarning, match=r"skipped 1 bad records in hub dataset .*: first at row 1"):
        assert TextDataModule(hub_dataset=str(data_dir), skip_bad_records=True).load_documents() == ["a", "c"]


# ---------------------------------------------------------------- end to end

ONE_STAGE = [{"name": "s", "expert_width": 16, "calibration_tokens": 128, "max_tokens": 256}]


@pytest.mark.slow
def test_run_with_stray_bytes_reports_them_and_finishes(tmp_path, phimoe_teacher, corpus_file):
    raw = Path(corpus_file).read_bytes()
    third = len(raw) // 3
    corpus = tmp_path / "stray.txt"
    corpus.write_bytes(raw[:third] + b"\xa9" + raw[third : 2 * third] + b"\xff\xfe" + raw[2 * third :] + b"\x80")
    recipe = tiny_recipe(tmp_path, phimoe_teacher, str(corpus), stages=ONE_STAGE)
    with pytest.warns(CorpusWarning, match=r"stray\.txt: replaced 4 undecodable byte\(s\)"):
        summary = main(["--config", recipe])
    assert (tmp_path / "run" / "summary.json").exists() and len(summary["stages"]) == 1


@pytest.mark.slow
def test_run_on_malformed_jsonl_fails_before_writing(tmp_path, phimoe_teacher, corpus_file, no_weights):
    text = Path(corpus_file).read_text()
    lines = [json.dumps({"text": text[:60_000]}), json.dumps({"text": text[60_000:]}), '{"text": "cut off']
    corpus = jsonl(tmp_path / "corpus.jsonl", lines)
    recipe = tiny_recipe(tmp_path, phimoe_teacher, str(corpus), stages=ONE_STAGE)
    with pytest.raises(CorpusError, match=r"corpus\.jsonl: line 3: malformed JSON"):
        main(["--config", recipe])
    run = tmp_path / "run"
    assert not run.exists() or not any(run.iterdir()), sorted(run.rglob("*"))
    assert not no_weights
