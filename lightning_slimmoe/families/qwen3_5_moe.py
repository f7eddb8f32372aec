"""The Qwen3.5-MoE / Qwen3.6-MoE adapter (`qwen3_5_moe`; Qwen3.5-35B-A3B / 122B-A10B / 397B-A17B, Qwen3.6-35B-A3B).

The language model is Qwen3-Next's: routed experts plus one shared expert with its own width and a sigmoid gate, and
a hybrid stack of GatedDeltaNet linear-attention layers (left as they are) and gated full-attention layers whose
``q_proj`` holds a query and an output gate per head (``2 * head_dim`` rows per head); whole GQA groups are pruned on
the full-attention layers only.

What differs is the packaging. The hub config is the multimodal wrapper (``model_type: qwen3_5_moe``) with the
language model's fields under ``text_config`` (``qwen3_5_moe_text``) beside a vision tower, and the hub keys sit under
``model.language_model.`` (experts already fused), the vision tower under ``model.visual.`` and one
multi-token-prediction layer under ``mtp.``. ``AutoModelForCausalLM`` builds the text-only
``Qwen3_5MoeForCausalLM`` from either config and reads the wrapper's checkpoint (dropping ``model.visual.*`` and
``mtp.*``), so that is what is slimmed and exported: a stock text-only causal LM. Neither the vision tower nor the
MTP layer is in the export (summary.json: ``"mtp": "dropped"``).
"""

from lightning_slimmoe.families import CheckpointKeys, MoEFamily, register

QWEN3_5_MOE = register(MoEFamily(
    model_type="qwen3_5_moe", text_model_type="qwen3_5_moe_text", width_field="moe_intermediate_size",
    num_experts_field="num_experts", router_attr="gate", shared_expert_width_field="shared_expert_intermediate_size",
    q_rows_per_head=2, mtp_layers_field="mtp_num_hidden_layers",
    checkpoint_keys=CheckpointKeys(shared_expert="mlp.shared_expert", hub_decoder_layers="model.language_model.layers"),
    export_note=("The export is the text-only causal LM (`Qwen3_5MoeForCausalLM`, config `qwen3_5_moe_text`): a "
                 "multimodal teacher's vision tower (`model.visual.*`) is not part of it.")))
