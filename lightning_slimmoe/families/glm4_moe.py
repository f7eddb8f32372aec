"""The GLM-4.5 / 4.6 / 4.7 adapter (`glm4_moe`): routed experts, DeepSeek-style shared experts, a sigmoid router
with a score-correction bias and group-limited routing, leading dense layers, GQA attention.

* ``mlp.shared_experts`` is built with width ``moe_intermediate_size * n_shared_experts``: its width follows
  every expert-width target (sliced to the same number of neurons per shared expert slot).
* ``mlp.gate.e_score_correction_bias [E]`` is sliced with the router when experts are removed, and the kept
  count must divide by ``n_group``.
* The first ``first_k_dense_replace`` layers have a dense MLP and are left as they are.
* Hub checkpoints also hold ``num_nextn_predict_layers`` (1) multi-token-prediction layers at
  ``model.layers.<num_hidden_layers>`` (Air: ``.46``); transformers does not build them and the checkpoint layout
  never takes a layer past ``num_hidden_layers`` for a decoder layer, so they are neither read nor exported
  (summary.json: ``"mtp": "dropped"``).
"""

from lightning_slimmoe.families import CheckpointKeys, MoEFamily, register

GLM4_MOE = register(MoEFamily(
    model_type="glm4_moe", width_field="moe_intermediate_size", num_experts_field="n_routed_experts",
    router_attr="gate", shared_expert_attr="shared_experts", shared_expert_count_field="n_shared_experts",
    expert_indexed=(("gate.e_score_correction_bias", 0),), expert_group_field="n_group", min_experts_per_group=2,
    mtp_layers_field="num_nextn_predict_layers", checkpoint_keys=CheckpointKeys(shared_expert="mlp.shared_experts")))
