"""FSDP2 (ModelParallelStrategy) and FSDP1 (FSDPStrategy), gloo, with 2 CPU processes give what a single process gives."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers import FSDP1, MODEL_PARALLEL, make_teacher_dir, random_batch, scalars, tiny_recipe, train_torchrun_many

# A tiny grad_clip so that clipping acts on every step: the global gradient norm over every FSDP unit
# (both FSDP flavours compute it over shards) must equal the single process's. Validation and the checkpoint come once,
# at each stage's end (the default, 4 per stage, is every step of a 6-step stage): the last checkpoint is what is
# checked, and the per-step losses are logged either way.
CLIPPED_STAGES = [
    {"name": "slim1", "expert_width": 16, "criterion": "kd_taylor", "calibration_tokens": 256,
     "max_tokens": 6 * 4 * 32, "val_every_n_steps": 6, "checkpoint_every_n_steps": 6,
     "optimizer": {"lr": 1e-3, "grad_clip": 0.05}, "kd": {"top_k": 8}},
    {"name": "slim2", "expert_width": 8, "attention_groups": 1, "criterion": "kd_taylor",
     "calibration_tokens": 256, "max_tokens": 4 * 4 * 32, "val_every_n_steps": 4, "checkpoint_every_n_steps": 4,
     "optimizer": {"lr": 1e-3, "grad_clip": 0.05}},
]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, corpus_file):
    """The single-process run both distributed variants are compared with: made in the test's own process (the run
    takes seconds, a fresh interpreter's imports about ten)."""
    from lightning_slimmoe.cli import main

    work = tmp_path_factory.mktemp("one_process")
    teacher = make_teacher_dir(work / "teacher", "qwen3_moe", corpus_file)
    recipe = tiny_recipe(work, teacher, corpus_file, stages=CLIPPED_STAGES)
    main(["--config", recipe, "--output_dir", str(work / "one"), "--data.init_args.batch_size", "4"])
    return recipe, work / "one"


STRATEGIES = {"fsdp2": MODEL_PARALLEL, "fsdp1": FSDP1}


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory, one_process) -> dict:
    """The same recipe over 2 gloo ranks with each strategy, one run after the other in one torchrun launch: torchrun
    starts both ranks side by side (Lightning's own launcher, which the reliability tests' 2-rank runs use, starts
    rank 1 only after rank 0 has set up: twice the start-up), and they import once for both runs."""
    recipe, _ = one_process
    work = tmp_path_factory.mktemp("two_processes")
    train_torchrun_many([["--config", recipe, "--output_dir", str(work / name), "--data.init_args.batch_size", "2",
                          "--trainer.strategy", strategy] for name, strategy in STRATEGIES.items()], 2)
    return {name: work / name for name in STRATEGIES}


@pytest.mark.distributed
@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_two_gloo_ranks_match_one_process(one_process, two_processes, strategy):
    _, one_dir = one_process
    two_dir = two_processes[strategy]
    for stage in ("stage_0_slim1", "stage_1_slim2"):
        one = json.loads((one_dir / stage / "meta.json").read_text())
        two = json.loads((two_dir / stage / "meta.json").read_text())
        assert one["kept_index_hash"] == two["kept_index_hash"], stage
        assert one["widths"] == two["widths"]
    loss_one, loss_two = scalars(one_dir / "tb", "train/loss"), scalars(two_dir / "tb", "train/loss")
    assert loss_one.keys() == loss_two.keys() and len(loss_one) >= 8
    for step in loss_one:
        assert abs(loss_one[step] - loss_two[step]) <= 1e-5, (step, loss_one[step], loss_two[step])
    a = AutoModelForCausalLM.from_pretrained(one_dir / "final").eval()
    b = AutoModelForCausalLM.from_pretrained(two_dir / "final").eval()
    ids = random_batch(seq_len=16)["input_ids"] % a.config.vocab_size
    with torch.no_grad():
        torch.testing.assert_close(a(input_ids=ids).logits, b(input_ids=ids).logits, rtol=0, atol=1e-5)
    summary_one = json.loads((one_dir / "summary.json").read_text())
    summary_two = json.loads((two_dir / "summary.json").read_text())
    for x, y in zip(summary_one["stages"], summary_two["stages"]):  # parameter counts of the sharded students
        assert (x["total_params"], x["active_params"]) == (y["total_params"], y["active_params"])
    # The checkpoint holds the student only: FSDP2 writes it sharded, FSDP1 as one full file from rank 0.
    ckpt = two_dir / "stage_1_slim2" / "checkpoints" / "last.ckpt"
    if strategy == "fsdp2":
        assert ckpt.is_dir() and (ckpt / "meta.pt").is_file()
        from torch.distributed.checkpoint import FileSystemReader
        keys = FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata.keys()
        model_keys = [k for k in keys if k.startswith("state_dict.")]
        assert model_keys and all(k.startswith("state_dict.student.") for k in model_keys)
    else:
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        assert sorted(state["state_dict"]) == sorted("student." + k for k in b.state_dict())
        assert state["optimizer_states"][0]["state"]  # the full optimizer state, gathered on rank 0
