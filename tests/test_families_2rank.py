"""The 2026 families under FSDP2 (ModelParallelStrategy), gloo, 2 CPU processes give what one process gives: the same
per-step losses and kept indices over a two-stage run. GLM-4.5, ERNIE-4.5, Qwen3-Next and Qwen3.5-MoE prune GQA
groups in the second stage (Qwen3-Next's / Qwen3.5's only on the full-attention layer, their own-width shared expert
slimmed with the routed ones); DeepSeek-V2 / V3 and GLM-4.7-Flash (MLA) and MiniMax-M2 (q/k norms over all heads)
slim expert widths only. gpt-oss prunes groups with their attention sinks (its transposed, interleaved, biased
experts sliced at read time), Llama-4 its shared expert with the routed width, Granite-4.0-H its fused shared MLP
beside the MoE block, on a stack with a Mamba-2 layer. Qwen3.5-MoE's and Llama-4's teachers are in their multimodal hub layouts (``model.language_model.*``, a
vision tower, an ``mtp.*`` layer; ``language_model.model.*`` / ``language_model.lm_head``, a vision tower), which
each rank reads as published.

Each run is as small as still tests that: two optimizer steps per stage, one calibration batch, one validation (and
checkpoint) at the end of each stage, one validation batch. Most of a run's time is process start-up and imports: the
one-process runs are made in the test's own process, and the two ranks are started once, side by side, by torchrun
for every family's run in turn (tests/train_runs_worker.py; a launch path docs/scaling.md documents; Lightning's own
launcher, which starts rank 1 only after rank 0 has set up, is covered by the 2-rank runs of
tests/test_reliability.py)."""

from __future__ import annotations

import json

import pytest

from helpers import MODEL_PARALLEL, make_hub_teacher_dir, make_teacher_dir, scalars, tiny_recipe, train_torchrun_many
from lightning_slimmoe.cli import main

OWN_WIDTH_SHARED = ("qwen3_next", "qwen3_5_moe", "granitemoehybrid")  # shared expert with its own width field: slimmed explicitly
HUB_LAYOUT = ("qwen3_5_moe", "llama4")  # teachers in their multimodal hub layout, read by each rank as published
NO_GROUPS = ("deepseek_v2", "deepseek_v3", "glm4_moe_lite", "minimax_m2")  # MLA / all-head q/k norms
STEPS = 2  # optimizer steps per stage
BATCH, SEQ = 4, 32  # samples per step (one process; 2 per rank with 2 ranks) and tokens per sample


def _stages(family: str) -> list[dict]:
    """Two tiny stages: 32 -> 16 -> 8 expert width; one of the two KV groups in the second stage where the family has
    GQA groups to remove. Validation and checkpointing once per stage, at its end."""
    once = {"max_tokens": STEPS * BATCH * SEQ, "val_every_n_steps": STEPS, "checkpoint_every_n_steps": STEPS,
            "criterion": "kd_taylor", "calibration_tokens": BATCH * SEQ, "optimizer": {"lr": 1e-3}}
    stages = [{"name": "slim1", "expert_width": 16, **once, "kd": {"top_k": 8}},
              {"name": "slim2", "expert_width": 8, **once}]
    if family in OWN_WIDTH_SHARED:
        stages[0]["shared_expert_width"], stages[1]["shared_expert_width"] = 16, 8
    if family not in NO_GROUPS:
        stages[1]["attention_groups"] = 1
    return stages


FAMILIES = ["glm4_moe", "qwen3_next", "deepseek_v3", "deepseek_v2", "ernie4_5_moe", "minimax_m2", "qwen3_5_moe",
            "glm4_moe_lite", "gpt_oss", "llama4", "granitemoe", "granitemoehybrid"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, corpus_file) -> dict:
    """Every family's one-process run (here, ~1 s each) and its 2-rank run (one torchrun launch for all of them):
    family -> the directory holding ``one/`` and ``two/``."""
    one_val_batch = ("--trainer.limit_val_batches", "1")
    dirs, two_rank_runs = {}, []
    for family in FAMILIES:
        root = tmp_path_factory.mktemp(family)
        teacher = (make_hub_teacher_dir(root / "teacher", corpus_file, family=family) if family in HUB_LAYOUT
                   else make_teacher_dir(root / "teacher", family, corpus_file))
        recipe = tiny_recipe(root, teacher, corpus_file, stages=_stages(family))
        main(["--config", recipe, "--output_dir", str(root / "one"), "--data.init_args.batch_size", str(BATCH),
              *one_val_batch])
        two_rank_runs.append(["--config", recipe, "--output_dir", str(root / "two"), "--data.init_args.batch_size",
                              str(BATCH // 2), "--trainer.strategy", MODEL_PARALLEL, *one_val_batch])
        dirs[family] = root
    train_torchrun_many(two_rank_runs, 2)
    return dirs


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("family", FAMILIES)
def test_two_gloo_ranks_match_one_process(runs, family):
    tmp_path = runs[family]
    for stage in ("stage_0_slim1", "stage_1_slim2"):
        one = json.loads((tmp_path / "one" / stage / "meta.json").read_text())
        two = json.loads((tmp_path / "two" / stage / "meta.json").read_text())
        assert one["kept_index_hash"] == two["kept_index_hash"], stage
        assert one["widths"] == two["widths"], stage
    loss_one, loss_two = scalars(tmp_path / "one" / "tb", "train/loss"), scalars(tmp_path / "two" / "tb", "train/loss")
    assert loss_one.keys() == loss_two.keys() and len(loss_one) == 2 * STEPS
    for step in loss_one:
        assert abs(loss_one[step] - loss_two[step]) <= 1e-5, (family, step, loss_one[step], loss_two[step])
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert [s["expert_width"] for s in summary["stages"]] == [16, 8]
    if family in OWN_WIDTH_SHARED:
        assert [s["shared_expert_width"] for s in summary["stages"]] == [16, 8]
    if family not in NO_GROUPS:
        assert summary["stages"][-1]["num_key_value_heads"] == 1
    if family == "qwen3_5_moe":  # the hub teacher's MTP layer is recorded as dropped, the export is text-only
        assert summary["mtp"] == "dropped" and summary["stages"][-1]["model_type"] == "qwen3_5_moe_text"
