"""OLMoE. Expert slimming only.

OLMoE's q/k RMSNorms normalise the *whole* projection (``q_norm`` over ``hidden_size``), and stock
transformers builds them from ``hidden_size``, not from ``num_attention_heads * head_dim``; a model with
fewer heads would no longer load with ``from_pretrained``. So whole-group attention pruning is refused.
"""

from lightning_slimmoe.families import MoEFamily, register

OLMOE = register(MoEFamily(
    model_type="olmoe", width_field="intermediate_size", num_experts_field="num_experts", router_attr="gate",
    attention_prunable=False,
    attention_not_prunable_reason=(
        "OLMoE's q_norm/k_norm span the whole q/k projection and transformers sizes them from hidden_size, "
        "so a model with fewer attention heads would not reload with from_pretrained; slim expert widths only"
    ),
))
