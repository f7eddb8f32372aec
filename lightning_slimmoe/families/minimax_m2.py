"""The MiniMax-M2 adapter (`minimax_m2`): routed experts (hub keys ``block_sparse_moe.experts.{e}.w1/w3/w2``),
a router with a block-level ``e_score_correction_bias`` (sliced with it when experts are removed). Expert slimming
only: MiniMax-M2's q/k RMSNorms span all heads (``num_heads * head_dim``), so after removing groups their
statistics change and the model is no longer the same function; whole-group pruning is refused until measured.
The config's ``num_mtp_modules`` (3) multi-token-prediction modules are not built by transformers, so they are
neither read nor exported (summary.json: ``"mtp": "dropped"``).
"""

from lightning_slimmoe.families import PER_EXPERT_W123, MoEFamily, register

MINIMAX_M2 = register(MoEFamily(
    model_type="minimax_m2", width_field="intermediate_size", num_experts_field="num_local_experts",
    router_attr="gate", expert_indexed=(("e_score_correction_bias", 0),), mtp_layers_field="num_mtp_modules",
    attention_prunable=False,
    attention_not_prunable_reason=("MiniMax-M2's q_norm/k_norm normalise over all heads together "
                                   "(num_heads x head_dim), so removing groups changes every remaining head's "
                                   "normalisation; slim expert widths only"),
    checkpoint_keys=PER_EXPERT_W123))
