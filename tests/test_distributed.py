"""FSDP2 (ModelParallelStrategy, gloo) with 2 CPU processes gives what a single process gives."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import make_teacher_dir, random_batch, tiny_recipe

ROOT = Path(__file__).resolve().parents[1]
MODEL_PARALLEL = '{"class_path": "lightning.pytorch.strategies.ModelParallelStrategy"}'


def scalars(tb_dir: Path, tag: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values = {}
    for events in sorted(tb_dir.glob("events.out.tfevents*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            values.update({e.step: e.value for e in acc.Scalars(tag)})
    return values


def train(recipe: str, out: Path, *extra: str) -> None:
    result = subprocess.run([sys.executable, "train.py", "--config", recipe, "--output_dir", str(out), *extra],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]


@pytest.mark.distributed
def test_two_gloo_ranks_match_one_process(tmp_path, corpus_file):
    teacher = make_teacher_dir(tmp_path / "teacher", "qwen3_moe", corpus_file)
    recipe = tiny_recipe(tmp_path, teacher, corpus_file)
    train(recipe, tmp_path / "one", "--data.init_args.batch_size", "4")
    train(recipe, tmp_path / "two", "--data.init_args.batch_size", "2", "--trainer.devices", "2",
          "--trainer.strategy", MODEL_PARALLEL)
    for stage in ("stage_0_slim1", "stage_1_slim2"):
        one = json.loads((tmp_path / "one" / stage / "meta.json").read_text())
        two = json.loads((tmp_path / "two" / stage / "meta.json").read_text())
        assert one["kept_index_hash"] == two["kept_index_hash"], stage
        assert one["widths"] == two["widths"]
    loss_one, loss_two = scalars(tmp_path / "one" / "tb", "train/loss"), scalars(tmp_path / "two" / "tb", "train/loss")
    assert loss_one.keys() == loss_two.keys() and len(loss_one) >= 8
    for step in loss_one:
        assert abs(loss_one[step] - loss_two[step]) <= 1e-5, (step, loss_one[step], loss_two[step])
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "one" / "final").eval()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "two" / "final").eval()
    ids = random_batch(seq_len=16)["input_ids"] % a.config.vocab_size
    with torch.no_grad():
        torch.testing.assert_close(a(input_ids=ids).logits, b(input_ids=ids).logits, rtol=0, atol=1e-5)
    # The sharded checkpoint holds the student only.
    ckpt = tmp_path / "two" / "stage_1_slim2" / "checkpoints" / "last.ckpt"
    assert ckpt.is_dir() and (ckpt / "meta.pt").is_file()
    from torch.distributed.checkpoint import FileSystemReader
    keys = FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata.keys()
    model_keys = [k for k in keys if k.startswith("state_dict.")]
    assert model_keys and all(k.startswith("state_dict.student.") for k in model_keys)
