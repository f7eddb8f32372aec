"""``python -m lightning_slimmoe export``: a stage checkpoint (sharded DCP dir or single file) -> stock HF dir, in one
process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback
from transformers import AutoConfig, AutoModelForCausalLM

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
    with pytest.raises(ConsolidateError, match="not a readable checkpoint file"):
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


class _Stopped(Exception):
    pass


class _StopInStage2(Callback):
    """Ends the run after step 3 of stage 2 (width 8), as a kill would: the stage has checkpoints, no hf/."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if pl_module.student.config.intermediate_size == 8 and trainer.global_step == 3:
            raise _Stopped()


def test_single_file_checkpoint_of_an_unfinished_stage_exports(tmp_path, phimoe_teacher, corpus_file, monkeypatch):
    """A single-process stage stopped mid-way: its last.ckpt (one file) exports to a stock HF dir with the run's
    tokenizer, whose from_pretrained logits equal those of the model built from the checkpoint by hand. Damaged or
    foreign files, and a checkpoint of another shape than the config, are one clear error and write nothing."""
    import lightning_slimmoe.cli as cli
    from lightning_slimmoe.consolidate import ConsolidateError, consolidate_checkpoint

    original = cli.SlimMoECLI.make_trainer
    monkeypatch.setattr(cli.SlimMoECLI, "make_trainer", lambda self, extra_callbacks=(), **kw: original(
        self, extra_callbacks=[*extra_callbacks, _StopInStage2()], **kw))
    recipe = tiny_recipe(tmp_path, phimoe_teacher, corpus_file)
    with pytest.raises(_Stopped):
        cli.main(["--config", recipe])
    stage = tmp_path / "run" / "stage_1_slim2"
    ckpt = stage / "checkpoints" / "last.ckpt"
    assert ckpt.is_file() and not (stage / "hf").exists()

    out = tmp_path / "slim2-hf"
    assert cli.export(["--checkpoint", str(ckpt), "--out", str(out)]) == out
    assert not (tmp_path / "slim2-hf.tmp").exists()
    assert (out / "tokenizer.json").is_file() or (out / "tokenizer_config.json").is_file()

    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert 0 < checkpoint["global_step"] < 4  # mid-stage (stage 2 has 4 steps)
    want = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(stage / "config.json"))
    want.load_state_dict({k[len("student."):]: v for k, v in checkpoint["state_dict"].items()}, strict=True)
    got = AutoModelForCausalLM.from_pretrained(out)
    assert got.config.intermediate_size == 8 and type(got) is type(want)
    want.eval(), got.eval()
    ids = random_batch(seq_len=16)["input_ids"] % want.config.vocab_size
    with torch.no_grad():
        assert torch.equal(got(input_ids=ids).logits, want(input_ids=ids).logits)
    for name, tensor in want.state_dict().items():
        assert torch.equal(got.state_dict()[name], tensor), name

    # stage 1's checkpoint with stage 2's config: the mismatch is named, nothing is written
    with pytest.raises(ConsolidateError, match="does not match the config.*shapes differ"):
        consolidate_checkpoint(tmp_path / "run/stage_0_slim1/checkpoints/last.ckpt", tmp_path / "bad",
                               config_path=str(stage / "config.json"))
    # a truncated copy, a file that is no checkpoint of ours, one with code in it: each named, nothing written
    damaged = stage / "checkpoints" / "step0000009.ckpt"
    damaged.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    with pytest.raises(ConsolidateError, match="not a readable checkpoint file"):
        consolidate_checkpoint(damaged, tmp_path / "bad")
    torch.save({"state_dict": {"model.w": torch.zeros(2)}}, damaged)
    with pytest.raises(ConsolidateError, match=r"holds no student\.\* tensors"):
        consolidate_checkpoint(damaged, tmp_path / "bad")
    torch.save({"state_dict": {"student.w": torch.zeros(2)}, "extra": _Stopped()}, damaged)
    with pytest.raises(ConsolidateError, match="not a readable checkpoint file.*UnpicklingError"):
        consolidate_checkpoint(damaged, tmp_path / "bad")
    assert not (tmp_path / "bad").exists() and not (tmp_path / "bad.tmp").exists()
    done = run_module("export", "--checkpoint", str(damaged), "--out", str(tmp_path / "bad"))
    assert done.returncode == 2 and done.stderr.startswith("error: --checkpoint") and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
