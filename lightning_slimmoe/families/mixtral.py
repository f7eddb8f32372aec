"""Mixtral 8x7B / 8x22B."""

from lightning_slimmoe.families import MoEFamily, register

MIXTRAL = register(MoEFamily(model_type="mixtral", width_field="intermediate_size",
                             num_experts_field="num_local_experts", router_attr="gate"))
