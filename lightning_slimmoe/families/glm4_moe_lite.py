"""The GLM-4.7-Flash adapter (`glm4_moe_lite`): DeepSeek-V3's design at 30B-A3B — MLA attention, routed experts,
GLM/DeepSeek-style shared experts, a sigmoid router with a score-correction bias and group-limited routing, and a
leading dense layer.

* Attention is MLA (``q_a_proj`` / ``q_b_proj``, ``kv_a_proj_with_mqa``, ``kv_b_proj``): one compressed key/value
  latent shared by all heads, no GQA groups to remove, so attention-group targets are refused (as for DeepSeek).
* The config's ``attribute_map`` maps ``head_dim`` to ``qk_rope_head_dim``: reading ``head_dim`` gives the rope dim
  (64), not a head's width (q/k 192 + 64, v 256), and writing it would rewrite the rope dim. Nothing here writes it:
  ``slim_config`` touches the attention fields of attention-prunable families only.
* ``mlp.shared_experts`` is built with width ``moe_intermediate_size * n_shared_experts``: it follows every
  expert-width target.
* ``mlp.gate.e_score_correction_bias [E]`` is sliced with the router when experts are removed; the router scores each
  of its ``n_group`` groups by the sum of its top-2 experts (GLM-4.7-Flash: one group of 64).
* Dense layers come from ``mlp_layer_types`` (transformers 5.23 derives it as one dense layer, then sparse ones;
  the hub config's ``first_k_dense_replace: 1`` says the same); they are left as they are.
* Hub checkpoints key experts per expert (``mlp.experts.{e}.gate_proj/up_proj/down_proj``) and hold one MTP layer at
  ``model.layers.<num_hidden_layers>`` (``num_nextn_predict_layers``: 1; transformers 5.23's config class has no
  such field, the hub config.json's value is kept as an extra attribute), which transformers does not build and the
  key patterns never read (summary.json: ``"mtp": "dropped"``).
"""

from lightning_slimmoe.families import CheckpointKeys, MoEFamily, register
from lightning_slimmoe.families.deepseek import MLA_NOT_PRUNABLE

GLM4_MOE_LITE = register(MoEFamily(
    model_type="glm4_moe_lite", width_field="moe_intermediate_size", num_experts_field="n_routed_experts",
    router_attr="gate", shared_expert_attr="shared_experts", shared_expert_count_field="n_shared_experts",
    expert_indexed=(("gate.e_score_correction_bias", 0),), expert_group_field="n_group", min_experts_per_group=2,
    attention_prunable=False, attention_not_prunable_reason=MLA_NOT_PRUNABLE,
    mtp_layers_field="num_nextn_predict_layers", checkpoint_keys=CheckpointKeys(shared_expert="mlp.shared_experts")))
