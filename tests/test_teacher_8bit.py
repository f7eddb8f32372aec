"""``teacher_8bit: true``: the frozen teacher in bitsandbytes 8-bit (attention Linear8bitLt + int8 fused experts)."""

from __future__ import annotations

import sys

import pytest
import torch

from helpers import random_batch, read_summary, tiny_model, tiny_recipe
from lightning_slimmoe.cli import main

bnb = pytest.importorskip("bitsandbytes")


def test_teacher_8bit_quantizes_linears_and_fused_experts(tmp_path):
    from bitsandbytes.nn import Linear8bitLt
    from transformers import AutoModelForCausalLM

    from lightning_slimmoe.quantize import load_teacher_8bit, quantized_bytes

    tiny_model("qwen3_moe").save_pretrained(tmp_path / "t")
    fp32 = AutoModelForCausalLM.from_pretrained(tmp_path / "t").eval()
    q = load_teacher_8bit(str(tmp_path / "t"), torch.float32).eval()
    layer = q.model.layers[0]
    assert isinstance(layer.self_attn.q_proj, Linear8bitLt)
    assert layer.mlp.experts.gate_up_proj_int8.dtype == torch.int8  # the fused experts too, not only nn.Linear
    assert "gate_up_proj" not in dict(layer.mlp.experts.named_parameters())
    assert layer.mlp.experts.gate_up_proj.shape == fp32.model.layers[0].mlp.experts.gate_up_proj.shape
    b8, b32 = quantized_bytes(q), quantized_bytes(fp32)
    assert b8["fused_expert_bytes"] == 0 and b8["int8_bytes"] > 0 and b8["total_bytes"] < b32["total_bytes"]
    ids = random_batch(seq_len=16)["input_ids"] % fp32.config.vocab_size
    with torch.no_grad():
        a, b = fp32(input_ids=ids).logits, q(input_ids=ids).logits
    assert (a - b).abs().max() < 0.1 * a.abs().max()  # int8 rounding, not a different model
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.9


def test_unsupported_combinations_are_refused(monkeypatch):
    from lightning_slimmoe.quantize import check_teacher_8bit

    check_teacher_8bit(sharded=False, precision="32-true")
    check_teacher_8bit(sharded=False, precision="bf16-mixed")
    with pytest.raises(ValueError, match="ModelParallelStrategy"):
        check_teacher_8bit(sharded=True, precision="32-true")
    with pytest.raises(ValueError, match="trainer.precision='bf16-true'"):
        check_teacher_8bit(sharded=False, precision="bf16-true")
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes -> ImportError
    with pytest.raises(ValueError, match="needs bitsandbytes"):
        check_teacher_8bit(sharded=False, precision="32-true")


def test_stage_runs_against_an_8bit_teacher(tmp_path, phimoe_teacher, corpus_file):
    stages = [{"name": "s", "expert_width": 16, "calibration_tokens": 128, "max_tokens": 2 * 4 * 32,
               "optimizer": {"lr": 1e-3}}]
    main(["--config", tiny_recipe(tmp_path, phimoe_teacher, corpus_file, stages=stages, teacher_8bit=True)])
    summary = read_summary(tmp_path / "run")
    assert summary["stages"][0]["expert_width"] == 16
    assert 0.0 <= summary["stages"][0]["teacher_top1_agreement"] <= 1.0
