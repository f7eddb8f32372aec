"""Physical slicing: parity with the original, with a hand-written reference, and through save/reload."""

from __future__ import annotations

import re

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from helpers import ATTN_PRUNABLE, FAMILIES, random_batch, random_keep, tiny_config, tiny_model
from lightning_slimmoe.families import UnsupportedModelError, get_family, supported_model_types
from lightning_slimmoe.importance import ImportanceScores, compute_scores
from lightning_slimmoe.slimming import (
    KeepIndices, SlimTarget, check_expert_layout, expert_biases, expert_weights, remove_experts_, resolve_target,
    select_keep, shared_expert_weights, slim_config, slim_model_,
)


def logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"]).logits


def test_every_family_is_registered():
    assert set(FAMILIES) == set(supported_model_types())


def test_keep_all_is_bit_identical(family_name):
    model = tiny_model(family_name)
    batch = random_batch()
    before = logits(model, batch)
    scores = compute_scores(model, [], "random")
    target = resolve_target(model.config)  # no targets: current widths
    slim_model_(model, select_keep(scores, target))
    assert torch.equal(before, logits(model, batch))


def _reference_forward(model, keep: KeepIndices, heads_per_group: int, dim: int):
    """Patch ``model`` (the unsliced original) into an explicit, per-token, per-expert dense reference.

    Experts: a plain loop that uses only each expert's kept rows/columns. Attention: dropping a whole
    GQA group is the same as zeroing the o_proj input columns of its query heads (their outputs are
    then unused), so the reference zeroes those columns instead of slicing.
    """
    family = get_family(model)

    def make_forward(experts, keep_EW):
        gate_EIH, up_EIH, down_EHI = (w.detach().clone() for w in expert_weights(experts))
        biases = expert_biases(experts)  # gpt-oss: gate [E, I], up [E, I], down [E, H]
        if biases is not None:
            b_gate_EI, b_up_EI, b_down_EH = (b.detach().clone() for b in biases)

        def glu(e, kept, x):
            if biases is None:
                return experts.act_fn(gate_EIH[e][kept] @ x) * (up_EIH[e][kept] @ x)
            # gpt-oss's expert function written out: gate clamped above, up clamped both ways, (up + 1) * swish_alpha
            gate = (gate_EIH[e][kept] @ x + b_gate_EI[e][kept]).clamp(max=experts.limit)
            up = (up_EIH[e][kept] @ x + b_up_EI[e][kept]).clamp(-experts.limit, experts.limit)
            return (up + 1) * gate * torch.sigmoid(experts.alpha * gate)

        def forward(hidden_NH, top_k_index_NK, top_k_weights_NK):
            out = torch.zeros_like(hidden_NH)
            for n in range(hidden_NH.shape[0]):
                for slot in range(top_k_index_NK.shape[1]):
                    e = int(top_k_index_NK[n, slot])
                    kept = keep_EW[e]
                    x = hidden_NH[n]
                    y = down_EHI[e][:, kept] @ glu(e, kept, x)
                    if biases is not None:
                        y = y + b_down_EH[e]
                    out[n] += top_k_weights_NK[n, slot] * y
            return out

        def forward_input_scaled(routed_in_MH):
            # Llama-4: rows e * N + n hold token n scaled by its routing weight for expert e (0 where unrouted);
            # every row goes through its own expert and the caller sums the experts' rows per token
            x_ENH = routed_in_MH.view(gate_EIH.shape[0], -1, routed_in_MH.shape[-1])
            out_ENH = torch.zeros_like(x_ENH)
            for e in range(x_ENH.shape[0]):
                kept = keep_EW[e]
                for n in range(x_ENH.shape[1]):
                    out_ENH[e, n] = down_EHI[e][:, kept] @ glu(e, kept, x_ENH[e, n])
            return out_ENH.reshape(routed_in_MH.shape)
        return forward_input_scaled if check_expert_layout(experts).input_scaled else forward

    for layer, block in family.moe_blocks(model):
        block.experts.forward = make_forward(block.experts, keep.experts[layer])
    for layer, shared in family.shared_experts(model):
        if layer in keep.shared:
            w_down_HI = shared_expert_weights(shared)[2]
            dropped = torch.ones(w_down_HI.shape[1], dtype=torch.bool)
            dropped[keep.shared[layer]] = False
            with torch.no_grad():
                w_down_HI[:, dropped] = 0.0  # a dropped shared neuron contributes nothing
    with torch.no_grad():
        for layer, attn in family.attention_modules(model):
            dropped = torch.ones(model.config.num_key_value_heads, dtype=torch.bool)
            dropped[keep.groups[layer]] = False
            cols = attn.o_proj.weight.view(attn.o_proj.out_features, -1, heads_per_group * dim)
            cols[:, dropped] = 0.0


def test_random_keep_matches_explicit_reference(family_name):
    model = tiny_model(family_name)
    reference = tiny_model(family_name)
    batch = random_batch()
    groups = 1 if family_name in ATTN_PRUNABLE else model.config.num_key_value_heads
    keep = random_keep(model, width=16, groups=groups, shared_width=12, seed=3)
    dim = model.config.head_dim if getattr(model.config, "head_dim", None) else 8
    heads_per_group = model.config.num_attention_heads // model.config.num_key_value_heads
    slim_model_(model, keep)
    _reference_forward(reference, keep, heads_per_group, dim)
    family = get_family(model)
    assert family.expert_width(model.config) == 16
    assert model.config.num_key_value_heads == groups
    torch.testing.assert_close(logits(model, batch), logits(reference, batch), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family_name", FAMILIES)
def test_slim_save_reload_with_stock_transformers(family_name, tmp_path):
    model = tiny_model(family_name)
    batch = random_batch()
    groups = 1 if family_name in ATTN_PRUNABLE else model.config.num_key_value_heads
    slim_model_(model, random_keep(model, width=8, groups=groups, shared_width=12, seed=1))
    if family_name in ATTN_PRUNABLE:
        assert model.config.num_attention_heads * model.config.head_dim != model.config.hidden_size
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(logits(model, batch), logits(reloaded, batch))
    assert get_family(reloaded).expert_width(reloaded.config) == 8


def test_slim_config_matches_sliced_model(family_name):
    model = tiny_model(family_name)
    groups = 1 if family_name in ATTN_PRUNABLE else model.config.num_key_value_heads
    target = resolve_target(model.config, expert_width=8, attention_groups=groups,
                            shared_expert_width=12 if family_name == "qwen2_moe" else None)
    config = slim_config(model.config, target)
    scores = compute_scores(model, [], "magnitude")
    slim_model_(model, select_keep(scores, target))
    fresh = AutoModelForCausalLM.from_config(config)
    assert {k: v.shape for k, v in fresh.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


@pytest.mark.parametrize("model_json, field", [("deepseek-v3.json", "num_nextn_predict_layers"),
                                               ("glm-4.5-air.json", "num_nextn_predict_layers"),
                                               ("minimax-m2.json", "num_mtp_modules")])
def test_slim_config_counts_no_mtp_layers(model_json, field):
    """The slimmed (exported) model has none of the hub's multi-token-prediction layers, so its config counts none."""
    config = AutoConfig.from_pretrained(f"conf/models/{model_json}")
    assert getattr(config, field) >= 1
    family = get_family(config)
    slimmed = slim_config(config, resolve_target(config, expert_width=family.expert_width(config) // 2))
    assert getattr(slimmed, field) == 0 and getattr(config, field) >= 1  # the teacher's config is left as it is


def test_fraction_targets_and_rounding():
    config = AutoConfig.from_pretrained("conf/models/phi-3.5-moe.json")
    assert resolve_target(config, expert_width=0.15).expert_width == 960
    assert resolve_target(config, expert_width=0.07, round_to=64).expert_width == 448
    assert resolve_target(config, expert_width=960, attention_groups=4).attention_groups == 4


@pytest.mark.parametrize("kwargs, message", [
    (dict(expert_width=0), "expert_width=0"),
    (dict(expert_width=-3), "expert_width=-3"),
    (dict(expert_width=6401), "larger than the current width 6400"),
    (dict(expert_width=1.5), "fraction must lie in"),
    (dict(expert_width=0.0), "fraction must lie in"),
    (dict(expert_width=1000, round_to=64), "multiple of round_to=64"),
    (dict(expert_width=1001), "multiple of 8"),
    (dict(attention_groups=3), "must divide the current 8"),
    (dict(attention_groups=16), "exceeds the current 8"),
    (dict(attention_groups=0), "attention_groups=0"),
    (dict(shared_expert_width=8), "has no shared expert"),
])
def test_bad_targets_name_field_value_and_rule(kwargs, message):
    config = AutoConfig.from_pretrained("conf/models/phi-3.5-moe.json")
    with pytest.raises(ValueError, match=message):
        resolve_target(config, **kwargs)


def test_olmoe_refuses_attention_pruning():
    with pytest.raises(ValueError, match="not supported for model_type 'olmoe'"):
        resolve_target(tiny_config("olmoe"), attention_groups=2)


def test_unsupported_family_lists_supported():
    dense = AutoConfig.for_model("llama", vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2)
    listed = re.escape(str(supported_model_types()))
    assert "'deepseek_v3'" in listed and "'mixtral'" in listed and "'qwen3_next'" in listed
    with pytest.raises(UnsupportedModelError, match=r"'llama'.*" + listed):
        get_family(dense)


def test_uniform_widths_enforced():
    model = tiny_model("mixtral")
    keep = random_keep(model, width=8, groups=2)
    keep.experts[1] = keep.experts[1][:, :6]
    with pytest.raises(ValueError, match="uniform"):
        slim_model_(model, keep)


def _get(module, dotted: str):
    owner, _, attr = dotted.rpartition(".")
    return getattr(module.get_submodule(owner) if owner else module, attr, None)


def test_expert_removal_updates_router_and_reloads(family_name, tmp_path):
    model = tiny_model(family_name)
    batch = random_batch()
    full = logits(model, batch)
    keep_all = {layer: torch.arange(4) for layer, _ in get_family(model).moe_blocks(model)}
    remove_experts_(model, keep_all)
    assert torch.equal(full, logits(model, batch))
    family = get_family(model)
    if family.expert_groups(model.config) == 2:  # 4 experts in 2 groups: no removal keeps the routing valid
        with pytest.raises(ValueError, match="divisible by n_group=2"):
            remove_experts_(model, {layer: torch.tensor([0, 2, 3]) for layer in keep_all})
        if family.min_experts_per_group == 2:
            with pytest.raises(ValueError, match="at least 4 experts"):
                remove_experts_(model, {layer: torch.tensor([0, 3]) for layer in keep_all})
        model = tiny_model(family_name, n_group=1, topk_group=1)  # the rest with ungrouped routing
    kept = torch.tensor([0, 2, 3])
    before = {(layer, name): tensor.detach().clone() for layer, block in family.moe_blocks(model)
              for name, _ in family.expert_indexed_tensors() if (tensor := _get(block, name)) is not None}
    remove_experts_(model, {layer: kept for layer in keep_all})
    assert family.num_experts(model.config) == len(kept)
    for layer, block in family.moe_blocks(model):  # router rows and score-correction biases of the kept experts
        for name, dim in family.expert_indexed_tensors():
            if (layer, name) in before:
                assert torch.equal(_get(block, name), before[(layer, name)].index_select(dim, kept)), name
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(logits(model, batch), logits(reloaded, batch))
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        remove_experts_(model, {layer: torch.tensor([1]) for layer in keep_all})


@pytest.mark.parametrize("family_name", ["deepseek_v2", "deepseek_v3", "minimax_m2"])
def test_families_without_gqa_groups_refuse_attention_targets(family_name):
    config = tiny_config(family_name)
    with pytest.raises(ValueError, match=r"attention_groups=1: not supported for model_type .*slim expert widths only"):
        resolve_target(config, attention_groups=1)
    assert resolve_target(config, expert_width=8).expert_width == 8  # experts still slim


def test_mla_layers_have_no_attention_to_score_or_slice():
    model = tiny_model("deepseek_v3")
    assert list(get_family(model).attention_modules(model)) == []
    assert compute_scores(model, [], "magnitude").groups == {}


def test_linear_attention_layers_are_left_alone():
    model = tiny_model("qwen3_next")  # layer 0: GatedDeltaNet, layer 1: gated full attention
    assert [layer for layer, _ in get_family(model).attention_modules(model)] == [1]
    linear = {k: v.clone() for k, v in model.model.layers[0].linear_attn.state_dict().items()}
    slim_model_(model, random_keep(model, width=8, groups=1, shared_width=12, seed=2))
    assert model.model.layers[1].self_attn.q_proj.out_features == 2 * 2 * 8  # 2 heads x (query + gate) x head_dim
    assert all(torch.equal(linear[k], v) for k, v in model.model.layers[0].linear_attn.state_dict().items())


@pytest.mark.parametrize("family_name", ["glm4_moe", "deepseek_v3", "ernie4_5_moe"])
def test_tied_shared_expert_width_follows_the_routed_width(family_name, tmp_path):
    model = tiny_model(family_name)
    family = get_family(model)
    with pytest.raises(ValueError, match=r"shared_expert_width=8: .* builds its shared experts with width"):
        resolve_target(model.config, expert_width=16, shared_expert_width=8)
    target = resolve_target(model.config, expert_width=16)
    count = int(getattr(model.config, family.shared_expert_count_field))
    assert target.shared_expert_width == 16 * count
    slim_model_(model, select_keep(compute_scores(model, [], "magnitude"), target))
    for _, mlp in family.shared_experts(model):
        assert mlp.gate_proj.out_features == 16 * count
    model.save_pretrained(tmp_path)  # stock code rebuilds the shared experts from the routed width
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    batch = random_batch()
    assert torch.equal(logits(model, batch), logits(reloaded, batch))


def test_group_limited_routing_bounds_expert_removal():
    from lightning_slimmoe.slimming import check_expert_count

    config = tiny_config("deepseek_v3", n_routed_experts=8)  # n_group=2, groups scored by their top-2
    check_expert_count(config, 4)
    with pytest.raises(ValueError, match="divisible by n_group=2"):
        check_expert_count(config, 5)
    with pytest.raises(ValueError, match="at least 4 experts"):
        check_expert_count(config, 2)


def test_fused_experts_in_another_layout_are_refused():
    model = tiny_model("qwen3_moe")
    experts = next(get_family(model).moe_blocks(model))[1].experts
    experts.is_transposed = True  # e.g. Qwen3-VL / gpt-oss store gate_up_proj as [E, H, 2I]
    with pytest.raises(NotImplementedError, match=r"layout \{'is_transposed': True"):
        expert_weights(experts)
