"""The PhiMoE adapter: Phi-3.5-MoE (the paper's teacher) and its slimmed children Phi-mini-MoE / Phi-tiny-MoE."""

from lightning_slimmoe.families import PER_EXPERT_W123, MoEFamily, register

PHIMOE = register(MoEFamily(model_type="phimoe", width_field="intermediate_size",
                            num_experts_field="num_local_experts", router_attr="router",
                            checkpoint_keys=PER_EXPERT_W123, architecture="PhiMoEForCausalLM"))
