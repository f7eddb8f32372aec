"""The ERNIE-4.5-MoE adapter (`ernie4_5_moe`): routed experts, shared experts whose width is
``moe_intermediate_size * moe_num_shared_experts``, a router with ``moe_statics.e_score_correction_bias [1, E]``
(sliced along its expert dim when experts are removed), GQA attention with biases."""

from lightning_slimmoe.families import CheckpointKeys, MoEFamily, register

ERNIE4_5_MOE = register(MoEFamily(
    model_type="ernie4_5_moe", width_field="moe_intermediate_size", num_experts_field="moe_num_experts",
    router_attr="gate", shared_expert_attr="shared_experts", shared_expert_count_field="moe_num_shared_experts",
    expert_indexed=(("gate.moe_statics.e_score_correction_bias", 1),),
    checkpoint_keys=CheckpointKeys(shared_expert="mlp.shared_experts")))
