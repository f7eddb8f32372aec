"""``slimmoe check-serving`` (issue 24, items 3 and 5): the comparison and the verdicts in the default run (no engine
needed), and, marked ``serving``, the real engines on tiny exports of this project's own export path: vLLM and
llama.cpp serve a Qwen3-MoE slimmed with half its KV groups and refuse a Qwen2-MoE slimmed alike, and vLLM serves a
PhiMoE export (its architectures as vLLM registers them). The engines' environments come from bench/serving.py
(helpers.serving_envs); without them those tests are skipped with a message that names it."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from helpers import ROOT, serving_envs
from lightning_slimmoe.engine_check import EngineSetupError, compare, llama_cpp_paths, verdict_line


def _ref(tokens):
    return {"tokens": tokens, "logprobs": [[{str(t): -1.0} for t in row] for row in tokens]}


def test_identical_tokens_serve_and_the_logprob_gap_is_measured():
    ref = _ref([[1, 2, 3], [4, 5, 6]])
    eng = {"loaded": True, "tokens": [[1, 2, 3], [4, 5, 6]],
           "logprobs": [[{str(t): -1.0 + 1e-6} for t in row] for row in ref["tokens"]]}
    got = compare(ref, eng)
    assert got["verdict"] == "serves" and got["identical"] == 2 and got["first_divergence"] is None
    assert got["max_logprob_diff"] == pytest.approx(1e-6)
    line = verdict_line({"engine": "vllm", "model": "m", "max_new_tokens": 3, "top_k": 1, **got})
    assert line.startswith("check-serving: vLLM serves m: 2/2 prompts x 3 tokens identical to transformers")


def test_a_divergence_is_named_and_logprobs_after_it_are_not_compared():
    ref = _ref([[1, 2, 3], [4, 5, 6]])
    eng = {"loaded": True, "tokens": [[1, 2, 3], [4, 9, 7]],
           "logprobs": [[{"1": -1.0}, {"2": -1.0}, {"3": -1.0}], [{"4": -1.0}, {"5": -1.5, "9": -1.2}, {"6": -99.0}]]}
    got = compare(ref, eng)
    assert got["verdict"] == "differs" and got["identical"] == 1
    assert got["first_divergence"] == {"prompt": 1, "step": 1, "transformers": 5, "engine": 9, "gap": None}
    assert got["max_logprob_diff"] == pytest.approx(0.5)  # step 1 compared, step 2 (another prefix) not
    assert "prompt 1 step 1: transformers 5, engine 9" in got["reason"]


def test_a_near_tie_within_the_measured_difference_is_not_a_divergence():
    ref = {"tokens": [[1, 2], [4, 5]],
           "logprobs": [[{"1": -1.0}, {"2": -1.0}], [{"4": -1.0}, {"5": -2.0, "9": -2.00003}]]}
    eng = {"loaded": True, "tokens": [[1, 2], [4, 9]],
           "logprobs": [[{"1": -1.00002}, {"2": -1.0}], [{"4": -1.0}, {"5": -2.00001, "9": -1.99999}]]}
    got = compare(ref, eng)
    assert got["verdict"] == "serves" and got["identical"] == 1 and got["first_divergence"] is None
    assert got["near_ties"] == [{"prompt": 1, "step": 1, "transformers": 5, "engine": 9, "gap": pytest.approx(3e-5)}]
    line = verdict_line({"engine": "llamacpp", "model": "m", "max_new_tokens": 2, "top_k": 2, **got})
    assert "1/2 prompts x 2 tokens identical to transformers; 1 stopped at a near tie (log-prob gap 3.0e-05)" in line
    far = compare(ref, {**eng, "logprobs": eng["logprobs"]}, tie=1e-6)
    assert far["verdict"] == "serves"  # 2 x the measured 2e-5 still covers a 3e-5 gap
    ref["logprobs"][1][1]["9"] = -2.5  # a real margin: a divergence
    assert compare(ref, eng)["verdict"] == "differs"


def test_an_engine_that_does_not_load_refuses_with_its_reason():
    got = compare(_ref([[1]]), {"loaded": False, "reason": "ValueError: head size 16 is not supported"})
    assert got == {"verdict": "refuses", "reason": "ValueError: head size 16 is not supported"}
    line = verdict_line({"engine": "llamacpp", "model": "m", **got})
    assert line == "check-serving: llama.cpp refuses m: ValueError: head size 16 is not supported"


def test_setup_errors_name_what_is_missing(tmp_path):
    with pytest.raises(EngineSetupError, match="no libllama.so"):
        llama_cpp_paths(tmp_path)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "libllama.so").write_text("")
    with pytest.raises(EngineSetupError, match="no convert_hf_to_gguf.py"):
        llama_cpp_paths(tmp_path)
    out = subprocess.run([sys.executable, "-m", "lightning_slimmoe", "check-serving", "--model", str(tmp_path),
                          "--engine", "llamacpp"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "--engine llamacpp needs --llama-cpp BUILD_DIR" in out.stderr


# ---------------------------------------------------------------------------------------------------
# The real engines (pytest -m serving)
# ---------------------------------------------------------------------------------------------------
def _export(tmp_path, family: str, groups: int | None, tokenizer_dir: str):
    """A tiny export of ``family`` through export_hf: hidden 128 = 4 heads x 32 (a vLLM-CPU head size), 2 KV groups,
    slimmed to half the expert width (and to ``groups`` KV groups), with the Qwen tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from helpers import random_keep, tiny_config
    from lightning_slimmoe.export import export_hf
    from lightning_slimmoe.slimming import slim_model_

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    extra = {"qwen2_moe": dict(moe_intermediate_size=32, shared_expert_intermediate_size=32),
             "qwen3_moe": dict(moe_intermediate_size=32),
             # vLLM's sparsemixer uses jitter_eps 0.01 whatever router_jitter_noise says, and adds no lm_head bias
             "phimoe": dict(intermediate_size=32, router_jitter_noise=0.01, lm_head_bias=False)}[family]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(
        family, vocab_size=len(tokenizer), hidden_size=128, head_dim=32, max_position_embeddings=512, **extra)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.05)
    slim_model_(model, random_keep(model, width=16, groups=groups or 2, shared_width=16))
    out = tmp_path / f"{family}-{groups}"
    export_hf(model, out, tokenizer=tokenizer, probe_ids=torch.tensor([[1, 2, 3]]))
    return out


def _check(model_dir, engine: str) -> dict:
    from lightning_slimmoe.engine_check import check_served

    envs = serving_envs()
    return check_served(model_dir, engine, python=envs.get("vllm") if engine == "vllm" else envs.get("llamacpp_python"),
                        llama_cpp=envs.get("llamacpp"), max_new_tokens=8)


@pytest.mark.serving
@pytest.mark.vllm
@pytest.mark.tokenizer
def test_vllm_serves_qwen3_moe_and_phimoe_and_refuses_qwen2_moe_with_pruned_kv_groups(tmp_path):
    tok = serving_envs()["tokenizer"]
    served = _check(_export(tmp_path, "qwen3_moe", 1, tok), "vllm")
    assert served["verdict"] == "serves", served
    phimoe = _check(_export(tmp_path, "phimoe", 1, tok), "vllm")
    assert phimoe["verdict"] == "serves", phimoe
    refused = _check(_export(tmp_path, "qwen2_moe", 1, tok), "vllm")
    assert refused["verdict"] == "refuses", refused


@pytest.mark.serving
@pytest.mark.llamacpp
@pytest.mark.tokenizer
def test_llamacpp_serves_qwen3_moe_and_refuses_qwen2_moe_with_pruned_kv_groups(tmp_path):
    tok = serving_envs()["tokenizer"]
    served = _check(_export(tmp_path, "qwen3_moe", 1, tok), "llamacpp")
    assert served["verdict"] == "serves" and served["tokenizer_agrees"], served
    assert served["max_logprob_diff"] < 1e-3
    refused = _check(_export(tmp_path, "qwen2_moe", 1, tok), "llamacpp")
    assert refused["verdict"] == "refuses", refused
