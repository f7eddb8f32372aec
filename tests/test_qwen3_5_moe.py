"""Qwen3.5-MoE from its hub layout: the multimodal wrapper config (`qwen3_5_moe`, the language model under
`text_config`), fused experts under `model.language_model.`, a vision tower under `model.visual.` and an MTP layer
under `mtp.`. Its language model is slimmed and exported as the stock text-only causal LM; the tiny text-only model of
the same family is covered by every FAMILIES-parametrized test."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from helpers import (assert_sharded_read_equals_from_pretrained, make_hub_teacher_dir, random_batch, random_keep,
                     read_summary, tiny_recipe, write_hub_checkpoint)
from lightning_slimmoe.checkpoint_layout import CheckpointLayout, sharded_read_problem
from lightning_slimmoe.cli import SlimMoECLI, main
from lightning_slimmoe.config import ConfigError
from lightning_slimmoe.families import get_family, language_config
from lightning_slimmoe.planning import plan_shapes
from lightning_slimmoe.slimming import expert_weights, slim_model_

def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen3_5_hub")
    return path, write_hub_checkpoint(path)


def test_hub_layout_loads_as_the_text_causal_lm_and_keys_are_anchored(hub):
    path, wrapper = hub
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert any(k.startswith("mtp.layers.0.mlp.experts.") for k in keys) and any(k.startswith("model.visual.") for k in keys)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    assert type(model).__name__ == "Qwen3_5MoeForCausalLM" and model.config.model_type == "qwen3_5_moe_text"
    ids = random_batch()["input_ids"]
    assert torch.equal(logits(model, ids), logits(wrapper, ids))  # mtp.* and model.visual.* were not read
    config = wrapper.config
    assert get_family(config) is get_family(model) and language_config(config) is config.text_config
    layout = CheckpointLayout(config)
    keep = random_keep(model, width=8, groups=1, shared_width=8)
    for key in keys:
        hub_layer = key.startswith("model.language_model.layers.")
        selected = layout.plain_selection(key, keep)
        if not hub_layer:  # never a decoder layer: the MTP layer, the vision tower, embeddings, lm_head
            assert layout.expert_key(key) is None and layout.fused_key(key) is None and selected is None, key
            assert layout.expert_indexed(key) is None, key
        elif key.endswith(".self_attn.q_proj.weight"):  # 1 of 2 groups, 2 heads, query + gate rows of head_dim 8
            assert selected[0] == 0 and selected[1].numel() == 2 * 2 * 8, key
        elif key.endswith("mlp.experts.gate_up_proj"):
            assert layout.fused_key(key).proj == "gate_up_proj"


def test_hub_layout_slices_exactly_and_reloads_with_stock_transformers(hub, tmp_path):
    path, wrapper = hub
    ids = random_batch()["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    family = get_family(model)
    full = random_keep(model, width=24, groups=2, shared_width=20)
    full.experts = {k: torch.arange(24).expand(4, -1) for k in full.experts}
    full.shared = {k: torch.arange(20) for k in full.shared}
    full.groups = {k: torch.arange(2) for k in full.groups}
    before = logits(model, ids)
    slim_model_(model, full)
    assert torch.equal(before, logits(model, ids))  # keep-all is the identity

    keep = random_keep(model, width=8, groups=1, shared_width=12, seed=5)
    slim_model_(model, keep)
    hub_layers = wrapper.model.language_model.layers
    for layer, block in family.moe_blocks(model):  # every expert keeps its own rows, gate and up alike
        gate, up, down = expert_weights(hub_layers[layer].mlp.experts)
        new_gate, new_up, new_down = expert_weights(block.experts)
        for e in range(4):
            kept = keep.experts[layer][e]
            assert torch.equal(new_gate[e], gate[e][kept]) and torch.equal(new_up[e], up[e][kept])
            assert torch.equal(new_down[e], down[e][:, kept])
    attn, hub_attn = model.model.layers[1].self_attn, hub_layers[1].self_attn
    g = int(keep.groups[1])  # 2 query heads per group, each 8 query rows then 8 gate rows
    assert torch.equal(attn.q_proj.weight, hub_attn.q_proj.weight[g * 32:(g + 1) * 32])
    assert torch.equal(attn.o_proj.weight, hub_attn.o_proj.weight[:, g * 16:(g + 1) * 16])
    assert not hasattr(model.model.layers[0], "self_attn")  # the GatedDeltaNet layer is left as it is
    model.save_pretrained(tmp_path / "slim")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "slim").eval()
    assert reloaded.config.model_type == "qwen3_5_moe_text" and reloaded.config.num_key_value_heads == 1
    assert torch.equal(logits(model, ids), logits(reloaded, ids))


def test_two_stages_from_a_multimodal_hub_teacher(tmp_path, corpus_file):
    teacher = make_hub_teacher_dir(tmp_path / "teacher", corpus_file)
    stages = [{"name": "a", "expert_width": 16, "shared_expert_width": 16, "calibration_tokens": 128, "max_tokens": 256},
              {"name": "b", "expert_width": 8, "attention_groups": 1, "calibration_tokens": 128, "max_tokens": 256}]
    main(["--config", tiny_recipe(tmp_path, str(teacher), corpus_file, stages=stages)])
    summary = read_summary(tmp_path / "run")
    assert summary["mtp"] == "dropped" and {"teacher", "stages", "final_dir"} <= summary.keys()
    assert summary["teacher"]["expert_width"] == 32 and [s["expert_width"] for s in summary["stages"]] == [16, 8]
    assert summary["stages"][-1]["num_key_value_heads"] == 1
    final = AutoModelForCausalLM.from_pretrained(summary["final_dir"])
    assert final.config.model_type == "qwen3_5_moe_text" and final.config.shared_expert_intermediate_size == 16
    assert final.config.mtp_num_hidden_layers == 0  # the teacher's 1 MTP layer is not in the export: not counted
    card = (Path(summary["final_dir"]) / "README.md").read_text()
    assert "vision tower" in card and '"mtp": "dropped"' in card


def test_sharded_reader_reads_the_hub_layout_as_from_pretrained_does(hub):
    path, _ = hub
    reference = AutoModelForCausalLM.from_pretrained(path).eval()
    assert_sharded_read_equals_from_pretrained(path, random_keep(reference, width=8, groups=1, shared_width=12, seed=2))


def test_bad_targets_and_unreadable_sharded_layouts_fail_before_weights(hub, tmp_path, corpus_file):
    path, wrapper = hub
    stages = [{"name": "a", "expert_width": 16}, {"name": "b", "expert_width": 8, "attention_groups": 3}]
    cli = SlimMoECLI(args=["--config", tiny_recipe(tmp_path, str(path), corpus_file, stages=stages)])
    with pytest.raises(ConfigError, match=r"attention_groups=3: exceeds the current 2 KV groups"):
        plan_shapes(cli.run_config)
    assert sharded_read_problem(str(path), wrapper.config) is None  # the hub layout is read by the sharded loader
    model = AutoModelForCausalLM.from_pretrained(path)  # and so is the text-only layout a sharded run writes
    AutoModelForCausalLM.from_config(model.config).save_pretrained(tmp_path / "text")
    assert sharded_read_problem(str(tmp_path / "text"), model.config) is None
    # A layout the loader does not map (an older wrapper's language_model.model.layers.*) is refused by name.
    other = tmp_path / "other"
    other.mkdir()
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        tensors = {k.replace("model.language_model.", "language_model.model."): f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(other / "model.safetensors"), metadata={"format": "pt"})
    problem = sharded_read_problem(str(other), wrapper.config)
    assert "model.language_model.layers.<i>." in problem and "FSDPStrategy" in problem
