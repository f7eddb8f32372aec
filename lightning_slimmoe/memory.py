"""Per-GPU memory plan of a stage under FSDP2 full sharding (``plan --memory``).

An estimate from parameter counts and shapes, not a measurement. Terms, per GPU, with N GPUs:
* student weights: fp32 master copy sharded, ``4 P_s / N`` (bf16-true: ``2 P_s / N``)
* student grads: same dtype, sharded after reduce-scatter, ``4 P_s / N``
* optimizer: AdamW two fp32 moments ``8 P_s / N``; bitsandbytes AdamW8bit ``2 P_s / N``
* teacher weights: bf16 sharded, ``2 P_t / N`` (no grads, no optimizer state)
* gathered layers: one all-gathered bf16 decoder layer of each model in use plus one prefetched, and the
  student layer's unsharded bf16 gradient during its backward
* activations: with per-layer activation checkpointing, each layer's bf16 input is kept
  (``2 B T H`` per layer) plus one layer's recompute; without it, an estimate of every layer's saved
  tensors (attention ~ ``10 H + 2 (q + kv)``, routed experts ~ ``top_k (3 I) + E``) per token
* KD logits: one fp32 ``[chunk, V]`` block for the student and one for the teacher, and its gradient
"""

from __future__ import annotations

from dataclasses import dataclass

from lightning_slimmoe.families import get_family, head_dim
from lightning_slimmoe.params import count_config_params

GiB = 2**30


@dataclass
class MemoryPlanInputs:
    gpus: int = 64
    gpu_memory_gib: float = 80.0
    micro_batch: int = 2
    seq_len: int = 4096
    activation_checkpointing: bool = True
    optimizer: str = "adamw"  # adamw | adamw8bit
    master_weights_bytes: int = 4  # fp32 master weights (bf16 compute via FSDP2 mixed precision)
    chunk_tokens: int = 4096


def _layer_params(config) -> int:
    return count_config_params(config).total // max(1, int(config.num_hidden_layers))


def _activation_bytes_per_token_per_layer(config) -> float:
    family = get_family(config)
    hidden = int(config.hidden_size)
    q = int(config.num_attention_heads) * head_dim(config)
    kv = int(config.num_key_value_heads) * head_dim(config)
    top_k = int(config.num_experts_per_tok)
    width = family.expert_width(config)
    shared = family.shared_expert_width(config) or 0
    elements = 10 * hidden + 2 * (q + 2 * kv) + top_k * (3 * width + 2 * hidden) + 3 * shared + family.num_experts(config)
    return 2.0 * elements  # bf16


def memory_plan(student_config, teacher_config, inputs: MemoryPlanInputs) -> dict[str, float]:
    """GiB per GPU for one KD step of a stage whose student is ``student_config``."""
    n = inputs.gpus
    p_s = count_config_params(student_config).total
    p_t = count_config_params(teacher_config).total
    tokens = inputs.micro_batch * inputs.seq_len
    hidden = int(student_config.hidden_size)
    layers = int(student_config.num_hidden_layers)
    vocab = int(student_config.vocab_size)
    opt_bytes = 2 if inputs.optimizer == "adamw8bit" else 8
    per_token_layer = _activation_bytes_per_token_per_layer(student_config)
    if inputs.activation_checkpointing:
        activations = 2 * tokens * hidden * layers + tokens * per_token_layer
    else:
        activations = tokens * per_token_layer * layers
    plan = {
        "student_weights": inputs.master_weights_bytes * p_s / n,
        "student_grads": inputs.master_weights_bytes * p_s / n,
        "optimizer_state": opt_bytes * p_s / n,
        "teacher_weights": 2 * p_t / n,
        "gathered_layers": 2 * (2 * _layer_params(student_config) + 2 * _layer_params(teacher_config))
        + 2 * _layer_params(student_config),
        "activations": activations,
        "kd_logits": 3 * 4 * min(inputs.chunk_tokens, tokens) * vocab,
    }
    plan = {k: round(v / GiB, 2) for k, v in plan.items()}
    plan["total"] = round(sum(plan.values()), 2)
    plan["fits"] = plan["total"] <= 0.9 * inputs.gpu_memory_gib  # 10% for the allocator and NCCL buffers
    return plan
