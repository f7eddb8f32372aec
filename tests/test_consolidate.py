"""``python -m lightning_slimmoe export``: a sharded (DCP) stage checkpoint -> stock HF dir, in one process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers import make_teacher_dir, random_batch, tiny_recipe

ROOT = Path(__file__).resolve().parents[1]
MODEL_PARALLEL = '{"class_path": "lightning.pytorch.strategies.ModelParallelStrategy"}'


def run_module(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lightning_slimmoe", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.distributed
def test_sharded_checkpoint_consolidates_to_the_stage_export(tmp_path, corpus_file):
    teacher = make_teacher_dir(tmp_path / "teacher", "qwen3_moe", corpus_file)
    recipe = tiny_recipe(tmp_path, teacher, corpus_file)
    run = tmp_path / "run"
    result = subprocess.run([sys.executable, "train.py", "--config", recipe, "--output_dir", str(run),
                             "--data.init_args.batch_size", "2", "--trainer.devices", "2",
                             "--trainer.strategy", MODEL_PARALLEL], cwd=ROOT, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    stage = run / "stage_1_slim2"
    assert (stage / "config.json").is_file()  # written when the stage started
    ckpt = stage / "checkpoints" / "last.ckpt"
    assert ckpt.is_dir()

    out = tmp_path / "consolidated"
    done = run_module("export", "--checkpoint", str(ckpt), "--out", str(out))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    assert not (tmp_path / "consolidated.tmp").exists()
    assert (out / "tokenizer.json").is_file() or (out / "tokenizer_config.json").is_file()

    # The last checkpoint is the end of the stage: the run's own (collective) export holds the same weights.
    got = AutoModelForCausalLM.from_pretrained(out).eval()
    want = AutoModelForCausalLM.from_pretrained(stage / "hf").eval()
    assert got.config.intermediate_size == want.config.intermediate_size or \
        got.config.moe_intermediate_size == want.config.moe_intermediate_size
    ids = random_batch(seq_len=16)["input_ids"] % want.config.vocab_size
    with torch.no_grad():
        torch.testing.assert_close(got(input_ids=ids).logits, want(input_ids=ids).logits, rtol=0, atol=1e-6)
    for name, tensor in want.state_dict().items():
        assert torch.equal(got.state_dict()[name], tensor), name

    # An earlier stage's checkpoint with a later stage's config: named mismatch, nothing written.
    bad = run_module("export", "--checkpoint", str(run / "stage_0_slim1" / "checkpoints" / "last.ckpt"),
                     "--out", str(tmp_path / "bad"), "--config", str(stage / "config.json"))
    assert bad.returncode == 2 and "does not match the config" in bad.stderr and "shapes differ" in bad.stderr
    assert not (tmp_path / "bad").exists() and not (tmp_path / "bad.tmp").exists()


def test_errors_name_the_problem(tmp_path):
    from lightning_slimmoe.consolidate import ConsolidateError, consolidate_checkpoint

    with pytest.raises(ConsolidateError, match="no such file"):
        consolidate_checkpoint(tmp_path / "nope", tmp_path / "out")
    single = tmp_path / "last.ckpt"
    single.write_bytes(b"x")
    with pytest.raises(ConsolidateError, match="single-file checkpoint"):
        consolidate_checkpoint(single, tmp_path / "out")
    partial = tmp_path / "run" / "stage_0_a" / "checkpoints" / "step0000002.ckpt"
    partial.mkdir(parents=True)
    (partial / "__0_0.distcp").write_bytes(b"")
    with pytest.raises(ConsolidateError, match=r"not a complete sharded checkpoint \(missing \.metadata, meta\.pt"):
        consolidate_checkpoint(partial, tmp_path / "out")
    (partial / ".metadata").write_bytes(b"")
    (partial / "meta.pt").write_bytes(b"")
    with pytest.raises(ConsolidateError, match="student config .* not found"):
        consolidate_checkpoint(partial, tmp_path / "out", with_tokenizer=False)
    assert not (tmp_path / "out").exists()
    # The command line says the same, exit status 2, no traceback.
    done = run_module("export", "--checkpoint", str(partial), "--out", str(tmp_path / "out"), "--no-tokenizer")
    assert done.returncode == 2 and "student config" in done.stderr and "Traceback" not in done.stderr
