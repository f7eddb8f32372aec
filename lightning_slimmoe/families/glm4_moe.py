"""The GLM-4.5 / 4.6 / 4.7 adapter (`glm4_moe`): routed experts, DeepSeek-style shared experts, a sigmoid router
with a score-correction bias and group-limited routing, leading dense layers, GQA attention.

* ``mlp.shared_experts`` is built with width ``moe_intermediate_size * n_shared_experts``: its width follows
  every expert-width target (sliced to the same number of neurons per shared expert slot).
* ``mlp.gate.e_score_correction_bias [E]`` is sliced with the router when experts are removed, and the kept
  count must divide by ``n_group``.
* The first ``first_k_dense_replace`` layers have a dense MLP and are left as they are.
* Hub checkpoints also hold a multi-token-prediction layer at ``model.layers.<num_hidden_layers>``; transformers
  does not build it and our key patterns only ever read decoder layers the model has, so it is not exported.
"""

from lightning_slimmoe.families import CheckpointKeys, MoEFamily, register

GLM4_MOE = register(MoEFamily(
    model_type="glm4_moe", width_field="moe_intermediate_size", num_experts_field="n_routed_experts",
    router_attr="gate", shared_expert_attr="shared_experts", shared_expert_count_field="n_shared_experts",
    expert_indexed=(("gate.e_score_correction_bias", 0),), expert_group_field="n_group", min_experts_per_group=2,
    checkpoint_keys=CheckpointKeys(shared_expert="mlp.shared_experts")))
