"""Qwen1.5-MoE / Qwen2-MoE: routed experts plus one always-on shared expert behind a sigmoid gate.

The shared expert is a dense GLU MLP (``shared_expert.{gate,up,down}_proj``) and is slimmed by its own
target (``shared_expert_width``); ``shared_expert_gate`` maps hidden -> 1 and is not touched.
"""

from lightning_slimmoe.families import CheckpointKeys, MoEFamily, register

QWEN2_MOE = register(MoEFamily(model_type="qwen2_moe", width_field="moe_intermediate_size",
                               num_experts_field="num_experts", router_attr="gate",
                               shared_expert_width_field="shared_expert_intermediate_size",
                               checkpoint_keys=CheckpointKeys(shared_expert="mlp.shared_expert")))
