"""Tiny random configs of every supported family, shared by all tests (LitGPT style)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

FAMILIES = ["phimoe", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe"]
VOCAB = 96

_COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               head_dim=8, num_experts_per_tok=2, max_position_embeddings=128, tie_word_embeddings=False)

_PER_FAMILY = {
    "phimoe": dict(intermediate_size=24, num_local_experts=4, attention_bias=True, lm_head_bias=True,
                   router_jitter_noise=0.0, input_jitter_noise=0.0),
    "mixtral": dict(intermediate_size=24, num_local_experts=4),
    "qwen2_moe": dict(moe_intermediate_size=24, num_experts=4, shared_expert_intermediate_size=20, qkv_bias=True,
                      intermediate_size=40),
    "qwen3_moe": dict(moe_intermediate_size=24, num_experts=4, intermediate_size=40),
    "olmoe": dict(intermediate_size=24, num_experts=4, num_key_value_heads=4),
}


def tiny_config(model_type: str, **overrides):
    kwargs = {**_COMMON, **_PER_FAMILY[model_type], **overrides}
    if model_type == "olmoe":
        kwargs.pop("head_dim")  # OLMoE sizes q/k norms from hidden_size: keep heads * head_dim == hidden
    return AutoConfig.for_model(model_type, **kwargs)


def tiny_model(model_type: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides))
    # Random init of every parameter (router weights start at zero for some families).
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model.eval()


def random_batch(batch_size: int = 2, seq_len: int = 8, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch_size, seq_len + 1), generator=gen)
    return {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}


@pytest.fixture(params=FAMILIES)
def family_name(request):
    return request.param
