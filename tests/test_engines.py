"""The engines' support tables (issue 24, item 2): every cell of engine x family x pruning says how it is known,
the cells the engines' code decides, ``plan --serve ENGINE`` per stage, and a training run whose final stage the
named engine cannot serve: a warning naming the reason before any weight, or with ``serving.strict`` a refusal."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import pytest

from helpers import ROOT, FAMILIES, make_teacher_dir, tiny_config, tiny_recipe
from lightning_slimmoe.config import ConfigError, ServingConfig
from lightning_slimmoe.engines import (BENCH, ENGINES, FAMILY_NAMES, PRUNINGS, engine_problems, markdown_table,
                                       prunings, support, table)
from lightning_slimmoe.serving import check_engine
from lightning_slimmoe.slimming import SlimTarget, slim_config


def _slim(config, width=None, groups=None, experts=None):
    from lightning_slimmoe.families import get_family
    from lightning_slimmoe.slimming import with_num_experts

    family = get_family(config)
    if experts is not None:
        config = with_num_experts(config, experts)
    target = SlimTarget(expert_width=width or family.expert_width(config),
                        attention_groups=groups or int(config.num_key_value_heads),
                        shared_expert_width=family.shared_expert_width(config) if family.shared_expert_width_field
                        else None)
    return slim_config(config, target)


def test_every_cell_of_every_engine_says_how_it_is_known():
    cells = table()
    assert len(cells) == len(ENGINES) * len(FAMILY_NAMES) * len(PRUNINGS)
    assert set(FAMILY_NAMES) == set(FAMILIES)  # every family this project slims has a row
    for cell in cells:
        assert cell.status in ("serves", "refuses", "differs", "n/a")
        assert cell.source.startswith((BENCH, "read: ", "assumed: ")) or (
            cell.status == "n/a" and cell.source.startswith("n/a: ")), cell
        assert cell.ok or cell.reason, cell  # anything but "serves" says why


@pytest.mark.parametrize("engine, family, pruning, status, words", [
    ("vllm", "qwen2_moe", "kv_groups", "refuses", "Qwen2-MoE with pruned KV groups: vLLM derives the head size"),
    ("sglang", "qwen2_moe", "kv_groups", "refuses", "SGLang derives the head size"),
    ("llamacpp", "qwen2_moe", "kv_groups", "refuses", "fixes the Q/O projections to n_embd"),
    ("llamacpp", "phimoe", "kv_groups", "refuses", "fixes the Q/O projections"),
    ("llamacpp", "phimoe", "none", "differs", "sparsemixer"),
    ("vllm", "deepseek_v2", "none", "differs", "576"),
    ("vllm", "granitemoe", "kv_groups", "refuses", "derives the head size"),
    ("vllm", "olmoe", "kv_groups", "n/a", "no KV groups that lightning_slimmoe prunes"),
    ("vllm", "phimoe", "kv_groups", "serves", ""),
    ("vllm", "qwen3_moe", "kv_groups", "serves", ""),
    ("vllm", "qwen2_moe", "expert_width", "serves", ""),
    ("llamacpp", "qwen3_moe", "kv_groups", "serves", ""),
    ("llamacpp", "gpt_oss", "kv_groups", "serves", ""),
    ("llamacpp", "deepseek_v2", "expert_width", "serves", ""),
])
def test_table_cells(engine, family, pruning, status, words):
    cell = support(engine, family, pruning)
    assert cell.status == status and words in cell.reason, cell


def test_prunings_are_read_off_the_configs():
    teacher = tiny_config("qwen2_moe")
    assert prunings(teacher, teacher) == ["none"]
    assert prunings(_slim(teacher, width=16), teacher) == ["expert_width"]
    assert prunings(_slim(teacher, width=16, groups=1), teacher) == ["expert_width", "kv_groups"]
    assert prunings(_slim(teacher, experts=2), teacher) == ["experts_removed"]
    shared = _slim(teacher)
    shared.shared_expert_intermediate_size = 16  # the shared expert alone: an expert width too
    assert prunings(shared, teacher) == ["expert_width"]


def test_engine_problems_and_dtypes():
    teacher = tiny_config("qwen2_moe")
    pruned = _slim(teacher, width=16, groups=1)
    assert engine_problems("vllm", _slim(teacher, width=16), teacher) == []
    problems = engine_problems("vllm", pruned, teacher)
    assert len(problems) == 1 and problems[0].startswith(
        "Qwen2-MoE with pruned KV groups: vLLM derives the head size from hidden_size / num_attention_heads")
    assert "read: vLLM vllm/model_executor/models/qwen2_moe.py" in problems[0]
    assert engine_problems("llamacpp", teacher, teacher, "fp8")[0].startswith("dtype fp8: llama.cpp serves")
    assert engine_problems("sglang", teacher, teacher, "fp32")[0].startswith("dtype fp32: SGLang serves")
    # q8_0: rows in blocks of 32 (routed 24 and shared 20 are not)
    q8 = engine_problems("llamacpp", teacher, teacher, "q8_0")
    assert [p.split(":")[0] for p in q8] == ["expert_width=24", "shared_expert_width=20"]
    assert engine_problems("llamacpp", tiny_config("qwen3_moe", moe_intermediate_size=64),
                           tiny_config("qwen3_moe", moe_intermediate_size=64), "q8_0") == []


def test_phimoe_config_values_vllm_and_llamacpp_do_not_read():
    hub_like = tiny_config("phimoe", router_jitter_noise=0.01, lm_head_bias=False, rope_parameters={
        "rope_type": "default", "rope_theta": 10000.0, "original_max_position_embeddings": 128})
    assert engine_problems("vllm", hub_like, hub_like) == []
    assert engine_problems("llamacpp", hub_like, hub_like)[0].startswith("PhiMoE in llama.cpp: its routing")
    jitter = tiny_config("phimoe", router_jitter_noise=0.0)  # the tests' (and the demo's) value
    assert any("vLLM's sparsemixer uses jitter_eps 0.01" in p for p in engine_problems("vllm", jitter, jitter))
    no_bias = tiny_config("phimoe", router_jitter_noise=0.01, attention_bias=False, lm_head_bias=False)
    assert any("vLLM builds q/k/v/o with biases" in p for p in engine_problems("vllm", no_bias, no_bias))
    head_bias = tiny_config("phimoe", router_jitter_noise=0.01, lm_head_bias=True)  # Phi-3.5-MoE's
    assert [p for p in engine_problems("vllm", head_bias, head_bias) if "lm_head.bias but never adds it" in p]
    assert any("original_max_position_embeddings" in p for p in engine_problems("llamacpp", jitter, jitter))


def test_check_engine_adds_the_width_rules_for_vllm_and_sglang_only():
    teacher = tiny_config("mixtral", intermediate_size=48)
    slim = _slim(teacher, width=40)  # 40 / 16 per rank: not an integer
    vllm = check_engine(slim, "vllm", tp=16, reference=teacher)
    assert not vllm.ok and vllm.label == "serves@vllm/tp16/bf16"
    assert any("expert_width=40" in p for p in vllm.problems) and "expert_width" in vllm.nearest
    llama = check_engine(slim, "llamacpp", tp=16, reference=teacher)
    assert llama.ok and llama.label == "serves@llamacpp/tp16/bf16"
    assert check_engine(slim, "vllm", reference=teacher).label == "serves@vllm/bf16"  # tp 1
    with pytest.raises(ValueError, match="engine"):
        check_engine(slim, "tgi")
    with pytest.raises(ValueError, match="q8_0 is llama.cpp's"):
        ServingConfig(engine="vllm", dtype="q8_0")
    with pytest.raises(ValueError, match="serving.engine"):
        ServingConfig(engine="tgi")


def test_markdown_table_marks_the_bench_cells():
    text = markdown_table()
    assert text.splitlines()[0].startswith("| family | vLLM: unpruned |")
    assert len(text.splitlines()) == 2 + len(FAMILY_NAMES)


# ---------------------------------------------------------------------------------------------------
# plan --serve ENGINE, and a run, on a Qwen2-MoE recipe that prunes KV groups
# ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def qwen2_teacher(tmp_path_factory, corpus_file) -> str:
    return make_teacher_dir(tmp_path_factory.mktemp("teacher") / "qwen2_moe", "qwen2_moe", corpus_file)


def _plan(recipe: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lightning_slimmoe", "plan", "--config", recipe, *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_plan_serve_vllm_names_the_reason_per_stage_and_strict_refuses(tmp_path, qwen2_teacher, corpus_file):
    recipe = tiny_recipe(tmp_path, qwen2_teacher, corpus_file)  # slim1: width 16; slim2: width 8, 1 KV group
    out = _plan(recipe, "--serve", "vllm")
    assert out.returncode == 0, out.stderr
    shapes = out.stdout.split("\n\n")[0]  # the shapes table (the compute table follows, one row per stage too)
    rows = {line.split()[0]: line.split()[-1] for line in shapes.splitlines() if line.split()[:1] in (["slim1"], ["slim2"])}
    assert rows == {"slim1": "yes", "slim2": "no"}
    assert "serves@vllm/bf16" in out.stdout
    assert ("slim2: Qwen2-MoE with pruned KV groups: vLLM derives the head size from hidden_size / "
            "num_attention_heads") in out.stdout
    strict = _plan(recipe, "--serve", "vllm", "--strict", "--json")
    assert strict.returncode == 2
    assert "'slim2' cannot be served at bf16 in vLLM" in strict.stderr and "derives the head size" in strict.stderr
    plan = json.loads(strict.stdout[strict.stdout.index("{"):])
    assert plan["serving"] == {"engine": "vllm", "tp": None, "dtype": "bf16"}
    assert [s["serving"]["ok"] for s in plan["stages"]] == [True, False]
    # the recipe's own serving section; llama.cpp refuses it for its own reason
    llama = _plan(recipe, "--serving.engine", "llamacpp")
    assert "llama.cpp's loader fixes the Q/O projections" in llama.stdout


def test_serve_engine_warns_before_any_weight_and_strict_refuses(tmp_path, qwen2_teacher, corpus_file, no_weights,
                                                                   monkeypatch):
    import lightning_slimmoe.pipeline as pipeline
    from lightning_slimmoe.cli import main

    recipe = tiny_recipe(tmp_path, qwen2_teacher, corpus_file, serving={"engine": "vllm", "strict": True})
    with pytest.raises(ConfigError, match="Qwen2-MoE with pruned KV groups: vLLM derives the head size"):
        main(["--config", recipe])
    assert not no_weights and not (tmp_path / "run").exists()

    caught: list = []
    seen = []
    refuse = pipeline.load_model

    def first_load(*args, **kwargs):
        seen.append([str(w.message) for w in caught])
        return refuse(*args, **kwargs)

    monkeypatch.setattr(pipeline, "load_model", first_load)
    recipe = tiny_recipe(tmp_path, qwen2_teacher, corpus_file, serving={"engine": "vllm"})
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        caught = record
        with pytest.raises(AssertionError, match="model weights were loaded"):
            main(["--config", recipe])
    assert seen, "the run stopped before loading the teacher"
    serving = [m for m in seen[0] if m.startswith("serving:")]
    assert len(serving) == 1 and "'slim2'" in serving[0] and "vLLM derives the head size" in serving[0]


def test_readme_family_table_says_where_each_family_serves():
    from lightning_slimmoe.engines import serves_in

    rows = {line.split("`")[1]: line for line in (ROOT / "README.md").read_text().splitlines()
            if line.startswith("| `") and line.count(" | ") >= 8}
    for family in FAMILY_NAMES:
        assert rows[family].endswith(f" {serves_in(family)} |"), family


def test_llamacpp_takes_a_deepseek_without_q_lora_only_at_v2_lite_depth():
    lite = tiny_config("deepseek_v2")  # q_lora_rank None (as V2-Lite), 3 layers
    assert any("DeepSeek without q_lora_rank at 3 layers" in p for p in engine_problems("llamacpp", lite, lite))
    assert engine_problems("llamacpp", tiny_config("deepseek_v2", q_lora_rank=16),
                           tiny_config("deepseek_v2", q_lora_rank=16)) == []
    assert not engine_problems("llamacpp", tiny_config("deepseek_v2", num_hidden_layers=27),
                               tiny_config("deepseek_v2", num_hidden_layers=27))


def test_vllm_cpu_needs_gpt_oss_widths_in_multiples_of_32():
    teacher = tiny_config("gpt_oss", intermediate_size=32)
    assert engine_problems("vllm", teacher, teacher) == []
    half = _slim(teacher, width=16)
    assert any("gpt-oss expert_width=16: vLLM's CPU MoE kernel" in p for p in engine_problems("vllm", half, teacher))
    assert engine_problems("llamacpp", half, teacher) == []
