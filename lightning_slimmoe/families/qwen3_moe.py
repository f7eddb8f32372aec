"""The Qwen3-MoE adapter: per-head q/k RMSNorms over ``head_dim`` (untouched by group pruning)."""

from lightning_slimmoe.families import MoEFamily, register

QWEN3_MOE = register(MoEFamily(model_type="qwen3_moe", width_field="moe_intermediate_size",
                               num_experts_field="num_experts", router_attr="gate"))
