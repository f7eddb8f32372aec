"""How Hugging Face MoE checkpoints key the tensors that slimming cuts: one place, driven by the family adapters.

The same weights have two layouts. In memory (transformers 5) every supported family's routed experts are fused
3-D tensors ``<layers>.<i>.mlp.experts.gate_up_proj [E, 2I, H]`` (gate rows, then up rows) and
``<layers>.<i>.mlp.experts.down_proj [E, H, I]``; a hub checkpoint, and ``save_pretrained``, which writes the hub
layout back, store them per expert under the names the family's :class:`~lightning_slimmoe.families.CheckpointKeys`
give (``block_sparse_moe.experts.{e}.w1/w3/w2`` for PhiMoE/Mixtral, ``mlp.experts.{e}.gate_proj/up_proj/down_proj``
for Qwen/OLMoE). Shared experts and attention projections have one name in both layouts. Every other tensor is
renamed, if at all, by transformers' own ``revert_weight_conversion`` (loading.py uses it), so no family table is
kept here for those.

Every pattern is anchored at the start of the key (``model.layers.<i>.``, or where a multimodal wrapper's hub
checkpoint keeps the decoder layers, ``model.language_model.layers.<i>.`` for Qwen3.5-MoE), so the layers of a
multi-token-prediction head (``mtp.layers.0.``), a vision tower (``model.visual.blocks.0.``) or any other stack are
never taken for decoder layer ``i``.

Shapes: E experts, I expert width, W kept width, H hidden, G KV groups.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from torch import Tensor

from lightning_slimmoe.families import get_family, head_dim, language_config
from lightning_slimmoe.slimming import KeepIndices, group_rows
from lightning_slimmoe.storage import safetensors_header, weight_files

FUSED_PROJECTIONS = ("gate_up_proj", "down_proj")  # in-memory names of the fused expert tensors
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
        prefixes = "|".join(re.escape(p) for p in (keys.decoder_layers, keys.hub_decoder_layers) if p)
        layer = rf"^(?:{prefixes})\.(?P<layer>\d+)\."
        self._roles = dict(zip(keys.expert_projections, ("gate", "up", "down")))
        self._per_expert = re.compile(
            layer + re.escape(keys.expert_block) + r"\.experts\.(?P<expert>\d+)\.(?P<proj>"
            + "|".join(map(re.escape, keys.expert_projections)) + r")\.weight$")
        self._fused = re.compile(layer + r"mlp\.experts\.(?P<proj>" + "|".join(FUSED_PROJECTIONS) + r")$")
        self._shared = (re.compile(layer + re.escape(keys.shared_expert)
                                   + r"\.(?P<proj>gate_proj|up_proj|down_proj)\.(?P<kind>weight|bias)$")
                        if keys.shared_expert else None)
        self._attention = re.compile(layer + re.escape(keys.attention)
                                     + r"\.(?P<proj>q_proj|k_proj|v_proj|o_proj)\.(?P<kind>weight|bias)$")
        self._expert_indexed = [(re.compile(layer + r"mlp\." + re.escape(name) + "$"), dim)
                                for name, dim in family.expert_indexed_tensors()]
        config = language_config(config)
        self.heads_per_group = int(config.num_attention_heads) // int(config.num_key_value_heads)
        self.head_dim = head_dim(config)
        self.q_rows_per_head = family.q_rows_per_head

    # --- what a key is ---------------------------------------------------------------------------------
    def expert_key(self, key: str) -> ExpertKey | None:
        if m := self._per_expert.match(key):
            return ExpertKey(int(m["layer"]), int(m["expert"]), self._roles[m["proj"]])
        return None

    def fused_key(self, name: str) -> FusedKey | None:
        if m := self._fused.match(name):
            return FusedKey(int(m["layer"]), m["proj"])
        return None

    def expert_indexed(self, name: str) -> tuple[int, int] | None:
        """``(layer, expert dim)`` of a tensor indexed by expert besides the experts themselves (the router's weight
        and bias, a score-correction bias): expert removal keeps its entries of the kept experts."""
        for pattern, dim in self._expert_indexed:
            if m := pattern.match(name):
                return int(m["layer"]), dim
        return None

    # --- what a keep selects -------------------------------------------------------------------------
    def plain_selection(self, name: str, keep: KeepIndices) -> tuple[int, Tensor] | None:
        """``(axis, index)`` that ``keep`` selects from the 1-D/2-D tensor called ``name`` (a per-expert key, a
        shared-expert projection or a q/k/v/o projection), or None when it is kept whole. The fused 3-D expert
        tensors are not plain (each expert keeps its own rows): the reader gathers those expert by expert."""
        if (e := self.expert_key(name)) is not None:
            if e.layer not in keep.experts:
                return None
            return (0 if e.role in _ROWS_OF else 1), keep.experts[e.layer][e.expert]
        if self._shared is not None and (m := self._shared.match(name)):
            layer = int(m["layer"])
            if layer not in keep.shared or (m["proj"] == "down_proj" and m["kind"] == "bias"):
                return None  # down's bias is indexed by hidden, not by neuron
            return (0 if m["proj"] != "down_proj" else 1), keep.shared[layer]
        if m := self._attention.match(name):
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
    the safetensors headers alone (no tensor is read), or None. The loader finds each in-memory tensor under its own
    name (``model.layers.<i>.``) or save_pretrained's renaming of it; a multimodal wrapper's hub checkpoint keeps the
    decoder layers under another prefix (Qwen3.5-MoE: ``model.language_model.layers.<i>.``, experts fused) that it
    does not map yet, so such a source is refused before any weight is read instead of failing mid-load."""
    hub_prefix = get_family(config).checkpoint_keys.hub_decoder_layers
    if not hub_prefix or not os.path.isdir(source):
        return None
    for path in weight_files(source):
        header, _ = safetensors_header(path)
        key = next((k for k in header or () if k.startswith(hub_prefix + ".")), None)
        if key is not None:
            return (f"{source} keeps its decoder layers under {hub_prefix}. (e.g. {key!r}), the multimodal hub layout, "
                    "which the sharded loader does not read yet; train it single-process or with FSDPStrategy "
                    "(both load it with stock from_pretrained)")
    return None
