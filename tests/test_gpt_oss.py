"""gpt-oss specifics (the FAMILIES-parametrized tests cover the rest): the transposed, interleaved expert layout read
from transformers' markers (and other layouts still refused), criteria through the real clamped GLU and its biases,
attention sinks pruned with their heads, expert biases under expert removal, and MXFP4 hub checkpoints dequantized
on load (single process, the sharded reader, a two-stage run from an MXFP4 teacher dir)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

from helpers import make_teacher_dir, random_batch, random_keep, read_summary, tiny_model, tiny_recipe, to_mxfp4_
from lightning_slimmoe.config import ConfigError
from lightning_slimmoe.families import get_family
from lightning_slimmoe.importance import compute_scores
from lightning_slimmoe.loading import materialize_, meta_model
from lightning_slimmoe.slimming import (GPT_OSS_LAYOUT, check_expert_layout, expert_biases, expert_weights,
                                        remove_experts_, resolve_target, select_keep, slim_model_)
from lightning_slimmoe.sources import check_weight_files, load_model


def logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"]).logits


def experts_of(model, layer=0):
    return model.model.layers[layer].mlp.experts


def assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert sa[name].dtype == sb[name].dtype and torch.equal(sa[name], sb[name]), name


# --- layout --------------------------------------------------------------------------------------------------------
def test_layout_is_read_from_the_markers_and_unknown_ones_are_refused():
    from transformers.models.aria.configuration_aria import AriaTextConfig
    from transformers.models.aria.modeling_aria import AriaExperts

    experts = experts_of(tiny_model("gpt_oss"))
    assert check_expert_layout(experts) == GPT_OSS_LAYOUT
    # Aria: gate_up_proj [E, H, 2I] transposed but concatenated (gate block, then up block), no biases
    aria = AriaExperts(AriaTextConfig(moe_num_experts=2, hidden_size=8, intermediate_size=4, num_attention_heads=2,
                                     num_key_value_heads=1))
    with pytest.raises(NotImplementedError, match=r"AriaExperts: fused experts in layout \{'is_transposed': True, "
                                                  r"'is_concatenated': True"):
        check_expert_layout(aria)
    experts.is_concatenated = True  # gpt-oss's shapes declared concatenated: not a layout that is sliced
    with pytest.raises(NotImplementedError, match="not supported"):
        expert_weights(experts)


def test_interleaved_pairs_and_biases_stay_with_their_neuron():
    model = tiny_model("gpt_oss")
    experts = experts_of(model)
    gate, up, down = (w.detach().clone() for w in expert_weights(experts))
    b_gate, b_up, b_down = (b.detach().clone() for b in expert_biases(experts))
    # neuron 5 of expert 1 owns columns 10 (gate) and 11 (up)
    assert torch.equal(gate[1, 5], experts.gate_up_proj[1, :, 10])
    assert torch.equal(up[1, 5], experts.gate_up_proj[1, :, 11])
    keep = random_keep(model, width=8, groups=2, seed=5)
    slim_model_(model, keep)
    k_EW = keep.experts[0]
    assert experts.gate_up_proj.shape == (4, 32, 16) and experts.down_proj.shape == (4, 8, 32)
    for e in range(4):
        assert torch.equal(experts.gate_up_proj[e, :, ::2], gate[e, k_EW[e]].T)
        assert torch.equal(experts.gate_up_proj[e, :, 1::2], up[e, k_EW[e]].T)
        assert torch.equal(experts.gate_up_proj_bias[e, ::2], b_gate[e, k_EW[e]])
        assert torch.equal(experts.gate_up_proj_bias[e, 1::2], b_up[e, k_EW[e]])
        assert torch.equal(experts.down_proj[e], down[e][:, k_EW[e]].T)
    assert torch.equal(experts.down_proj_bias, b_down)  # per expert, not per neuron


# --- criteria through the real expert function -----------------------------------------------------------------
def _clamped_glu(experts, e, x_NH):
    gate = (x_NH @ expert_weights(experts)[0][e].T + expert_biases(experts)[0][e]).clamp(max=experts.limit)
    up = (x_NH @ expert_weights(experts)[1][e].T + expert_biases(experts)[1][e]).clamp(-experts.limit, experts.limit)
    return (up + 1) * gate * torch.sigmoid(experts.alpha * gate)


def test_activation_scores_are_the_clamped_glu_magnitudes():
    model = tiny_model("gpt_oss", swiglu_limit=0.3)  # a limit the random activations exceed: clamping matters
    batch = random_batch()
    inputs = {}
    hook = experts_of(model, 1).register_forward_hook(lambda m, args, out: inputs.update(x=args[0], idx=args[1]))
    scores = compute_scores(model, [batch], "activation")
    hook.remove()
    experts = experts_of(model, 1)
    with torch.no_grad():
        for e in range(4):
            routed = (inputs["idx"] == e).any(-1)
            if not routed.any():
                continue
            a_NI = _clamped_glu(experts, e, inputs["x"][routed])
            torch.testing.assert_close(scores.experts[1][e], a_NI.abs().mean(0), rtol=1e-5, atol=1e-6)
            gate = inputs["x"][routed] @ expert_weights(experts)[0][e].T + expert_biases(experts)[0][e]
            assert (gate > experts.limit).any()  # the clamp was hit, so a generic GLU would score differently


def test_kd_taylor_counts_the_gate_and_up_biases_of_each_neuron():
    from lightning_slimmoe.distill import KDConfig, distill_loss, teacher_topk

    student, teacher = tiny_model("gpt_oss", seed=1), tiny_model("gpt_oss", seed=2)
    batch = random_batch()
    kd = KDConfig(top_k=5, temperature=2.0)
    scores = compute_scores(student, [batch], "kd_taylor", teacher=teacher, kd=kd)
    with torch.no_grad():
        t_vals, t_ids = teacher_topk(teacher.model(input_ids=batch["input_ids"]).last_hidden_state.flatten(0, 1),
                                     teacher.get_output_embeddings(), kd.top_k, kd.chunk_tokens)
    hidden = student.model(input_ids=batch["input_ids"]).last_hidden_state.flatten(0, 1)
    distill_loss(hidden, student.get_output_embeddings(), batch["labels"].flatten(), t_vals, t_ids,
                 KDConfig(top_k=5, temperature=2.0, lm_weight=0.0, tail_bucket=False)).loss.backward()
    experts = experts_of(student, 0)
    t = lambda p: (p * p.grad).abs()  # noqa: E731
    gate_up, bias, down = t(experts.gate_up_proj), t(experts.gate_up_proj_bias), t(experts.down_proj)
    want_EI = (gate_up.sum(1)[:, ::2] + gate_up.sum(1)[:, 1::2] + bias[:, ::2] + bias[:, 1::2] + down.sum(2))
    torch.testing.assert_close(scores.experts[0], want_EI, rtol=1e-4, atol=1e-7)
    assert bias.sum() > 0


# --- attention sinks, router and expert biases ------------------------------------------------------------------
def test_group_pruning_keeps_the_sinks_of_the_kept_heads():
    model = tiny_model("gpt_oss")
    sinks = {layer: attn.self_attn.sinks.detach().clone() for layer, attn in enumerate(model.model.layers)}
    router_bias = model.model.layers[0].mlp.router.bias.detach().clone()
    target = resolve_target(model.config, expert_width=16, attention_groups=1)
    scores = compute_scores(model, [], "magnitude")
    keep = select_keep(scores, target)
    slim_model_(model, keep)
    for layer, layer_module in enumerate(model.model.layers):
        g = int(keep.groups[layer][0])  # 4 heads in 2 groups: group g owns heads 2g, 2g+1
        assert torch.equal(layer_module.self_attn.sinks, sinks[layer][2 * g:2 * g + 2])
    assert torch.equal(model.model.layers[0].mlp.router.bias, router_bias)  # width slimming keeps the router
    assert model.config.num_attention_heads == 2 and model.config.num_key_value_heads == 1
    # magnitude group scores include the sinks: a group with huge sinks is kept
    model = tiny_model("gpt_oss")
    with torch.no_grad():
        for layer_module in model.model.layers:
            layer_module.self_attn.sinks[:2] = 0.0
            layer_module.self_attn.sinks[2:] = 100.0
    scores = compute_scores(model, [], "magnitude")
    assert all(int(s.argmax()) == 1 for s in scores.groups.values())


def test_expert_removal_slices_router_and_expert_biases():
    model = tiny_model("gpt_oss")
    experts = experts_of(model)
    before = {n: getattr(experts, n).detach().clone() for n in ("gate_up_proj_bias", "down_proj_bias")}
    router_bias = model.model.layers[0].mlp.router.bias.detach().clone()
    kept = torch.tensor([0, 2, 3])
    remove_experts_(model, {0: kept, 1: kept})
    for name, value in before.items():
        assert torch.equal(getattr(experts, name), value[kept]), name
    assert torch.equal(model.model.layers[0].mlp.router.bias, router_bias[kept])
    assert get_family(model).num_experts(model.config) == 3


# --- MXFP4 hub checkpoints ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mxfp4_pair(tmp_path_factory):
    """An MXFP4 gpt-oss checkpoint and its dequantized fp32 twin."""
    root = tmp_path_factory.mktemp("mxfp4")
    model = tiny_model("gpt_oss", intermediate_size=64)  # hidden 32 and width 64: whole 32-value blocks
    model.save_pretrained(root / "mxfp4")
    dense = to_mxfp4_(root / "mxfp4")
    with torch.no_grad():
        for name, value in dense.items():
            model.get_parameter(name).copy_(value)
    model.save_pretrained(root / "twin")
    return root / "mxfp4", root / "twin"


def test_mxfp4_checkpoint_loads_as_its_dequantized_twin(mxfp4_pair):
    mxfp4, twin = mxfp4_pair
    assert any(k.endswith("_blocks") for k in load_file(mxfp4 / "model.safetensors"))
    check_weight_files("teacher", str(mxfp4))
    for dtype in (torch.float32, torch.bfloat16):
        got = load_model(str(mxfp4), dtype)
        assert "quantization_config" not in got.config.to_dict()
        assert_same_state(got, AutoModelForCausalLM.from_pretrained(twin, dtype=dtype))


def test_mxfp4_and_twin_give_the_same_slimmed_model_and_export(mxfp4_pair, tmp_path):
    mxfp4, twin = mxfp4_pair
    batch = random_batch()
    slimmed = []
    for source in (mxfp4, twin):
        model = load_model(str(source), torch.float32)
        target = resolve_target(model.config, expert_width=0.5, attention_groups=1)
        keep = select_keep(compute_scores(model, [batch], "activation"), target)
        slimmed.append((slim_model_(model, keep), keep))
    (a, keep_a), (b, keep_b) = slimmed
    assert keep_a.digest() == keep_b.digest()
    assert_same_state(a, b)
    # the sharded reader applies the keep to the MXFP4 checkpoint at read time
    sharded = meta_model(str(mxfp4), torch.float32, keep=keep_a)
    materialize_(sharded, "cpu")
    assert_same_state(sharded.eval(), a)
    a.save_pretrained(tmp_path / "export")
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert "quantization_config" not in config and config["intermediate_size"] == 32
    assert not any(k.endswith(("_blocks", "_scales")) for k in load_file(tmp_path / "export" / "model.safetensors"))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    assert torch.equal(logits(a.eval(), batch), logits(reloaded, batch))


def test_incomplete_mxfp4_checkpoints_are_clear_errors(mxfp4_pair, tmp_path):
    mxfp4, _ = mxfp4_pair
    broken = Path(shutil.copytree(mxfp4, tmp_path / "broken"))
    victim = "model.layers.1.mlp.experts.down_proj_scales"
    state = load_file(broken / "model.safetensors")
    save_file({k: v for k, v in state.items() if k != victim}, str(broken / "model.safetensors"))
    with pytest.raises(ConfigError, match=f"down_proj_blocks is MXFP4-packed but its {victim} is missing"):
        check_weight_files("teacher", str(broken))
    undeclared = Path(shutil.copytree(mxfp4, tmp_path / "undeclared"))
    config = json.loads((undeclared / "config.json").read_text())
    config.pop("quantization_config")
    (undeclared / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="declares no quant_method='mxfp4'"):
        check_weight_files("teacher", str(undeclared))


def test_two_stage_run_from_an_mxfp4_teacher_dir(tmp_path, corpus_file):
    from lightning_slimmoe.cli import main

    teacher = Path(make_teacher_dir(tmp_path / "teacher", "gpt_oss", corpus_file))
    to_mxfp4_(teacher, scales=(119, 122))  # small values, as the tamed teacher's
    assert AutoConfig.from_pretrained(teacher).quantization_config["quant_method"] == "mxfp4"
    stages = [{"name": "a", "expert_width": 16, "calibration_tokens": 128, "max_tokens": 256},
              {"name": "b", "expert_width": 8, "attention_groups": 1, "calibration_tokens": 128, "max_tokens": 256}]
    main(["--config", tiny_recipe(tmp_path, str(teacher), corpus_file, stages=stages)])
    summary = read_summary(tmp_path / "run")
    assert [s["expert_width"] for s in summary["stages"]] == [16, 8]
    final = Path(summary["final_dir"])
    assert "quantization_config" not in json.loads((final / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(final)
    assert model.config.num_key_value_heads == 1 and model.model.layers[0].self_attn.sinks.shape == (2,)
