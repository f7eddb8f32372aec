"""The Granite MoE adapters (`granitemoe`: granite-3.x-*-a*m; `granitemoeshared`; `granitemoehybrid`: Granite-4.0-H).

* The MoE block is the decoder layer's ``block_sparse_moe`` (a softmax top-k ``router`` over its raw logits and the
  standard fused experts, ``gate_up_proj [E, 2I, H]`` gate rows then up rows); its width is ``intermediate_size``.
  Hub checkpoints and ``save_pretrained`` key the experts fused under other names (``block_sparse_moe.input_linear
  .weight`` / ``output_linear.weight``, the router ``block_sparse_moe.router.layer.weight``): transformers' own
  conversion renames them whole, and the sharded reader follows that renaming (``loading.CheckpointReader``).
* ``granitemoeshared`` / ``granitemoehybrid`` add a shared MLP of width ``shared_intermediate_size`` (0 in a
  ``granitemoeshared`` config: none) that sits on the decoder layer, beside the MoE block (``layer.shared_mlp``),
  with gate and up fused in one ``input_linear [2I, H]`` (gate rows, then up rows) and ``output_linear [H, I]``. It is
  slimmed by its own target (``shared_expert_width``), like Qwen2-MoE's.
* ``granitemoehybrid`` stacks Mamba-2 layers (``layer_types``: ``mamba`` / ``attention`` in the hub config, which
  transformers 5.23 reads as ``linear_attention`` / ``full_attention``) with a few GQA attention layers. Mamba
  layers have no KV groups and are left as they are; every layer's MoE block and shared MLP are slimmed. Whole GQA
  groups are pruned on the attention layers (``attention_multiplier`` is a constant that does not depend on the
  head count; Granite-4.0-H's attention layers use no positional embedding, ``position_embedding_type: nope``).
"""

from lightning_slimmoe.families import CheckpointKeys, MoEFamily, register

_KEYS = CheckpointKeys(expert_block="block_sparse_moe", shared_expert="shared_mlp")

GRANITEMOE = register(MoEFamily(
    model_type="granitemoe", width_field="intermediate_size", num_experts_field="num_local_experts",
    router_attr="router", moe_block_attr="block_sparse_moe", checkpoint_keys=_KEYS))

GRANITEMOE_SHARED = register(MoEFamily(
    model_type="granitemoeshared", width_field="intermediate_size", num_experts_field="num_local_experts",
    router_attr="router", moe_block_attr="block_sparse_moe", shared_expert_width_field="shared_intermediate_size",
    shared_expert_attr="shared_mlp", shared_expert_beside_block=True, checkpoint_keys=_KEYS))

GRANITEMOE_HYBRID = register(MoEFamily(
    model_type="granitemoehybrid", width_field="intermediate_size", num_experts_field="num_local_experts",
    router_attr="router", moe_block_attr="block_sparse_moe", shared_expert_width_field="shared_intermediate_size",
    shared_expert_attr="shared_mlp", shared_expert_beside_block=True, checkpoint_keys=_KEYS))
