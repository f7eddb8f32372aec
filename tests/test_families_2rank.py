"""The 2026 families under FSDP2 (ModelParallelStrategy), gloo, 2 CPU processes give what one process gives: GLM-4.5
and Qwen3-Next (shared experts, GQA groups pruned; Qwen3-Next's only on its full-attention layer) and DeepSeek-V3
(MLA: expert width only, group-limited routing with a score-correction bias)."""

from __future__ import annotations

import json

import pytest

from helpers import MODEL_PARALLEL, make_teacher_dir, scalars, tiny_recipe, train


def _stages(family: str) -> list[dict]:
    """tests/test_distributed.py's two tiny stages: 32 -> 16 -> 8 expert width; half the KV groups in the second
    stage where the family has GQA groups; Qwen3-Next's own-width shared expert slimmed with the routed ones."""
    shared = {"shared_expert_width": 16} if family == "qwen3_next" else {}
    first = {"name": "slim1", "expert_width": 16, **shared, "criterion": "kd_taylor", "calibration_tokens": 256,
             "max_tokens": 6 * 4 * 32, "optimizer": {"lr": 1e-3}, "kd": {"top_k": 8}}
    second = {"name": "slim2", "expert_width": 8, **({"shared_expert_width": 8} if shared else {}),
              "criterion": "kd_taylor", "calibration_tokens": 256, "max_tokens": 4 * 4 * 32,
              "optimizer": {"lr": 1e-3}}
    if family != "deepseek_v3":  # MLA has no KV groups to remove
        second["attention_groups"] = 1
    return [first, second]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("family", ["glm4_moe", "qwen3_next", "deepseek_v3"])
def test_two_gloo_ranks_match_one_process(tmp_path, corpus_file, family):
    teacher = make_teacher_dir(tmp_path / "teacher", family, corpus_file)
    recipe = tiny_recipe(tmp_path, teacher, corpus_file, stages=_stages(family))
    train(recipe, tmp_path / "one", "--data.init_args.batch_size", "4")
    train(recipe, tmp_path / "two", "--data.init_args.batch_size", "2", "--trainer.devices", "2",
          "--trainer.strategy", MODEL_PARALLEL)
    for stage in ("stage_0_slim1", "stage_1_slim2"):
        one = json.loads((tmp_path / "one" / stage / "meta.json").read_text())
        two = json.loads((tmp_path / "two" / stage / "meta.json").read_text())
        assert one["kept_index_hash"] == two["kept_index_hash"], stage
        assert one["widths"] == two["widths"], stage
    loss_one, loss_two = scalars(tmp_path / "one" / "tb", "train/loss"), scalars(tmp_path / "two" / "tb", "train/loss")
    assert loss_one.keys() == loss_two.keys() and len(loss_one) >= 8
    for step in loss_one:
        assert abs(loss_one[step] - loss_two[step]) <= 1e-5, (family, step, loss_one[step], loss_two[step])
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert [s["expert_width"] for s in summary["stages"]] == [16, 8]
    if family != "deepseek_v3":
        assert summary["stages"][-1]["num_key_value_heads"] == 1
