"""``teacher_8bit: true``: the frozen teacher in 8-bit (bitsandbytes), to save memory.

Two parts, because transformers' ``BitsAndBytesConfig(load_in_8bit=True)`` alone misses most of an MoE:

* ``nn.Linear`` layers (attention q/k/v/o, any dense MLP) -> bitsandbytes ``Linear8bitLt`` (LLM.int8), through
  transformers' own loader. The output head is skipped (transformers' ``llm_int8_skip_modules`` default; the KD
  top-k reads the head's weight directly), and so are embeddings, norms and the router.
* the MoE experts: transformers 5 keeps them as fused 3-D parameters (``mlp.experts.gate_up_proj [E, 2I, H]``,
  ``down_proj [E, H, I]``) outside any ``nn.Linear``, so the loader leaves them in full precision — and they are
  most of an MoE's bytes. :func:`quantize_experts_int8_` stores each as int8 with one absmax scale per output
  row (bitsandbytes ``int8_vectorwise_quant``, LLM.int8's weight quantizer, no outlier split) and dequantizes
  one layer's experts when that layer runs: at rest 1 byte per weight, transiently one layer in ``dtype``.

:func:`quantized_bytes` reports what ends up int8; the pipeline logs it; docs/scaling.md has the measured KD drift.
Only the teacher: it is frozen and only runs forward.
"""

from __future__ import annotations

import torch
from torch import nn

BNB_MISSING = ("teacher_8bit: true needs bitsandbytes (pip install bitsandbytes; tested with 0.50.2); it is not installed. "
               "Set teacher_8bit: false, or install it")


def check_teacher_8bit(sharded: bool, precision: str) -> None:
    """Raise ValueError naming the setting when ``teacher_8bit`` cannot work with the run's other settings."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as err:
        raise ValueError(BNB_MISSING) from err
    try:
        import accelerate  # noqa: F401  (transformers' 8-bit loading needs it)
    except ImportError as err:
        raise ValueError("teacher_8bit: true needs accelerate (pip install accelerate; it is in requirements.txt); "
                         "it is not installed. Set teacher_8bit: false, or install it") from err
    if sharded:
        # FSDP (fully_shard or FSDP1's flat parameters) would shard Int8Params like plain tensors and lose their scale (SCB) pairing;
        # transformers/bitsandbytes do not support it, so refuse rather than train against a broken teacher.
        raise ValueError("teacher_8bit: true is not supported with a sharded trainer.strategy (ModelParallelStrategy "
                         "/ FSDPStrategy: FSDP cannot shard bitsandbytes Int8Params); use teacher_8bit: false (the "
                         "sharded teacher already costs 1/world of its bytes per rank) or a single-device/DDP strategy")
    if str(precision) in ("bf16-true", "16-true", "bf16", "16", "half"):
        # Lightning's true-half precision casts the whole module, the teacher's int8 scales included.
        raise ValueError(f"teacher_8bit: true is not supported with trainer.precision={precision!r} (it casts every "
                         "module, the 8-bit teacher's scales included); use 32-true or bf16-mixed")


def load_teacher_8bit(source: str, dtype: torch.dtype, trust_remote_code: bool = False,
                      experts: bool = True) -> nn.Module:
    """The model in ``source`` with its ``nn.Linear`` layers (except the output head) in LLM.int8 and (``experts``)
    its fused expert weights in int8; the rest in ``dtype``."""
    try:
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig
        import bitsandbytes  # noqa: F401
    except ImportError as err:
        raise ValueError(BNB_MISSING) from err
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(
        source, dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=True,
        quantization_config=BitsAndBytesConfig(load_in_8bit=True), device_map=device)
    if experts:
        quantize_experts_int8_(model)
    return model


class _Int8Experts:
    """Mixin of a fused-experts module whose 3-D weights are int8 buffers: reading ``self.<name>`` (what every
    experts implementation of transformers does) returns the layer's weight dequantized to its dtype."""

    _int8_names: tuple[str, ...] = ()

    def __getattr__(self, name: str):
        if name in type(self)._int8_names:
            q, scale = nn.Module.__getattr__(self, name + "_int8"), nn.Module.__getattr__(self, name + "_scale")
            return (q.to(scale.dtype) * scale).view(q.shape)
        return super().__getattr__(name)


@torch.no_grad()
def quantize_experts_int8_(model: nn.Module) -> int:
    """Replace every fused 3-D expert weight by int8 + per-row absmax scale (in place); returns weights done."""
    import bitsandbytes.functional as F

    done = 0
    for module in model.modules():
        names = tuple(n for n, p in module.named_parameters(recurse=False) if p.dim() == 3)
        if not names or not type(module).__name__.endswith("Experts"):
            continue
        for name in names:
            weight = module._parameters.pop(name)
            rows = weight.reshape(-1, weight.shape[-1])
            q, row_absmax, _ = F.int8_vectorwise_quant(rows.float(), threshold=0.0)
            module.register_buffer(name + "_int8", q.view(weight.shape))
            module.register_buffer(name + "_scale", (row_absmax / 127).to(weight.dtype).view(*weight.shape[:-1], 1))
            del weight, rows, q
            done += 1
        # A subclass per experts class, so only these modules read their weights through the int8 path.
        module.__class__ = type(f"Int8{type(module).__name__}", (_Int8Experts, type(module)), {"_int8_names": names})
    return done


def quantized_bytes(model: nn.Module) -> dict:
    """Bytes of the model's parameters and buffers: total, held in int8, and the rest (by where they are)."""
    total = int8 = experts = 0
    seen: set[int] = set()
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        size = tensor.numel() * tensor.element_size()
        total += size
        if tensor.dtype == torch.int8:
            int8 += size
        elif ".experts." in name and not name.endswith("_scale"):
            experts += size
    return {"total_bytes": total, "int8_bytes": int8, "fused_expert_bytes": experts,
            "int8_fraction": round(int8 / total, 4) if total else 0.0}
