"""Parameter counts, computed on the meta device (no memory, no weights).

Active parameters follow the paper's model cards: every non-expert parameter (both embeddings, norms,
attention, routers, shared experts) plus ``top_k / num_experts`` of the routed-expert parameters. This
reproduces 6.64B for Phi-3.5-MoE and 2.36B for Phi-mini-MoE.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from lightning_slimmoe.distributed import is_fsdp1_sharded
from lightning_slimmoe.families import get_family
from lightning_slimmoe.models import model_on_meta


@dataclass(frozen=True)
class ParamCount:
    total: int
    active: int


def count_params(model: nn.Module) -> ParamCount:
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


def count_config_params(config) -> ParamCount:
    """``count_params`` of the model ``config`` describes, built on the meta device (no memory)."""
    get_family(config)
    return count_params(model_on_meta(config))
