"""The Qwen3-Next adapter (`qwen3_next`): routed experts plus one shared expert with its own width and a sigmoid
gate (as Qwen2-MoE), and a hybrid stack: GatedDeltaNet linear-attention layers (left as they are) between
full-attention layers whose ``q_proj`` holds a query and an output gate per head (``2 * head_dim`` rows per head).
Whole GQA groups are pruned on the full-attention layers, two ``head_dim`` row blocks per query head."""

from lightning_slimmoe.families import CheckpointKeys, MoEFamily, register

QWEN3_NEXT = register(MoEFamily(
    model_type="qwen3_next", width_field="moe_intermediate_size", num_experts_field="num_experts",
    router_attr="gate", shared_expert_width_field="shared_expert_intermediate_size", q_rows_per_head=2,
    checkpoint_keys=CheckpointKeys(shared_expert="mlp.shared_expert")))
