"""Parameter counts, computed on the meta device (no memory, no weights).

Active parameters follow the paper's model cards: every non-expert parameter (both embeddings, norms,
attention, routers, shared experts) plus ``top_k / num_experts`` of the routed-expert parameters. This
reproduces 6.64B for Phi-3.5-MoE and 2.36B for Phi-mini-MoE.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModelForCausalLM

from lightning_slimmoe.families import get_family


@dataclass(frozen=True)
class ParamCount:
    total: int
    active: int


def count_params(model: nn.Module) -> ParamCount:
    from lightning_slimmoe.distributed import is_fsdp1_sharded

    if is_fsdp1_sharded(model):  # FSDP1's parameters are this rank's flat shards: count the architecture
        return count_config_params(model.config)
    family = get_family(model)
    expert_ids = set()
    for _, block in family.moe_blocks(model):
        expert_ids.update(id(p) for p in block.experts.parameters())
    seen, total, expert = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:  # tied embeddings count once
            continue
        seen.add(id(p))
        total += p.numel()
        if id(p) in expert_ids:
            expert += p.numel()
    config = model.config
    active = total - expert + expert * int(config.num_experts_per_tok) // family.num_experts(config)
    return ParamCount(total=total, active=active)


def meta_model(config) -> nn.Module:
    """The model a config describes, on the meta device: shapes without memory."""
    get_family(config)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def count_config_params(config) -> ParamCount:
    return count_params(meta_model(config))
