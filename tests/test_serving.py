"""Whether the result can be served (vLLM / SGLang fused-MoE rules, docs/families-2026.md "Serving constraints"):
``check_serving`` rule by rule on tiny configs, ``plan --serve-tp/--serve-dtype/--strict`` on the shipped Phi-tiny
recipe, and a training run whose final stage does not serve: a warning before any weight, or with
``serving.strict`` a ``ConfigError`` that writes nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest

from helpers import tiny_config, tiny_recipe
from lightning_slimmoe.config import ConfigError, RunConfig, ServingConfig
from lightning_slimmoe.serving import check_serving, format_serving, nearest_widths

ROOT = Path(__file__).resolve().parents[1]


def run_plan(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "lightning_slimmoe", "plan", "--config", "conf/phi_tiny.yaml", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)


def _json(out: subprocess.CompletedProcess) -> dict:
    return json.loads(out.stdout[out.stdout.index("{"):])


# ---------------------------------------------------------------------------------------------------
# check_serving, one rule at a time
# ---------------------------------------------------------------------------------------------------
def test_a_shape_that_serves_has_no_problems():
    check = check_serving(tiny_config("phimoe"), tp=4, dtype="bf16")  # width 24, heads 4/2
    assert check.ok and check.problems == [] and check.nearest == {}
    assert check.label == "serves@tp4/bf16" and format_serving("s", check) == []
    assert check.to_json() == {"ok": True, "problems": [], "nearest": {}}


def test_bf16_width_per_rank_must_be_an_integer():
    config = tiny_config("mixtral", intermediate_size=20, num_attention_heads=8, num_key_value_heads=2, head_dim=4)
    check = check_serving(config, tp=8, dtype="bf16", reference=tiny_config("mixtral", intermediate_size=32))
    assert not check.ok and len(check.problems) == 1 and "expert_width=20" in check.problems[0]
    # multiples of lcm(tp, 8): what serves and what the slicer can make
    assert check.nearest["expert_width"] == {"width": 20, "multiple": 8, "below": 16, "above": 24, "limit": 32,
                                             "round_to": 8}
    # bounded by the teacher's width: nothing above 20 when the teacher has 20
    bounded = check_serving(config, tp=8, dtype="bf16", reference=config)
    assert bounded.nearest["expert_width"]["above"] is None
    assert "above none" in format_serving("s", bounded)[-1]


def test_fp8_width_per_rank_must_be_a_multiple_of_128():
    assert check_serving(tiny_config("phimoe", intermediate_size=512), tp=4, dtype="fp8").ok  # 128 per rank
    assert check_serving(tiny_config("phimoe", intermediate_size=512), tp=2, dtype="fp8").ok  # 256 per rank
    assert not check_serving(tiny_config("phimoe", intermediate_size=384), tp=4, dtype="fp8").ok  # 96 per rank
    check = check_serving(tiny_config("phimoe", intermediate_size=448), tp=2, dtype="fp8")
    assert check_serving(tiny_config("phimoe", intermediate_size=448), tp=2, dtype="bf16").ok
    assert not check.ok and check.problems == [
        "expert_width=448: 448/2 = 224 per rank, not a multiple of 128 (block-FP8 needs width % 256 == 0)"]
    assert check.nearest["expert_width"] == {"width": 448, "multiple": 256, "below": 256, "above": 512,
                                             "limit": None, "round_to": 256}


def test_shared_expert_width_is_checked_too():
    config = tiny_config("qwen2_moe", shared_expert_intermediate_size=18)  # routed 24: fine at tp 4
    check = check_serving(config, tp=4, dtype="bf16", reference=tiny_config("qwen2_moe"))
    assert not check.ok and check.problems == [
        "shared_expert_width=18: 18/4 = 4.5 per rank, not an integer (needs width % 4 == 0)"]
    assert set(check.nearest) == {"shared_expert_width"}
    near = check.nearest["shared_expert_width"]
    assert (near["below"], near["above"], near["limit"]) == (16, 20, 20)


def test_widths_must_be_uniform_across_layers():
    # transformers' configs hold one integer (strict dataclasses); a config from elsewhere may list one per layer
    config = SimpleNamespace(**{**tiny_config("mixtral").to_dict(), "intermediate_size": [24, 32]})
    check = check_serving(config, tp=1, dtype="bf16")
    assert not check.ok and "differ across MoE layers" in check.problems[0]


def test_attention_heads_must_divide_by_tp():
    check = check_serving(tiny_config("mixtral", intermediate_size=48), tp=3, dtype="bf16")  # heads 4/2
    assert any("num_attention_heads=4 is not divisible by tp=3" in p for p in check.problems)
    assert any("num_key_value_heads=2" in p for p in check.problems)


@pytest.mark.parametrize("heads, kv, tp, ok", [
    (8, 2, 4, True),  # KV heads divide tp (replicated)
    (8, 8, 4, True),  # KV heads divisible by tp (sharded)
    (8, 1, 8, True),
    (12, 6, 4, False),  # neither: 4 % 6 and 6 % 4
    (12, 3, 6, True),
    (12, 3, 4, False),
])
def test_kv_heads_divide_tp_or_are_divisible_by_it(heads, kv, tp, ok):
    config = tiny_config("mixtral", intermediate_size=48, num_attention_heads=heads, num_key_value_heads=kv)
    check = check_serving(config, tp=tp, dtype="bf16")
    assert check.ok is ok, check.problems
    assert ok or any(f"num_key_value_heads={kv}" in p for p in check.problems)


def test_phimoe_needs_top2_routing():
    check = check_serving(tiny_config("phimoe", num_experts_per_tok=1), tp=1, dtype="bf16")
    assert not check.ok and "top-2" in check.problems[0]
    assert check_serving(tiny_config("mixtral", num_experts_per_tok=1), tp=1, dtype="bf16").ok  # a PhiMoE rule


def test_nearest_widths_of_the_phi_tiny_width():
    assert nearest_widths(448, 8 * 128, limit=6400) == {"width": 448, "multiple": 1024, "below": None,
                                                        "above": 1024, "limit": 6400, "round_to": 1024}
    assert nearest_widths(1920, 1024, limit=6400)["below"] == 1024
    assert nearest_widths(960, 1024, limit=960)["above"] is None


def test_bad_arguments_and_config_values():
    with pytest.raises(ValueError, match="tp"):
        check_serving(tiny_config("phimoe"), tp=0, dtype="bf16")
    with pytest.raises(ValueError, match="dtype"):
        check_serving(tiny_config("phimoe"), tp=1, dtype="fp4")
    with pytest.raises(ValueError, match="serving.tp"):
        ServingConfig(tp=0)
    with pytest.raises(ValueError, match="serving.dtype"):
        ServingConfig(tp=1, dtype="int4")
    assert RunConfig().serving == ServingConfig(tp=None, dtype="bf16", strict=False)


# ---------------------------------------------------------------------------------------------------
# plan --serve-tp / --serve-dtype / --strict on the shipped Phi-tiny recipe (448 is not fp8-servable at tp 8)
# ---------------------------------------------------------------------------------------------------
def test_plan_flags_448_at_tp8_fp8_and_proposes_widths():
    out = run_plan("--serve-tp", "8", "--serve-dtype", "fp8")
    assert out.returncode == 0, out.stderr  # a report, not an error, without --strict
    lines = out.stdout.splitlines()
    header = next(line for line in lines if "expert_width" in line and "stage" in line)
    assert header.split()[-1] == "serves@tp8/fp8"
    final = next(line for line in lines if line.strip().startswith("width7"))
    assert final.split()[-1] == "no" and " 448 " in final
    report = "\n".join(lines[lines.index(final):])
    assert "width7: expert_width=448: 448/8 = 56 per rank, not a multiple of 128" in report
    assert ("width7: expert_width 448 -> nearest serving widths: below none (no positive multiple of 1024 <= 448), "
            "above 1024 (recipe: round_to: 1024)") in report


def test_plan_json_with_strict_exits_2_with_the_problems_on_stderr():
    out = run_plan("--serve-tp", "8", "--serve-dtype", "fp8", "--json", "--strict")
    assert out.returncode == 2
    plan = _json(out)
    assert plan["serving"] == {"tp": 8, "dtype": "fp8"}
    final = plan["stages"][-1]["serving"]
    assert final["ok"] is False and any("448" in p for p in final["problems"])
    assert final["nearest"]["expert_width"] == {"width": 448, "multiple": 1024, "below": None, "above": 1024,
                                                "limit": 6400, "round_to": 1024}
    assert all(not s["serving"]["ok"] for s in plan["stages"])  # 1920, 960, 448: none is a multiple of 1024
    assert "width7" in out.stderr and "expert_width=448" in out.stderr and "above 1024" in out.stderr


def test_plan_says_so_when_every_stage_serves():
    out = run_plan("--serve-tp", "1", "--serve-dtype", "bf16", "--strict")
    assert out.returncode == 0, out.stderr
    assert "serves@tp1/bf16" in out.stdout and "every stage serves" in out.stdout
    shapes = out.stdout.split("\n\n")[0]  # the shapes table (the compute table follows, one row per stage too)
    stage_rows = [line for line in shapes.splitlines() if line.strip().startswith("width")]
    assert len(stage_rows) == 3 and all(row.split()[-1] == "yes" for row in stage_rows)


def test_plan_fp8_widths_that_are_multiples_of_1024_serve():
    out = run_plan("--serve-tp", "8", "--serve-dtype", "fp8", "--json", "--strict", "--stages.0.expert_width", "2048",
                   "--stages.1.expert_width", "1024", "--stages.2.expert_width", "1024")
    assert out.returncode == 0, out.stderr
    assert all(s["serving"] == {"ok": True, "problems": [], "nearest": {}} for s in _json(out)["stages"])


def test_plan_reads_the_recipes_serving_section():
    out = run_plan("--serving.tp", "8", "--serving.dtype", "fp8", "--serving.strict", "true")
    assert out.returncode == 2 and "expert_width=448" in out.stderr
    # --serve-* override it: bf16 at tp 8 serves 448 (56 per rank)
    out = run_plan("--serving.tp", "8", "--serving.dtype", "fp8", "--serving.strict", "true", "--serve-dtype", "bf16")
    assert out.returncode == 0, out.stderr
    assert "serves@tp8/bf16" in out.stdout


def test_plan_without_a_tp_is_unchanged():
    out = run_plan()
    assert out.returncode == 0, out.stderr
    assert "serves@" not in out.stdout and "serving" not in out.stdout


# ---------------------------------------------------------------------------------------------------
# A training run whose final stage does not serve at serving.tp: warned, or refused, before any weight
# ---------------------------------------------------------------------------------------------------
def test_strict_serving_refuses_the_run_before_any_weight(tmp_path, phimoe_teacher, corpus_file, no_weights):
    from lightning_slimmoe.cli import main

    recipe = tiny_recipe(tmp_path, phimoe_teacher, corpus_file, serving={"tp": 3, "strict": True})
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(ConfigError) as info:
        main(["--config", recipe])
    message = str(info.value)
    assert "'slim2'" in message and "tp=3" in message  # the final stage: width 8, heads 2/1
    assert "expert_width=8" in message and "num_attention_heads=2 is not divisible by tp=3" in message
    assert "nearest serving widths" in message
    assert not no_weights and not (tmp_path / "run").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_serving_warns_before_any_weight(tmp_path, phimoe_teacher, corpus_file, no_weights, monkeypatch):
    import lightning_slimmoe.pipeline as pipeline
    from lightning_slimmoe.cli import main

    caught: list[warnings.WarningMessage] = []
    seen_at_first_load = []
    refuse = pipeline.load_model  # the no_weights fixture's: raises on the first weight load

    def first_load(*args, **kwargs):
        seen_at_first_load.append([str(w.message) for w in caught])
        return refuse(*args, **kwargs)

    monkeypatch.setattr(pipeline, "load_model", first_load)
    recipe = tiny_recipe(tmp_path, phimoe_teacher, corpus_file, serving={"tp": 3})
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        caught = record
        with pytest.raises(AssertionError, match="model weights were loaded"):
            main(["--config", recipe])
    assert seen_at_first_load, "the run stopped before loading the teacher"
    serving = [m for m in seen_at_first_load[0] if m.startswith("serving:")]
    assert len(serving) == 1, seen_at_first_load[0]
    assert "'slim2'" in serving[0] and "tp=3" in serving[0] and "nearest serving widths" in serving[0]
