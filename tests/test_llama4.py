"""Llama-4 from its hub layout: the multimodal wrapper config (`llama4`, the language model under `text_config`), the
language model's tensors under `language_model.model.` and `language_model.lm_head`, a vision tower under
`vision_model.` (with its own `vision_model.model.layers.<i>.`) and `multi_modal_projector.`. The sharded (FSDP2) reader
reads it as published, to what stock `from_pretrained` gives; the tiny text-only model of the same family is covered
by every FAMILIES-parametrized test, the 2-rank pipeline from this layout by tests/test_families_2rank.py."""

from __future__ import annotations

import pytest
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from helpers import assert_sharded_read_equals_from_pretrained, random_keep, write_llama4_hub_checkpoint
from lightning_slimmoe.checkpoint_layout import CheckpointLayout, sharded_read_problem


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama4_hub")
    return path, write_llama4_hub_checkpoint(path)


def test_hub_keys_map_to_the_text_model_and_the_vision_tower_is_never_a_decoder_layer(hub):
    path, wrapper = hub
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "language_model.lm_head.weight" in keys and any(k.startswith("vision_model.model.layers.0.") for k in keys)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    assert type(model).__name__ == "Llama4ForCausalLM" and model.config.model_type == "llama4_text"
    layout = CheckpointLayout(wrapper.config)
    for name in model.state_dict():  # every text-model tensor has its hub key
        assert name in keys or layout.hub_key(name) in keys, name
    assert layout.hub_key("lm_head.weight") == "language_model.lm_head.weight"
    assert layout.hub_key("model.layers.1.feed_forward.experts.gate_up_proj") == (
        "language_model.model.layers.1.feed_forward.experts.gate_up_proj")
    for key in keys:
        if not key.startswith("language_model."):
            assert layout.decoder_layer(key) is None and layout.fused_key(key) is None, key
    assert layout.fused_key("language_model.model.layers.1.feed_forward.experts.down_proj").proj == "down_proj"
    assert sharded_read_problem(str(path), wrapper.config) is None


def test_sharded_reader_reads_the_hub_layout_as_from_pretrained_does(hub):
    path, _ = hub
    reference = AutoModelForCausalLM.from_pretrained(path).eval()
    assert_sharded_read_equals_from_pretrained(path, random_keep(reference, width=8, groups=1, shared_width=8, seed=2))
