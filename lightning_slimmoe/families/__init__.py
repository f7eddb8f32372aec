"""Family adapters: where the experts, router and attention of each HF MoE family live, in memory and on disk.

transformers 5.x stores every supported family's experts as fused 3-D parameters — ``mlp.experts.gate_up_proj
[E, 2I, H]`` (gate rows, then up rows) and ``mlp.experts.down_proj [E, H, I]``, except gpt-oss's transposed,
interleaved, biased layout, which the slicer reads from the module's own markers (``slimming.check_expert_layout``)
— and names its router ``mlp.gate`` or ``mlp.router``. What differs between families is a
handful of config field names, whether the model has a shared expert or pruneable attention, and how its
checkpoints key the experts (:class:`CheckpointKeys`, read by ``checkpoint_layout.py``), so an adapter is a
small frozen record and the scorer, slicer and checkpoint reader are written once against it.

Adding a family: one file in this package that calls :func:`register` with a :class:`MoEFamily`, plus
a tiny config in ``tests/helpers.py``.

Multimodal wrappers (Qwen3.5-MoE: a ``qwen3_5_moe`` config holding the language model's ``qwen3_5_moe_text`` config
under ``text_config``, beside a vision tower) are registered under the wrapper's ``model_type`` with the text
config's type in ``text_model_type``: :func:`get_family` accepts either config, and :func:`language_config` gives the
config every field of the adapter is read from. The model slimmed is always the text-only causal LM, which is also
what ``AutoModelForCausalLM`` builds from the wrapper config.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from typing import Iterator

from torch import nn

from lightning_slimmoe.errors import UserError


class UnsupportedModelError(UserError, ValueError):
    """The model is not a Mixture-of-Experts family this project knows how to slim."""


@dataclass(frozen=True)
class CheckpointKeys:
    """How a family's hub checkpoints (and ``save_pretrained``, which writes the hub layout back) key the
    tensors that slimming cuts, relative to ``<decoder_layers>.<i>.``. Fused keys are the in-memory names
    (``mlp.experts.gate_up_proj`` / ``down_proj``); per-expert keys are the legacy ones, fused at load."""

    decoder_layers: str = "model.layers"  # prefix of the decoder layers, anchored at the key's start
    # Where a multimodal wrapper's hub checkpoint keeps the same decoder layers (Qwen3.5-MoE:
    # model.language_model.layers); its vision tower (model.visual.) and MTP layers (mtp.) match neither prefix.
    # The language model's other tensors sit beside its layers there (model.language_model.embed_tokens / .norm),
    # lm_head stays at the top: checkpoint_layout.CheckpointLayout.hub_key maps every in-memory name accordingly.
    hub_decoder_layers: str | None = None
    # Where such a hub checkpoint keeps lm_head when not at the top (Llama-4: language_model.lm_head, its decoder
    # layers under language_model.model.layers).
    hub_lm_head: str | None = None
    expert_block: str = "mlp"  # module holding the per-expert keys: mlp | block_sparse_moe
    expert_projections: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")  # gate, up, down
    shared_expert: str | None = None  # module of the always-on shared expert (Qwen2-MoE: mlp.shared_expert)
    attention: str = "self_attn"  # module of q_proj / k_proj / v_proj / o_proj


@dataclass(frozen=True)
class MoEFamily:
    model_type: str
    width_field: str  # config field holding each routed expert's FFN width (d_expert)
    num_experts_field: str  # config field holding the number of routed experts
    router_attr: str  # attribute of the sparse MoE block that holds the router
    shared_expert_width_field: str | None = None  # Qwen2-MoE: an always-on dense expert beside the routed ones
    shared_expert_attr: str = "shared_expert"  # DeepSeek / GLM / ERNIE: `shared_experts`; Granite: `shared_mlp`
    # Granite keeps its shared MLP on the decoder layer, beside the MoE block (`layer.shared_mlp`), not inside it.
    shared_expert_beside_block: bool = False
    # DeepSeek / GLM / ERNIE build the shared experts with width `<width_field> * <this field>`: their width is
    # tied to the routed width in the config, so it follows every expert-width target (docs/families-2026.md).
    shared_expert_count_field: str | None = None
    # Llama-4 builds its one shared expert with the routed width itself (`intermediate_size`): tied like the above,
    # with a count of 1 that no config field holds.
    shared_expert_tied: bool = False
    moe_block_attr: str = "mlp"  # decoder-layer attribute of the MoE block: mlp | feed_forward | block_sparse_moe
    # Tensors of the MoE block (dotted, relative to it) indexed by expert along the given dim, besides the router's
    # weight and bias: router score-correction biases. Expert removal slices them with the router.
    expert_indexed: tuple[tuple[str, int], ...] = ()
    expert_group_field: str | None = None  # group-limited routing (`n_group`): the expert count must divide by it
    min_experts_per_group: int = 1  # DeepSeek-V3 / GLM score a group by the sum of its top-2 experts
    q_rows_per_head: int = 1  # Qwen3-Next / Qwen3.5: q_proj holds a query and an output gate per head
    attention_prunable: bool = True
    attention_not_prunable_reason: str = ""
    checkpoint_keys: CheckpointKeys = CheckpointKeys()
    # A multimodal wrapper config (`model_type`) keeps the causal LM's config, of this type, under `text_config`.
    text_model_type: str | None = None
    # Config field counting the multi-token-prediction layers a hub checkpoint holds (Qwen3.5: keys under `mtp.`;
    # DeepSeek-V3 / GLM: `model.layers.<num_hidden_layers>`) that transformers does not build: they are neither
    # read, slimmed nor exported, and summary.json says so. Qwen3-Next's hub config counts its `mtp.*` layer nowhere.
    mtp_layers_field: str | None = None
    export_note: str = ""  # what the exported model is, where the teacher's hub checkpoint holds more (model card)
    # The causal LM's class name as the hub's config.json and the serving engines' registries spell it, where
    # transformers' class is spelled otherwise (PhiMoE: transformers `PhimoeForCausalLM`, the hub and vLLM /
    # llama.cpp `PhiMoEForCausalLM`; vLLM falls back to its generic backend for a name it has not registered).
    architecture: str | None = None

    # --- where things live -------------------------------------------------------------------
    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        base = getattr(model, "model", model)  # *ForCausalLM.model or the bare *Model
        return base.layers

    def moe_blocks(self, model: nn.Module) -> Iterator[tuple[int, nn.Module]]:
        """(layer index, sparse MoE block) for every layer that has routed experts.

        Qwen-MoE can interleave dense MLP layers (``decoder_sparse_step``, ``mlp_only_layers``): those
        have no experts and are left as they are (they are not part of the SlimMoE recipe).
        """
        for i, layer in enumerate(self.decoder_layers(model)):
            block = getattr(layer, self.moe_block_attr, None)
            if hasattr(block, "experts"):
                yield i, block

    def attention_modules(self, model: nn.Module) -> Iterator[tuple[int, nn.Module]]:
        """(layer index, GQA attention) for every layer whose attention has whole KV groups to prune. Linear-
        attention (Qwen3-Next's GatedDeltaNet) and Mamba layers have none, nor has MLA (no per-group k/v rows):
        those layers are left as they are, even by scoring."""
        for i, layer in enumerate(self.decoder_layers(model)):
            attn = getattr(layer, "self_attn", None)
            if attn is not None and all(hasattr(attn, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj")):
                yield i, attn

    def router(self, block: nn.Module) -> nn.Module:
        return getattr(block, self.router_attr)

    def has_shared_expert(self) -> bool:
        return bool(self.shared_expert_width_field or self.shared_expert_count_field or self.shared_expert_tied)

    def shared_width_follows_routed(self) -> bool:
        """Whether the config ties the shared experts' width to the routed width (no field of its own)."""
        return bool(self.shared_expert_count_field or self.shared_expert_tied)

    def tied_width_name(self) -> str:
        """How the tied shared width is derived, for error messages."""
        return (f"{self.width_field} x {self.shared_expert_count_field}" if self.shared_expert_count_field
                else self.width_field)

    def shared_experts(self, model: nn.Module) -> Iterator[tuple[int, nn.Module]]:
        """(layer index, shared expert) for every MoE layer that has one: an MLP of its own width beside the routed
        experts, as separate ``gate_proj`` / ``up_proj`` / ``down_proj`` or Granite's fused ``input_linear`` /
        ``output_linear`` (``slimming.shared_expert_weights`` reads both)."""
        if not self.has_shared_expert():
            return
        for i, layer in enumerate(self.decoder_layers(model)):
            block = getattr(layer, self.moe_block_attr, None)
            if not hasattr(block, "experts"):
                continue
            mlp = getattr(layer if self.shared_expert_beside_block else block, self.shared_expert_attr, None)
            if mlp is not None:
                yield i, mlp

    def expert_indexed_tensors(self) -> tuple[tuple[str, int], ...]:
        """Every tensor of the MoE block indexed by expert, with its expert dim: the router's, then the rest."""
        return ((f"{self.router_attr}.weight", 0), (f"{self.router_attr}.bias", 0), *self.expert_indexed)

    # --- config fields ---------------------------------------------------------------------------
    def expert_width(self, config) -> int:
        return int(getattr(language_config(config), self.width_field))

    def num_experts(self, config) -> int:
        return int(getattr(language_config(config), self.num_experts_field))

    def shared_expert_width(self, config) -> int | None:
        config = language_config(config)
        if self.shared_expert_width_field:
            return int(getattr(config, self.shared_expert_width_field) or 0) or None  # Granite: 0 = no shared MLP
        if self.shared_expert_count_field and getattr(config, self.shared_expert_count_field, None):
            return self.expert_width(config) * int(getattr(config, self.shared_expert_count_field))
        if self.shared_expert_tied:
            return self.expert_width(config)
        return None

    def expert_groups(self, config) -> int:
        """Groups of group-limited routing (1: none)."""
        config = language_config(config)
        return int(getattr(config, self.expert_group_field, None) or 1) if self.expert_group_field else 1

    def mtp_layers(self, config) -> int:
        """Multi-token-prediction layers of the hub checkpoint that the exported model leaves out (0: none)."""
        return int(getattr(language_config(config), self.mtp_layers_field, None) or 0) if self.mtp_layers_field else 0


# Mixtral / PhiMoE hub layout: block_sparse_moe.experts.{e}.w1 (gate) / w3 (up) / w2 (down).
PER_EXPERT_W123 = CheckpointKeys(expert_block="block_sparse_moe", expert_projections=("w1", "w3", "w2"))

_REGISTRY: dict[str, MoEFamily] = {}
_BY_TEXT_TYPE: dict[str, MoEFamily] = {}  # a wrapper family's text config type -> the family


def register(family: MoEFamily) -> MoEFamily:
    _REGISTRY[family.model_type] = family
    if family.text_model_type:
        _BY_TEXT_TYPE[family.text_model_type] = family
    return family


def supported_model_types() -> list[str]:
    return sorted(_REGISTRY)


def get_family(config_or_model) -> MoEFamily:
    """The adapter for a model or its config; an unsupported ``model_type`` fails at once."""
    config = getattr(config_or_model, "config", config_or_model)
    model_type = getattr(config, "model_type", None)
    family = _REGISTRY.get(model_type) or _BY_TEXT_TYPE.get(model_type)
    if family is None:
        raise UnsupportedModelError(
            f"model_type={model_type!r} is not supported: lightning_slimmoe slims Mixture-of-Experts models of the "
            f"families {supported_model_types()} (dense models have no experts to slim)."
        )
    return family


def language_config(config):
    """The config the adapter's fields live in: a multimodal wrapper's ``text_config`` (the config of the causal LM
    that is slimmed and exported), else ``config`` itself."""
    family = _REGISTRY.get(getattr(config, "model_type", None))
    if family is not None and family.text_model_type and getattr(config, "text_config", None) is not None:
        return config.text_config
    return config


def family_of_type(model_type: str) -> MoEFamily | None:
    """The adapter registered for ``model_type`` (a wrapper's or its text config's), None if there is none."""
    return _REGISTRY.get(model_type) or _BY_TEXT_TYPE.get(model_type)


def head_dim(config) -> int:
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


# One module per family registers itself on import.
for _mod in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_mod.name}")
