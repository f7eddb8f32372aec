"""The DeepSeek-V2 / V3 adapters (`deepseek_v2`, `deepseek_v3`; also Moonlight and Kimi-style checkpoints):
routed experts and DeepSeek shared experts; attention is MLA, which has no GQA groups.

* MLA (``q_a_proj`` / ``q_b_proj``, ``kv_a_proj_with_mqa``, ``kv_b_proj``) compresses keys and values into one
  latent shared by all heads: there is no KV group whose rows could be removed, so attention-group targets are
  refused and these models are slimmed by expert width only.
* ``mlp.shared_experts`` has width ``moe_intermediate_size * n_shared_experts`` and follows the routed width.
* V3 routes with a sigmoid and ``mlp.gate.e_score_correction_bias``; both use group-limited routing over
  ``n_group`` groups (expert removal keeps a count divisible by it). Leading dense layers
  (``first_k_dense_replace``) are left as they are.
* V3 / R1 hub checkpoints hold ``num_nextn_predict_layers`` (1) multi-token-prediction layers at
  ``model.layers.<num_hidden_layers>`` (``model.layers.61``, 11.5B): transformers does not build them and the
  checkpoint layout never takes a layer past ``num_hidden_layers`` for a decoder layer, so they are neither read nor
  exported (summary.json: ``"mtp": "dropped"``). V2 has none.
"""

from lightning_slimmoe.families import CheckpointKeys, MoEFamily, register

# Why attention groups are refused for every MLA family (DeepSeek-V2 / V3, GLM-4.7-Flash)
MLA_NOT_PRUNABLE = ("multi-head latent attention (MLA) shares one compressed key/value latent across all heads, so it "
                    "has no GQA groups to remove; slim expert widths only")

DEEPSEEK_V2 = register(MoEFamily(
    model_type="deepseek_v2", width_field="moe_intermediate_size", num_experts_field="n_routed_experts",
    router_attr="gate", shared_expert_attr="shared_experts", shared_expert_count_field="n_shared_experts",
    expert_group_field="n_group", attention_prunable=False, attention_not_prunable_reason=MLA_NOT_PRUNABLE,
    checkpoint_keys=CheckpointKeys(shared_expert="mlp.shared_experts")))

DEEPSEEK_V3 = register(MoEFamily(
    model_type="deepseek_v3", width_field="moe_intermediate_size", num_experts_field="n_routed_experts",
    router_attr="gate", shared_expert_attr="shared_experts", shared_expert_count_field="n_shared_experts",
    expert_indexed=(("gate.e_score_correction_bias", 0),), expert_group_field="n_group", min_experts_per_group=2,
    attention_prunable=False, attention_not_prunable_reason=MLA_NOT_PRUNABLE,
    mtp_layers_field="num_nextn_predict_layers", checkpoint_keys=CheckpointKeys(shared_expert="mlp.shared_experts")))
