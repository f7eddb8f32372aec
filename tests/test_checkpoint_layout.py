"""The checkpoint key layout (checkpoint_layout.py) and the HF-directory writer (hf_dir.py): every family's hub keys
are recognised as ``save_pretrained`` writes them, patterns are anchored (an MTP head's ``mtp.layers.0`` is never
decoder layer 0), and a model written tensor by tensor reloads with stock ``from_pretrained`` to identical logits."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from helpers import FAMILIES, random_batch, random_keep, tiny_model
from lightning_slimmoe.checkpoint_layout import CheckpointLayout
from lightning_slimmoe.families import get_family
from lightning_slimmoe.hf_dir import HFDirWriter, read_back_problem
from lightning_slimmoe.models import persistent_tensors
from lightning_slimmoe.slimming import group_rows


def saved_keys(model, directory) -> list[str]:
    model.save_pretrained(directory)
    with safe_open(str(directory / "model.safetensors"), framework="pt") as f:
        return list(f.keys())


@pytest.mark.parametrize("family_name", FAMILIES)
def test_every_per_expert_key_of_a_saved_checkpoint_is_recognised(family_name, tmp_path):
    model = tiny_model(family_name)
    layout = CheckpointLayout(model.config)
    keys = saved_keys(model, tmp_path)
    fused = {k for k in keys if layout.fused_key(k) is not None or layout.fused_bias_key(k) is not None}
    if family_name in ("gpt_oss", "llama4"):  # hub layout = in-memory one: fused experts (and biases), no per-expert keys
        assert fused and fused == {k for k in keys if ".experts." in k}
        return
    if family_name.startswith("granitemoe"):  # fused on the hub too, renamed whole (read through transformers' renaming)
        moe_layers = [layer for layer, _ in get_family(model).moe_blocks(model)]
        assert not fused and not any(".experts." in k for k in keys)
        assert {k for k in keys if ".block_sparse_moe." in k} == {
            f"model.layers.{layer}.block_sparse_moe.{name}.weight" for layer in moe_layers
            for name in ("input_linear", "output_linear", "router.layer")}
        return
    experts = {k: layout.expert_key(k) for k in keys if ".experts." in k}
    family = get_family(model)
    num_experts = family.num_experts(model.config)
    moe_layers = [layer for layer, _ in family.moe_blocks(model)]  # interleaved dense layers have no experts
    shared = family.checkpoint_keys.shared_expert
    experts = {k: v for k, v in experts.items() if not (shared and f".{shared}." in k)}
    assert experts and all(v is not None for v in experts.values()), [k for k, v in experts.items() if v is None]
    assert {(e.layer, e.expert, e.role) for e in experts.values()} == {
        (layer, e, role) for layer in moe_layers for e in range(num_experts) for role in ("gate", "up", "down")}
    assert all(layout.expert_key(k) is None for k in keys if ".experts." not in k)


@pytest.mark.parametrize("family_name", FAMILIES)
def test_fused_and_router_names_of_the_model_are_recognised(family_name):
    model = tiny_model(family_name)
    layout = CheckpointLayout(model.config)
    names = list(model.state_dict())
    moe_layers = [layer for layer, _ in get_family(model).moe_blocks(model)]
    fused = {(f.layer, f.proj) for n in names if (f := layout.fused_key(n)) is not None}
    assert fused == {(layer, proj) for layer in moe_layers for proj in ("gate_up_proj", "down_proj")}
    indexed = {n: layout.expert_indexed(n) for n in names if layout.expert_indexed(n) is not None}
    assert {layer for layer, _ in indexed.values()} == set(moe_layers) and all(".experts." not in n for n in indexed)
    num_experts = get_family(model).num_experts(model.config)
    state = model.state_dict()
    assert all(state[n].shape[dim] == num_experts for n, (_, dim) in indexed.items())  # the dim really is experts


def test_patterns_are_anchored_at_the_decoder_layers():
    model = tiny_model("qwen2_moe")
    layout = CheckpointLayout(model.config)
    keep = random_keep(model, width=8, groups=1, shared_width=12, seed=1)
    for prefix in ("mtp.layers.0.", "model.visual.layers.0.", "model.mtp.layers.0.", "xmodel.layers.0."):
        assert layout.expert_key(prefix + "mlp.experts.0.gate_proj.weight") is None
        assert layout.fused_key(prefix + "mlp.experts.gate_up_proj") is None
        assert layout.expert_indexed(prefix + "mlp.gate.weight") is None
        assert layout.plain_selection(prefix + "self_attn.q_proj.weight", keep) is None
        assert layout.plain_selection(prefix + "mlp.shared_expert.gate_proj.weight", keep) is None
    assert layout.expert_key("model.layers.1.mlp.experts.3.down_proj.weight").role == "down"


def test_plain_selection_of_attention_and_shared_expert():
    model = tiny_model("qwen2_moe")
    layout = CheckpointLayout(model.config)
    keep = random_keep(model, width=8, groups=1, shared_width=12, seed=3)
    dim, per_group = model.config.head_dim, model.config.num_attention_heads // model.config.num_key_value_heads
    axis, rows = layout.plain_selection("model.layers.1.self_attn.q_proj.weight", keep)
    assert axis == 0 and torch.equal(rows, group_rows(keep.groups[1], per_group * dim))
    axis, cols = layout.plain_selection("model.layers.1.self_attn.o_proj.weight", keep)
    assert axis == 1 and torch.equal(cols, rows)
    assert layout.plain_selection("model.layers.1.self_attn.o_proj.bias", keep) is None
    axis, rows = layout.plain_selection("model.layers.0.self_attn.k_proj.bias", keep)
    assert axis == 0 and torch.equal(rows, group_rows(keep.groups[0], dim))
    assert layout.plain_selection("model.layers.0.mlp.shared_expert.up_proj.weight", keep)[0] == 0
    axis, cols = layout.plain_selection("model.layers.0.mlp.shared_expert.down_proj.weight", keep)
    assert axis == 1 and torch.equal(cols, keep.shared[0])
    axis, ids = layout.plain_selection("model.layers.0.mlp.experts.2.up_proj.weight", keep)
    assert axis == 0 and torch.equal(ids, keep.experts[0][2])


@pytest.mark.parametrize("family_name", ["phimoe", "qwen2_moe"])
def test_hf_dir_writer_output_reloads_to_identical_logits(family_name, tmp_path):
    model = tiny_model(family_name)
    writer = HFDirWriter(tmp_path / "out", model, max_shard_bytes=4096)  # many shards
    for name, tensor in persistent_tensors(model):
        writer.add(name, tensor.detach())
    tmp = writer.finish(model.config, model.dtype)
    assert not (tmp_path / "out").exists()  # nothing under the final name before the commit
    expected = [(name, t, t.detach(), 0) for name, t in persistent_tensors(model)]
    assert read_back_problem(tmp, model, expected) is None
    writer.commit()
    assert not tmp.exists()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = random_batch()["input_ids"]
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, reloaded(input_ids=ids).logits)


def test_read_back_names_a_tensor_that_differs(tmp_path):
    model = tiny_model("mixtral")
    writer = HFDirWriter(tmp_path / "out", model)
    for name, tensor in persistent_tensors(model):
        writer.add(name, tensor.detach())
    tmp = writer.finish(model.config, model.dtype)
    name, tensor = next((n, t) for n, t in persistent_tensors(model) if n.endswith("experts.down_proj"))
    changed = tensor.detach().clone()
    changed[1, 0, 0] += 1.0
    problem = read_back_problem(tmp, model, [(name, tensor, changed, 0)])
    assert problem is not None and name in problem
