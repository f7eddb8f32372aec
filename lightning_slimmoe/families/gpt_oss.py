"""The gpt-oss adapter (`gpt_oss`: gpt-oss-20b / gpt-oss-120b): no shared expert, a router ``mlp.router`` with a
bias (kept by width slimming, sliced with its weight by expert removal), GQA attention with q/k/v/o biases and one
learned attention sink per query head (sliced with its head by group pruning), sliding and full layers alternating.

Its experts are fused in another layout than every other family's: ``gate_up_proj [E, H, 2I]`` with gate and up
interleaved (``::2`` / ``1::2``) plus ``gate_up_proj_bias [E, 2I]``, ``down_proj [E, I, H]`` plus ``down_proj_bias
[E, H]``, and a clamped, scaled GLU (``(up + 1) * gate * sigmoid(alpha * gate)``). The slicer and the criteria read
that layout from the markers transformers declares on the experts module (``slimming.check_expert_layout``), not
from this adapter. Hub checkpoints store the experts in MXFP4 (``*_blocks`` / ``*_scales``), dequantized as they are
read (``dequantize.py``).
"""

from lightning_slimmoe.families import MoEFamily, register

GPT_OSS = register(MoEFamily(model_type="gpt_oss", width_field="intermediate_size",
                             num_experts_field="num_local_experts", router_attr="router"))
