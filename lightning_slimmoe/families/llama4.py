"""The Llama-4 adapter (`llama4`, text model `llama4_text`: Llama-4-Scout-17B-16E / Maverick-17B-128E).

Each MoE layer (``feed_forward``: routed experts, a sigmoid top-1 ``router`` and one ``shared_expert``) alternates
with dense ``Llama4TextMLP`` layers (``interleave_moe_layer_step`` / ``moe_layers``; width ``intermediate_size_mlp``):
those have no experts and are left as they are. Attention is GQA on every layer (chunked-attention and NoPE layers
alike: neither the chunk size nor the weight-free L2 qk-norm depends on the head count), so whole groups are pruned on
all of them.

transformers 5.23 builds the shared expert with ``config.intermediate_size``, the routed width itself: its width is
tied to the routed width, so it is slimmed with every expert-width target (``shared_expert_tied``) and the slimmed
model reloads with stock ``from_pretrained``. The experts are undecorated and fused as ``gate_up_proj [E, H, 2I]``
(gate columns, then up columns) and ``down_proj [E, I, H]``, with the routing weight applied to the experts' input:
``slimming.check_expert_layout`` knows that layout by class (``LLAMA4_LAYOUT``).

The hub config is the multimodal wrapper (``model_type: llama4``, the language model under ``text_config``, of type
``llama4_text``) beside a vision tower; the slimmed and exported model is the text-only ``Llama4ForCausalLM``. Its
hub checkpoint keeps the language model under ``language_model.`` (``language_model.model.layers.<i>.``, and
``language_model.lm_head``), beside ``vision_model.*`` and ``multi_modal_projector.*``: the sharded loader reads that
layout as published (``CheckpointLayout.hub_key``), and never a vision-tower tensor.
"""

from lightning_slimmoe.families import CheckpointKeys, MoEFamily, register

LLAMA4 = register(MoEFamily(
    model_type="llama4", text_model_type="llama4_text", width_field="intermediate_size",
    num_experts_field="num_local_experts", router_attr="router", shared_expert_tied=True, moe_block_attr="feed_forward",
    checkpoint_keys=CheckpointKeys(expert_block="feed_forward", shared_expert="feed_forward.shared_expert",
                                   attention="self_attn", hub_decoder_layers="language_model.model.layers",
                                   hub_lm_head="language_model.lm_head"),
    export_note=("The export is the text-only causal LM (`Llama4ForCausalLM`, config `llama4_text`): a multimodal "
                 "teacher's vision tower (`vision_model.*`, `multi_modal_projector.*`) is not part of it.")))
