"""Plain helpers shared by the tests (no fixtures: those live in conftest.py).

What is here:

* tiny random models of every supported family: ``FAMILIES``, ``VOCAB``, ``tiny_config``, ``tiny_model``,
  ``random_batch``, ``ATTN_PRUNABLE`` (the families whose GQA groups can be pruned) and ``random_keep``
  (random keep indices for slicing tests);
* pipeline inputs and outputs: ``PIPELINE_FAMILY_OVERRIDES``, ``make_teacher_dir`` (a tiny HF teacher dir
  with its tokenizer), ``write_hub_checkpoint`` / ``make_hub_teacher_dir`` (Qwen3.5-MoE in its multimodal hub
  layout), ``tiny_recipe`` (a tiny 2-stage recipe YAML), ``read_summary`` (a run's summary.json);
* running ``train.py`` in a child process, e.g. with 2 gloo ranks: ``ROOT``, ``MODEL_PARALLEL``, ``FSDP1``
  (``--trainer.strategy`` values), ``train``, ``train_torchrun_many`` (several runs in one torchrun launch) and
  ``scalars`` (a TensorBoard scalar series, one value per step), ``tensorboard_view`` / ``scalar_events`` (a run's
  events as TensorBoard shows them, every point).

Tests import these with ``from helpers import ...`` (``tests/`` is on ``sys.path`` under pytest's rootdir
conftest; the torchrun workers put it there themselves). The library is imported lazily, inside the
functions, so that importing this module (and so conftest.py) needs only torch and transformers.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from transformers import AutoConfig, AutoModelForCausalLM

ROOT = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------------------------------
# Tiny random configs and models of every supported family (LitGPT style)
# ---------------------------------------------------------------------------------------------------
FAMILIES = ["phimoe", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "glm4_moe", "deepseek_v2", "deepseek_v3",
            "ernie4_5_moe", "minimax_m2", "qwen3_next", "qwen3_5_moe", "glm4_moe_lite", "gpt_oss", "llama4",
            "granitemoe", "granitemoeshared", "granitemoehybrid"]
VOCAB = 96

_COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               head_dim=8, num_experts_per_tok=2, max_position_embeddings=128, tie_word_embeddings=False)

_PER_FAMILY = {
    "phimoe": dict(intermediate_size=24, num_local_experts=4, attention_bias=True, lm_head_bias=True,
                   router_jitter_noise=0.0, input_jitter_noise=0.0),
    "mixtral": dict(intermediate_size=24, num_local_experts=4),
    "qwen2_moe": dict(moe_intermediate_size=24, num_experts=4, shared_expert_intermediate_size=20, qkv_bias=True,
                      intermediate_size=40),
    "qwen3_moe": dict(moe_intermediate_size=24, num_experts=4, intermediate_size=40),
    "olmoe": dict(intermediate_size=24, num_experts=4, num_key_value_heads=4),
    # DeepSeek-style shared experts (width moe_intermediate_size x n_shared), score-correction bias, group-limited
    # routing over 2 groups, a leading dense layer: 3 layers so that two have experts.
    "glm4_moe": dict(moe_intermediate_size=24, n_routed_experts=4, n_shared_experts=1, intermediate_size=40,
                     num_hidden_layers=3, first_k_dense_replace=1, n_group=2, topk_group=2, attention_bias=True),
    "deepseek_v2": dict(moe_intermediate_size=24, n_routed_experts=4, n_shared_experts=2, intermediate_size=40,
                        num_hidden_layers=3, first_k_dense_replace=1, q_lora_rank=None, kv_lora_rank=8,
                        qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8, num_key_value_heads=4),
    "deepseek_v3": dict(moe_intermediate_size=24, n_routed_experts=4, n_shared_experts=1, intermediate_size=40,
                        num_hidden_layers=3, first_k_dense_replace=1, n_group=2, topk_group=2, q_lora_rank=16,
                        kv_lora_rank=8, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8, num_key_value_heads=4),
    "ernie4_5_moe": dict(moe_intermediate_size=24, moe_num_experts=4, moe_num_shared_experts=1, moe_k=2,
                         intermediate_size=40, use_bias=True),
    "minimax_m2": dict(intermediate_size=24, num_local_experts=4),
    # GatedDeltaNet linear attention in layer 0, gated full attention in layer 1
    "qwen3_next": dict(moe_intermediate_size=24, num_experts=4, shared_expert_intermediate_size=20,
                       intermediate_size=40, layer_types=["linear_attention", "full_attention"],
                       linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8,
                       linear_value_head_dim=8),
    # Qwen3-Next's stack (layer 0 GatedDeltaNet, layer 1 gated full attention); the causal LM's config type is
    # qwen3_5_moe_text (_CONFIG_TYPE), the multimodal wrapper's is tested in tests/test_qwen3_5_moe.py
    "qwen3_5_moe": dict(moe_intermediate_size=24, num_experts=4, shared_expert_intermediate_size=20,
                        layer_types=["linear_attention", "full_attention"], linear_num_key_heads=2,
                        linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=8),
    # GLM-4.7-Flash: MLA (v_head_dim != qk head dim), DeepSeek-style shared expert, score-correction bias, group
    # routing over 2 groups of 2; mlp_layer_types defaults to one dense layer, then sparse ones
    "glm4_moe_lite": dict(moe_intermediate_size=24, n_routed_experts=4, n_shared_experts=1, intermediate_size=40,
                          num_hidden_layers=3, n_group=2, topk_group=2, q_lora_rank=16, kv_lora_rank=8,
                          qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=12, num_key_value_heads=4),
    # gpt-oss: transposed, interleaved experts with biases, a clamped GLU, attention sinks, layer 0 sliding (a window
    # shorter than random_batch's 8 tokens), layer 1 full; YaRN over 128 / 4 positions as the hub's 131072 / 4096
    "gpt_oss": dict(intermediate_size=24, num_local_experts=4, sliding_window=4,
                    rope_parameters={"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                                     "truncate": False, "original_max_position_embeddings": 4,
                                     "rope_theta": 150000.0}),
    # Llama-4 text: layer 0 dense (width intermediate_size_mlp), layer 1 MoE with a shared expert tied to the routed
    # width; layer 1 is a NoPE layer, layer 0 a chunked-attention one (a chunk shorter than random_batch's 8 tokens)
    # (top-2 here, where the hub's is top-1, so that expert removal has a floor to refuse)
    "llama4": dict(intermediate_size=24, intermediate_size_mlp=40, num_local_experts=4, interleave_moe_layer_step=2,
                   attention_chunk_size=4, use_qk_norm=True, no_rope_layers=[1, 0]),
    # Granite: the MoE block is block_sparse_moe; granitemoeshared / granitemoehybrid add the decoder layer's fused
    # shared_mlp (input_linear [2I, H], output_linear); the multipliers are not 1 so that they are exercised
    "granitemoe": dict(intermediate_size=24, num_local_experts=4, attention_bias=True, attention_multiplier=0.3,
                       residual_multiplier=0.5, embedding_multiplier=2.0, logits_scaling=2.0),
    "granitemoeshared": dict(intermediate_size=24, num_local_experts=4, shared_intermediate_size=20,
                             attention_multiplier=0.3, residual_multiplier=0.5, embedding_multiplier=2.0,
                             logits_scaling=2.0),
    # Granite-4.0-H: layer 0 Mamba-2 (no attention), layer 1 GQA without positional embedding
    "granitemoehybrid": dict(intermediate_size=24, num_local_experts=4, shared_intermediate_size=20,
                             layer_types=["mamba", "attention"], position_embedding_type="nope", mamba_n_heads=4,
                             mamba_d_head=16, mamba_d_state=8, mamba_n_groups=1, mamba_expand=2, mamba_chunk_size=8,
                             attention_multiplier=0.3, residual_multiplier=0.5, embedding_multiplier=2.0,
                             logits_scaling=2.0),
}
_CONFIG_TYPE = {"qwen3_5_moe": "qwen3_5_moe_text", "llama4": "llama4_text"}  # the family's causal LM config, where its hub config wraps it
_MLA = ("deepseek_v2", "deepseek_v3", "glm4_moe_lite")  # head_dim is derived from (glm4_moe_lite: aliases) the rope dim


def tiny_config(model_type: str, **overrides):
    kwargs = {**_COMMON, **_PER_FAMILY[model_type], **overrides}
    if model_type == "olmoe" or model_type in _MLA:
        kwargs.pop("head_dim")  # OLMoE sizes q/k norms from hidden_size: keep heads * head_dim == hidden
    return AutoConfig.for_model(_CONFIG_TYPE.get(model_type, model_type), **kwargs)


def tiny_model(model_type: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides))
    # Random init of every parameter (router weights start at zero for some families).
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model.eval()


def random_batch(batch_size: int = 2, seq_len: int = 8, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch_size, seq_len + 1), generator=gen)
    return {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}


def _attn_prunable() -> list[str]:
    from lightning_slimmoe.families import get_family

    return [f for f in FAMILIES if get_family(tiny_config(f)).attention_prunable]


def __getattr__(name: str):
    # ATTN_PRUNABLE asks the library's family registry: computed on first use (`from helpers import
    # ATTN_PRUNABLE` included), not when conftest.py imports this module.
    if name == "ATTN_PRUNABLE":
        globals()["ATTN_PRUNABLE"] = value = _attn_prunable()
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def random_keep(model, width, groups, shared_width=None, seed=0):
    """Random (sorted) keep indices for every expert, shared expert and attention layer of ``model``."""
    from lightning_slimmoe.families import get_family
    from lightning_slimmoe.slimming import KeepIndices, expert_weights, shared_expert_weights

    gen = torch.Generator().manual_seed(seed)
    family = get_family(model)
    keep = KeepIndices()
    for layer, block in family.moe_blocks(model):
        num_experts, cur, _ = expert_weights(block.experts)[0].shape
        keep.experts[layer] = torch.stack([torch.randperm(cur, generator=gen)[:width].sort().values
                                           for _ in range(num_experts)])
    shared_experts = dict(family.shared_experts(model))
    for layer, mlp in shared_experts.items():
        if shared_width is not None:
            cur_shared = shared_expert_weights(mlp)[0].shape[0]
            if family.shared_width_follows_routed():  # DeepSeek-style / Llama-4: the shared width follows the routed one
                shared_width = family.shared_expert_width(model.config) // family.expert_width(model.config) * width
            keep.shared[layer] = torch.randperm(cur_shared, generator=gen)[:shared_width].sort().values
    for layer, _ in family.attention_modules(model):
        keep.groups[layer] = torch.randperm(model.config.num_key_value_heads, generator=gen)[:groups].sort().values
    return keep


# ---------------------------------------------------------------------------------------------------
# Pipeline inputs and outputs: tiny teacher dirs with tokenizers, tiny recipes, run summaries
# ---------------------------------------------------------------------------------------------------
PIPELINE_FAMILY_OVERRIDES = {  # widths that stay grouped_mm-aligned after two halvings
    "phimoe": dict(intermediate_size=32), "mixtral": dict(intermediate_size=32),
    "qwen2_moe": dict(moe_intermediate_size=32, shared_expert_intermediate_size=32),
    "qwen3_moe": dict(moe_intermediate_size=32), "olmoe": dict(intermediate_size=32),
    "glm4_moe": dict(moe_intermediate_size=32), "deepseek_v2": dict(moe_intermediate_size=32),
    "deepseek_v3": dict(moe_intermediate_size=32), "ernie4_5_moe": dict(moe_intermediate_size=32),
    "minimax_m2": dict(intermediate_size=32),
    "qwen3_next": dict(moe_intermediate_size=32, shared_expert_intermediate_size=32),
    "qwen3_5_moe": dict(moe_intermediate_size=32, shared_expert_intermediate_size=32),
    "glm4_moe_lite": dict(moe_intermediate_size=32),
    "gpt_oss": dict(intermediate_size=32),
    "llama4": dict(intermediate_size=32),
    "granitemoe": dict(intermediate_size=32),
    "granitemoeshared": dict(intermediate_size=32, shared_intermediate_size=32),
    "granitemoehybrid": dict(intermediate_size=32, shared_intermediate_size=32),
}


def make_teacher_dir(path, model_type: str, corpus: str, vocab_size: int = 320, seed: int = 0) -> str:
    """A user's own tiny HF MoE directory (weights + tokenizer), as `teacher:` takes it."""
    from lightning_slimmoe.data import TextDataModule

    path = Path(path)
    dm = TextDataModule(files=[corpus])
    tokenizer = dm.train_tokenizer(vocab_size, str(path))
    model = tiny_model(model_type, seed=seed, vocab_size=len(tokenizer), **PIPELINE_FAMILY_OVERRIDES[model_type])
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.25)  # a tamer random teacher: logits of O(1)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


QWEN3_5_VISION = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32, patch_size=4,
                      num_position_embeddings=16)  # a one-block vision tower for the Qwen3.5-MoE wrapper


def write_hub_checkpoint(path: Path, vocab_size: int = VOCAB, scale: float = 0.2, seed: int = 0, text_config=None,
                         vision_config=None, **text):
    """A tiny Qwen3.5-MoE hub directory as Qwen publishes it: the wrapper's own tensor names (which are the hub's:
    fused experts, `model.language_model.` / `model.visual.` / `lm_head`), plus an `mtp.` layer shaped like decoder
    layer 0 but holding other values, so that a reader taking `mtp.layers.0.` for layer 0 would give other logits.
    The language model is ``text_config`` if given, else ``tiny_config`` with ``text`` overrides.
    Returns the wrapper model (``Qwen3_5MoeForConditionalGeneration``) whose weights were written."""
    from safetensors.torch import save_file
    from transformers.models.qwen3_5_moe import Qwen3_5MoeConfig, Qwen3_5MoeForConditionalGeneration

    if text_config is None:
        text_config = tiny_config("qwen3_5_moe", vocab_size=vocab_size, mtp_num_hidden_layers=1, **text)
    config = Qwen3_5MoeConfig(text_config=text_config.to_dict(), vision_config=vision_config or QWEN3_5_VISION)
    torch.manual_seed(seed)
    model = Qwen3_5MoeForConditionalGeneration(config).eval()
    tensors = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, scale)
            tensors[name] = p.detach().clone().contiguous()
    prefix = "model.language_model.layers.0."
    tensors.update({"mtp." + k.removeprefix("model.language_model."): torch.randn_like(v)
                    for k, v in tensors.items() if k.startswith(prefix)})
    hidden = text_config.hidden_size
    tensors["mtp.fc.weight"] = torch.randn(hidden, 2 * hidden)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    config.architectures = ["Qwen3_5MoeForConditionalGeneration"]
    config.save_pretrained(path)
    return model


LLAMA4_VISION = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, image_size=16,
                     patch_size=8, vision_output_dim=32, projector_input_dim=32, projector_output_dim=32,
                     rope_theta=10000.0)  # a one-layer vision tower for the Llama-4 wrapper


def write_llama4_hub_checkpoint(path: Path, vocab_size: int = VOCAB, scale: float = 0.2, seed: int = 0,
                                text_config=None, vision_config=None, **text):
    """A tiny Llama-4 hub directory as Meta publishes it: the multimodal wrapper (``model_type: llama4``) saved by
    ``Llama4ForConditionalGeneration``, its language model under ``language_model.model.`` and
    ``language_model.lm_head``, beside ``vision_model.*`` (whose own ``vision_model.model.layers.<i>.`` must never
    be read as a decoder layer) and ``multi_modal_projector.*``. The language model is ``text_config`` if given,
    else ``tiny_config`` with ``text`` overrides. Returns the wrapper model."""
    from transformers import Llama4Config, Llama4ForConditionalGeneration

    if text_config is None:
        text_config = tiny_config("llama4", vocab_size=vocab_size, **text)
    config = Llama4Config(text_config=text_config.to_dict(), vision_config=vision_config or LLAMA4_VISION)
    torch.manual_seed(seed)
    model = Llama4ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, scale)
    model.save_pretrained(path)
    return model


def assert_sharded_read_equals_from_pretrained(path, keep) -> None:
    """The FSDP2 path on a hub checkpoint (a meta model, then each tensor read from the checkpoint, with and without
    ``keep``) gives what stock ``from_pretrained`` (+ ``slim_model_``) gives: the same weights and logits, and the same
    teacher fingerprint."""
    from lightning_slimmoe.loading import materialize_, meta_model, pending_fingerprint
    from lightning_slimmoe.module import model_fingerprint
    from lightning_slimmoe.slimming import slim_model_

    ids = random_batch()["input_ids"]
    reference = AutoModelForCausalLM.from_pretrained(path).eval()
    assert pending_fingerprint(meta_model(str(path), torch.float32)) == model_fingerprint(reference)
    for kept in (None, keep):
        model = meta_model(str(path), torch.float32, keep=kept)
        assert materialize_(model, "cpu")
        want = reference if kept is None else slim_model_(AutoModelForCausalLM.from_pretrained(path).eval(), kept)
        got, expected = model.eval().state_dict(), want.state_dict()
        assert got.keys() == expected.keys()
        assert all(torch.equal(got[k], expected[k]) for k in got), [k for k in got
                                                                    if not torch.equal(got[k], expected[k])]
        with torch.no_grad():
            assert torch.equal(model(input_ids=ids).logits, want(input_ids=ids).logits)


def make_hub_teacher_dir(path, corpus: str, vocab_size: int = 320, family: str = "qwen3_5_moe") -> str:
    """A tiny teacher in its multimodal hub layout (Qwen3.5-MoE: :func:`write_hub_checkpoint`; Llama-4:
    :func:`write_llama4_hub_checkpoint`), with a tokenizer and the pipeline widths (``PIPELINE_FAMILY_OVERRIDES``),
    as `teacher:` takes a downloaded hub snapshot."""
    from lightning_slimmoe.data import TextDataModule

    writer = {"qwen3_5_moe": write_hub_checkpoint, "llama4": write_llama4_hub_checkpoint}[family]
    tokenizer = TextDataModule(files=[corpus]).train_tokenizer(vocab_size, str(path))
    writer(path, vocab_size=len(tokenizer), scale=0.05, **PIPELINE_FAMILY_OVERRIDES[family])
    tokenizer.save_pretrained(path)
    return str(path)


def tiny_recipe(tmp_path, teacher: str | None, corpus: str, stages: list | None = None, **top) -> str:
    """Write a tiny 2-stage recipe YAML and return its path."""
    stages = stages if stages is not None else [
        {"name": "slim1", "expert_width": 16, "criterion": "kd_taylor", "calibration_tokens": 256,
         "max_tokens": 6 * 4 * 32, "optimizer": {"lr": 1e-3}, "kd": {"top_k": 8}},
        {"name": "slim2", "expert_width": 8, "attention_groups": 1, "criterion": "kd_taylor",
         "calibration_tokens": 256, "max_tokens": 4 * 4 * 32, "optimizer": {"lr": 1e-3}},
    ]
    config = {
        "seed_everything": 0, "output_dir": str(tmp_path / "run"), "teacher": teacher,
        "trainer": {"accelerator": "cpu", "devices": 1, "precision": "32-true", "log_every_n_steps": 1,
                    "limit_val_batches": 2, "enable_progress_bar": False, "enable_model_summary": False},
        "data": {"class_path": "lightning_slimmoe.data.TextDataModule",
                 "init_args": {"files": [corpus], "seq_len": 32, "batch_size": 4, "val_fraction": 0.05}},
        "stages": stages,
    }
    config.update(top)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return str(path)


def read_summary(run_dir) -> dict:
    return json.loads((Path(run_dir) / "summary.json").read_text())



# ---------------------------------------------------------------------------------------------------
# Quantized hub layouts: block FP8 (DeepSeek-V3 / MiniMax-M2) and MXFP4 (gpt-oss), as the hub ships them
# ---------------------------------------------------------------------------------------------------
FP8_BLOCK = 128
FP8_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [FP8_BLOCK, FP8_BLOCK],
              "activation_scheme": "dynamic"}
FP8_NOT_QUANTIZED = ("embed_tokens", "lm_head", "norm", "mlp.gate.weight", "block_sparse_moe.gate.weight")
MXFP4_CONFIG = {"quant_method": "mxfp4",  # as the hub's gpt-oss config.json has it
                "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                           "model.embed_tokens", "lm_head"]}


def quantize_blocks(w_RC: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8_e4m3fn weight, fp32 scale_inv per 128x128 block), as DeepSeek's and MiniMax's checkpoints hold them."""
    import math

    rows, cols = w_RC.shape
    scale = torch.empty(math.ceil(rows / FP8_BLOCK), math.ceil(cols / FP8_BLOCK))
    q_RC = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            rows_i, cols_j = slice(i * FP8_BLOCK, (i + 1) * FP8_BLOCK), slice(j * FP8_BLOCK, (j + 1) * FP8_BLOCK)
            block = w_RC[rows_i, cols_j].float()
            scale[i, j] = block.abs().max().clamp(min=1e-12) / 448.0  # e4m3's largest finite value
            q_RC[rows_i, cols_j] = (block / scale[i, j]).to(torch.float8_e4m3fn)
    return q_RC, scale


def to_fp8_(directory: Path, modules_to_not_convert: list[str] | None = None) -> None:
    """Rewrite the checkpoint ``save_pretrained`` wrote in ``directory`` (the hub's per-expert keys) as the hub's block
    FP8: every linear ``X.weight`` float8_e4m3fn with its fp32 ``X.weight_scale_inv``, embeddings, norms, routers and
    lm_head as they were; ``quantization_config`` declared in config.json."""
    from safetensors.torch import load_file, save_file

    path = directory / "model.safetensors"
    state, out = load_file(path), {}
    for key, tensor in state.items():
        if tensor.dim() == 2 and key.endswith(".weight") and not any(p in key for p in FP8_NOT_QUANTIZED):
            out[key], out[key + "_scale_inv"] = quantize_blocks(tensor)
        else:
            out[key] = tensor
    save_file(out, str(path), metadata={"format": "pt"})
    config = json.loads((directory / "config.json").read_text())
    quantization = {**FP8_CONFIG, **({"modules_to_not_convert": modules_to_not_convert} if modules_to_not_convert else {})}
    (directory / "config.json").write_text(json.dumps({**config, "quantization_config": quantization}))


def to_mxfp4_(directory: Path, seed: int = 0, scales=(121, 125)) -> dict[str, torch.Tensor]:
    """Rewrite the fused expert weights of the gpt-oss checkpoint in ``directory`` as random MXFP4 (transformers'
    layout: ``<name>_blocks [E, out, in/32, 16]``, ``<name>_scales [E, out, in/32]``), declare it in config.json,
    and return the dequantized weights (in-memory layout ``[E, in, out]``)."""
    from safetensors.torch import load_file, save_file
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    gen = torch.Generator().manual_seed(seed)
    path = directory / "model.safetensors"
    state = load_file(path)
    dense = {}
    for name in [k for k in state if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        experts, n_in, n_out = state.pop(name).shape
        blocks = torch.randint(0, 256, (experts, n_out, n_in // 32, 16), dtype=torch.uint8, generator=gen)
        exps = torch.randint(*scales, (experts, n_out, n_in // 32), dtype=torch.uint8, generator=gen)
        state[name + "_blocks"], state[name + "_scales"] = blocks, exps
        dense[name] = convert_moe_packed_tensors(blocks, exps, dtype=torch.float32)
    save_file(state, str(path), metadata={"format": "pt"})
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "quantization_config": MXFP4_CONFIG}))
    return dense

# ---------------------------------------------------------------------------------------------------
# train.py in a child process (1 process or 2 gloo ranks) and its TensorBoard scalars
# ---------------------------------------------------------------------------------------------------
MODEL_PARALLEL = '{"class_path": "lightning.pytorch.strategies.ModelParallelStrategy"}'
FSDP1 = '{"class_path": "lightning.pytorch.strategies.FSDPStrategy"}'


def scalars(tb_dir: Path, tag: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values = {}
    for events in sorted(tb_dir.glob("events.out.tfevents*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            values.update({e.step: e.value for e in acc.Scalars(tag)})
    return values


def tensorboard_view(tb_dir: Path):
    """A run's events as TensorBoard shows them: every events file, in order, with the events a resumed run superseded
    (``purge_step``) left out. Its ``Scalars(tag)`` lists every point, a step written twice twice."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    return acc


def scalar_events(tb_dir: Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) of every point of ``tag`` that TensorBoard shows (:func:`tensorboard_view`)."""
    acc = tensorboard_view(tb_dir)
    return [(e.step, e.value) for e in acc.Scalars(tag)] if tag in acc.Tags()["scalars"] else []


def train(recipe: str, out: Path, *extra: str) -> None:
    result = subprocess.run([sys.executable, "train.py", "--config", recipe, "--output_dir", str(out), *extra],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]


def train_torchrun_many(runs: list[list[str]], ranks: int) -> None:
    """``train.py`` runs (argument lists, each with its ``--config`` and ``--output_dir``) under one torchrun launch of
    ``ranks`` processes (``--trainer.devices ranks``), one after another (tests/train_runs_worker.py). torchrun starts
    the ranks, and they import, side by side and once for all the runs, where Lightning's own launcher starts rank 1
    only once rank 0 has set up (twice the start-up)."""
    worker_args = []
    for run in runs:
        worker_args += [*(["--then"] if worker_args else []), *run, "--trainer.devices", str(ranks)]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
               str(ROOT / "tests" / "train_runs_worker.py"), *worker_args]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]


# ---------------------------------------------------------------------------------------------------
# The serving engines' environments (pytest -m serving): made by bench/serving.py
# ---------------------------------------------------------------------------------------------------
SERVING_SKIP = ("needs the serving engines' environments ({missing}): run `python bench/serving.py --cache DIR` once, "
                "then `SLIMMOE_SERVING_CACHE=DIR python -m pytest -q -m serving` (or set SLIMMOE_VLLM_PYTHON / "
                "SLIMMOE_LLAMA_CPP / SLIMMOE_QWEN_TOKENIZER to your own)")


def serving_envs() -> dict[str, str]:
    """What exists of ``vllm`` (a vLLM environment's python), ``llamacpp`` (a llama.cpp build dir) and ``tokenizer``
    (a tokenizer dir llama.cpp's converter knows: the Qwen vocabulary): from SLIMMOE_VLLM_PYTHON / SLIMMOE_LLAMA_CPP /
    SLIMMOE_QWEN_TOKENIZER, else under SLIMMOE_SERVING_CACHE laid out as bench/serving.py lays it out."""
    import os

    cache = os.environ.get("SLIMMOE_SERVING_CACHE")
    paths = {"vllm": os.environ.get("SLIMMOE_VLLM_PYTHON") or (cache and f"{cache}/vllm-venv/bin/python"),
             "llamacpp": os.environ.get("SLIMMOE_LLAMA_CPP") or (cache and f"{cache}/llamacpp/build"),
             "llamacpp_python": os.environ.get("SLIMMOE_LLAMA_CPP_PYTHON") or (
                 cache and f"{cache}/llamacpp/venv/bin/python"),
             "tokenizer": os.environ.get("SLIMMOE_QWEN_TOKENIZER") or (cache and f"{cache}/qwen-tokenizer")}
    return {k: v for k, v in paths.items() if v and Path(v).exists()}
