"""How Hugging Face MoE checkpoints key the tensors that slimming cuts: one place, driven by the family adapters.

The same weights have two layouts. In memory (transformers 5) every supported family's routed experts are fused
3-D tensors ``<layers>.<i>.mlp.experts.gate_up_proj [E, 2I, H]`` (gate rows, then up rows) and
``<layers>.<i>.mlp.experts.down_proj [E, H, I]``; a hub checkpoint, and ``save_pretrained``, which writes the hub
layout back, store them per expert under the names the family's :class:`~lightning_slimmoe.families.CheckpointKeys`
give (``block_sparse_moe.experts.{e}.w1/w3/w2`` for PhiMoE/Mixtral, ``mlp.experts.{e}.gate_proj/up_proj/down_proj``
for Qwen/OLMoE). gpt-oss keeps its experts fused on the hub too, in its own in-memory layout (``gate_up_proj
[E, H, 2I]`` interleaved, ``down_proj [E, I, H]``, and their biases: :meth:`CheckpointLayout.fused_bias_key`), its
MXFP4 release as ``<name>_blocks`` / ``_scales`` (dequantize.py). Shared experts and attention projections (and
gpt-oss's per-head attention ``sinks``) have one name in both layouts. Every other tensor is
renamed, if at all, by transformers' own ``revert_weight_conversion`` (loading.py uses it), so no family table is
kept here for those.

Every pattern is anchored at the start of the key (``model.layers.<i>.``, or where a multimodal wrapper's hub
checkpoint keeps the decoder layers, ``model.language_model.layers.<i>.`` for Qwen3.5-MoE), so the layers of a
multi-token-prediction head (``mtp.layers.0.``), a vision tower (``model.visual.blocks.0.``) or any other stack are
never taken for decoder layer ``i``. Nor is a layer past the model's ``num_hidden_layers``: DeepSeek-V3 and GLM hub
checkpoints keep their multi-token-prediction layer at ``model.layers.<num_hidden_layers>``, under the decoder's own
prefix, and transformers builds no such layer.

A multimodal wrapper's hub checkpoint keeps every tensor of its language model under another prefix
(Qwen3.5-MoE: ``model.language_model.``, ``lm_head`` at the top; Llama-4: ``language_model.model.`` and
``language_model.lm_head``): :meth:`CheckpointLayout.hub_key` gives the key an
in-memory name has there, so the sharded reader reads that layout as it is published.

Shapes: E experts, I expert width, W kept width, H hidden, G KV groups.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from torch import Tensor

from lightning_slimmoe.families import get_family, head_dim, language_config
from lightning_slimmoe.slimming import KeepIndices, concatenated_gate_up, group_rows
from lightning_slimmoe.storage import safetensors_header, weight_files

FUSED_PROJECTIONS = ("gate_up_proj", "down_proj")  # in-memory names of the fused expert tensors
FUSED_BIASES = ("gate_up_proj_bias", "down_proj_bias")  # gpt-oss: their biases, [E, 2I] and [E, H]
_ROWS_OF = ("gate", "up")  # GLU roles whose neurons are rows; down's neurons are columns


@dataclass(frozen=True)
class ExpertKey:
    """A per-expert checkpoint key: ``role`` is gate, up or down."""

    layer: int
    expert: int
    role: str


@dataclass(frozen=True)
class FusedKey:
    """A fused expert tensor: ``proj`` is gate_up_proj ``[E, 2I, H]`` or down_proj ``[E, H, I]``."""

    layer: int
    proj: str


class CheckpointLayout:
    """The key patterns of one model (from its config's family adapter) and the selection a
    :class:`~lightning_slimmoe.slimming.KeepIndices` makes from each tensor."""

    def __init__(self, config):
        family = get_family(config)
        keys = family.checkpoint_keys
        self.prefixes = tuple(p for p in (keys.decoder_layers, keys.hub_decoder_layers) if p)
        layer = rf"^(?:{'|'.join(map(re.escape, self.prefixes))})\.(?P<layer>\d+)\."
        self._layer = re.compile(layer)
        # model.layers.<i>. -> model.language_model.layers.<i>.: the language model's prefix, in memory and on the hub
        self._hub_base = (tuple(p.rpartition(".")[0] + "." for p in (keys.decoder_layers, keys.hub_decoder_layers))
                          if keys.hub_decoder_layers else None)
        self._hub_lm_head = ("lm_head.", keys.hub_lm_head + ".") if keys.hub_lm_head else None
        self._roles = dict(zip(keys.expert_projections, ("gate", "up", "down")))
        self._per_expert = re.compile(
            layer + re.escape(keys.expert_block) + r"\.experts\.(?P<expert>\d+)\.(?P<proj>"
            + "|".join(map(re.escape, keys.expert_projections)) + r")\.weight$")
        block = re.escape(family.moe_block_attr)  # mlp; Llama-4: feed_forward; Granite: block_sparse_moe
        self._fused = re.compile(layer + block + r"\.experts\.(?P<proj>" + "|".join(FUSED_PROJECTIONS) + r")$")
        self._fused_bias = re.compile(layer + block + r"\.experts\.(?P<proj>" + "|".join(FUSED_BIASES) + r")$")
        self._shared = (re.compile(layer + re.escape(keys.shared_expert)
                                   + r"\.(?P<proj>gate_proj|up_proj|down_proj|input_linear|output_linear)"
                                   r"\.(?P<kind>weight|bias)$")
                        if keys.shared_expert else None)
        self._attention = re.compile(layer + re.escape(keys.attention)
                                     + r"\.(?P<proj>q_proj|k_proj|v_proj|o_proj)\.(?P<kind>weight|bias)$")
        self._sinks = re.compile(layer + re.escape(keys.attention) + r"\.sinks$")  # gpt-oss: one per query head
        self._expert_indexed = [(re.compile(layer + block + r"\." + re.escape(name) + "$"), dim)
                                for name, dim in family.expert_indexed_tensors()]
        config = language_config(config)
        self.num_layers = int(config.num_hidden_layers)  # model.layers.<num_layers> on the hub is an MTP layer
        self.heads_per_group = int(config.num_attention_heads) // int(config.num_key_value_heads)
        self.head_dim = head_dim(config)
        self.q_rows_per_head = family.q_rows_per_head

    # --- what a key is ---------------------------------------------------------------------------------
    def _match(self, pattern: re.Pattern, key: str) -> re.Match | None:
        """``pattern``'s match of ``key`` if it lies in one of the model's decoder layers (not an MTP layer)."""
        m = pattern.match(key)
        return m if m is not None and int(m["layer"]) < self.num_layers else None

    def decoder_layer(self, key: str) -> int | None:
        """The decoder layer a checkpoint key or model name belongs to, None for any other tensor."""
        return int(m["layer"]) if (m := self._match(self._layer, key)) else None

    def hub_key(self, name: str) -> str | None:
        """The key a multimodal wrapper's hub checkpoint gives the in-memory tensor ``name`` (Qwen3.5-MoE:
        ``model.layers.0.mlp.experts.down_proj`` -> ``model.language_model.layers.0.mlp.experts.down_proj``,
        ``model.embed_tokens.weight`` -> ``model.language_model.embed_tokens.weight``), None where the family has no
        such layout or the tensor is outside the language model's prefix (``lm_head.weight``: the same key, except
        where the family moves it too: Llama-4's ``language_model.lm_head.weight``, its ``model.`` being
        ``language_model.model.``)."""
        for base in (self._hub_base, self._hub_lm_head):
            if base is not None and name.startswith(base[0]):
                return base[1] + name.removeprefix(base[0])
        return None

    def expert_key(self, key: str) -> ExpertKey | None:
        if m := self._match(self._per_expert, key):
            return ExpertKey(int(m["layer"]), int(m["expert"]), self._roles[m["proj"]])
        return None

    def fused_key(self, name: str) -> FusedKey | None:
        if m := self._match(self._fused, name):
            return FusedKey(int(m["layer"]), m["proj"])
        return None

    def fused_bias_key(self, name: str) -> FusedKey | None:
        """A fused experts' bias (gpt-oss): ``proj`` is gate_up_proj_bias ``[E, 2I]`` or down_proj_bias ``[E, H]``,
        read expert by expert like the fused weights (each expert keeps its own neurons' gate/up biases)."""
        if m := self._match(self._fused_bias, name):
            return FusedKey(int(m["layer"]), m["proj"])
        return None

    def expert_indexed(self, name: str) -> tuple[int, int] | None:
        """``(layer, expert dim)`` of a tensor indexed by expert besides the experts themselves (the router's weight
        and bias, a score-correction bias): expert removal keeps its entries of the kept experts."""
        for pattern, dim in self._expert_indexed:
            if m := self._match(pattern, name):
                return int(m["layer"]), dim
        return None

    # --- what a keep selects -------------------------------------------------------------------------
    def plain_selection(self, name: str, keep: KeepIndices, stored_rows: int | None = None) -> tuple[int, Tensor] | None:
        """``(axis, index)`` that ``keep`` selects from the 1-D/2-D tensor called ``name`` (a per-expert key, a
        shared-expert projection or a q/k/v/o projection), or None when it is kept whole. The fused 3-D expert
        tensors are not plain (each expert keeps its own rows): the reader gathers those expert by expert.
        ``stored_rows``: dim 0 of the stored tensor, which Granite's fused shared ``input_linear [2I, H]`` needs (its
        up rows lie ``I`` below their gate rows)."""
        if (e := self.expert_key(name)) is not None:
            if e.layer not in keep.experts:
                return None
            return (0 if e.role in _ROWS_OF else 1), keep.experts[e.layer][e.expert]
        if self._shared is not None and (m := self._match(self._shared, name)):
            layer = int(m["layer"])
            down = m["proj"] in ("down_proj", "output_linear")
            if layer not in keep.shared or (down and m["kind"] == "bias"):
                return None  # down's bias is indexed by hidden, not by neuron
            keep_W = keep.shared[layer]
            if m["proj"] == "input_linear":  # Granite: gate rows [0, I), then up rows [I, 2I)
                if stored_rows is None:
                    raise ValueError(f"{name}: the fused shared gate/up projection needs its stored row count")
                return 0, concatenated_gate_up(keep_W, stored_rows // 2)
            return (1 if down else 0), keep_W
        if (m := self._match(self._sinks, name)) and int(m["layer"]) in keep.groups:
            return 0, group_rows(keep.groups[int(m["layer"])], self.heads_per_group)  # the kept groups' query heads
        if m := self._match(self._attention, name):
            layer = int(m["layer"])
            if layer not in keep.groups:
                return None
            groups = keep.groups[layer]
            per_group = {"q_proj": self.heads_per_group * self.head_dim * self.q_rows_per_head,
                         "o_proj": self.heads_per_group * self.head_dim}.get(m["proj"], self.head_dim)
            rows = group_rows(groups, per_group)
            if m["proj"] == "o_proj":
                return None if m["kind"] == "bias" else (1, rows)
            return 0, rows
        return None


def sharded_read_problem(source: str, config) -> str | None:
    """Why the sharded (FSDP2) loader cannot read ``source`` (a local HF dir) into the model ``config`` describes, from
    the safetensors headers alone (no tensor is read), or None. The loader finds every decoder-layer tensor under
    ``model.layers.<i>.`` or, for a multimodal wrapper's hub checkpoint, its hub prefix (Qwen3.5-MoE:
    ``model.language_model.layers.<i>.``); a checkpoint with no tensor under either keeps its decoder layers in a
    layout the loader does not map (another wrapper, another family's checkpoint), so it is refused before any weight
    is read instead of failing mid-load."""
    if not os.path.isdir(source):
        return None
    layout = CheckpointLayout(config)
    sample = None
    for path in weight_files(source):
        header, _ = safetensors_header(path)
        keys = [k for k in header or () if k != "__metadata__"]
        if any(layout.decoder_layer(k) is not None for k in keys):
            return None
        sample = sample or next(iter(keys), None)
    if sample is None:
        return None  # no weights at all: check_weight_files names that
    return (f"{source} has no tensor under {' or '.join(p + '.<i>.' for p in layout.prefixes)} (e.g. {sample!r}), "
            f"where the sharded loader reads the decoder layers of a {get_family(config).model_type} checkpoint; "
            "train it single-process or with FSDPStrategy (both load it with stock from_pretrained, which applies "
            "transformers' own key conversions)")
