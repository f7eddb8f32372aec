"""The Mixtral adapter (8x7B / 8x22B): config fields, router name and the hub's w1/w3/w2 expert keys."""

from lightning_slimmoe.families import PER_EXPERT_W123, MoEFamily, register

MIXTRAL = register(MoEFamily(model_type="mixtral", width_field="intermediate_size",
                             num_experts_field="num_local_experts", router_attr="gate",
                             checkpoint_keys=PER_EXPERT_W123))
