"""Quantized hub checkpoints: which formats are read, and block-FP8 weights dequantized tensor by tensor on load.

DeepSeek-V3 / R1 / V3.2 and MiniMax-M2 ship block FP8: ``config.json`` has ``quantization_config:
{"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128], ...}`` and every quantized linear
``X.weight`` (float8_e4m3fn, ``[R, C]``) has a ``X.weight_scale_inv`` (fp32, ``[ceil(R/128), ceil(C/128)]``): the
weight is ``X.weight.float() * scale_inv``, each scale covering one 128x128 block, cropped at the edges. Modules the
publisher left unquantized (embeddings, norms, the router ``gate``, ``lm_head``: ``modules_to_not_convert``) are
stored in bf16/fp32 without a scale and read as they are, so that list is not needed here: the checkpoint itself
says, per tensor, what is quantized (a float8 tensor must have its scale; a scale must have its weight).

Slimming keeps rows and columns that span scale blocks, so a weight is dequantized *before* anything is sliced:
the checkpoint reader (loading.py, used by every load — single process, FSDP2 shards, scoring, the fingerprint)
asks :meth:`Fp8Blocks.read_rows` for the dim-0 rows it needs, which dequantizes the covering 128-row blocks only
and crops them, so a rank still reads no more than its rows (rounded out to blocks). The model is built from the
config without its ``quantization_config`` (:func:`without_quantization`), so it holds plain tensors in the
training dtype and every export is a plain bf16/fp32 checkpoint that stock ``from_pretrained`` reloads.

Why not transformers' own ``FineGrainedFP8Config(dequantize=True)`` (the default on CPU): in 5.23 its
``Fp8Dequantize`` derives the block size from ``rows // scale_rows``, which is wrong for any dim that is not a
multiple of 128 (a 200-row weight with 2 scale rows is taken as 100-row blocks, silently; DeepSeek-V3's
576-row ``kv_a_proj_with_mqa`` with 5 scale rows fails), and it would not read a rank's rows alone.

gpt-oss ships its routed experts in MXFP4 (``quantization_config: {"quant_method": "mxfp4", ...}``): each fused
``<layer>.mlp.experts.gate_up_proj`` / ``down_proj`` is stored as ``<name>_blocks`` (uint8 ``[E, out, in/32, 16]``,
two FP4 e2m1 values per byte, low nibble first) and ``<name>_scales`` (uint8 ``[E, out, in/32]``, one power-of-two
exponent per 32 values, bias 127); everything else (attention, router, expert biases, embeddings) is bf16. The
32-value blocks run along each projection's input: along the hidden size for gate_up_proj, whose neurons are its
output rows, but along the neurons for down_proj, so no neuron can be sliced out of a packed down_proj: the reader
(loading.py) dequantizes whole experts, one at a time, with transformers' own ``convert_moe_packed_tensors`` (its FP4
table and its ``[E, in, out]`` result, which is the in-memory layout), then slices. MXFP4 is read for gpt-oss only,
the one family transformers' MXFP4 layout (``integrations/mxfp4.py``) describes; :func:`hub_quantization` refuses it
elsewhere.

Formats the project cannot read (bitsandbytes, GPTQ, AWQ, compressed-tensors, ..., MXFP4 outside gpt-oss, and an
FP8 config that is not 2-D block-scaled) are refused with the method named, before any weight is read.

Shapes: R rows, C columns of a weight; E experts of a fused 3-D weight; br x bc the scale block.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
from torch import Tensor

from lightning_slimmoe.storage import safetensors_header, weight_files

SCALE_SUFFIX = "_scale_inv"  # X.weight -> X.weight_scale_inv (transformers' and the hub's naming)
FP8_DTYPES = ("F8_E4M3", "F8_E5M2")  # safetensors names of the float8 weight dtypes
_READABLE = "fp8"  # the only quant_method read (block-scaled, dequantized on load)


MXFP4_METHOD = "mxfp4"
MXFP4_MODEL_TYPES = ("gpt_oss",)  # the families whose experts transformers' MXFP4 layout describes
MXFP4_BLOCKS, MXFP4_SCALES = "_blocks", "_scales"  # X.gate_up_proj -> X.gate_up_proj_blocks / _scales
MXFP4_BLOCK = 32  # FP4 values per scale, along the projection's input


class UnsupportedQuantizationError(ValueError):
    """A checkpoint quantized in a format this project cannot read, or FP8 weights whose scales do not fit."""


@dataclass(frozen=True)
class Fp8Blocks:
    """Block-FP8 weights: one fp32 ``scale_inv`` per ``block_rows x block_cols`` block of the last two dims."""

    block_rows: int = 128
    block_cols: int = 128

    @staticmethod
    def scale_key(key: str) -> str:
        """The scale of checkpoint tensor ``key``: exactly ``<key>_scale_inv`` (``X.weight`` ->
        ``X.weight_scale_inv``; a fused ``X.gate_up_proj`` -> ``X.gate_up_proj_scale_inv``), never another's."""
        return key + SCALE_SUFFIX

    def scale_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The ``scale_inv`` shape of a weight of ``shape`` (leading dims, e.g. fused experts, are not blocked)."""
        *lead, rows, cols = shape
        return (*lead, math.ceil(rows / self.block_rows), math.ceil(cols / self.block_cols))

    def dequantize(self, q_RC: Tensor, scale: Tensor) -> Tensor:
        """``q`` (float8, ``[..., R, C]``) times its block scales (``[..., ceil(R/br), ceil(C/bc)]``), in float32."""
        rows, cols = q_RC.shape[-2:]
        s = _scale_values(scale)
        s_RC = s.repeat_interleave(self.block_rows, dim=-2)[..., :rows, :].repeat_interleave(self.block_cols, dim=-1)
        return q_RC.to(torch.float32) * s_RC[..., :cols]

    def read_rows(self, key: str, weight, scale, start: int, stop: int) -> Tensor:
        """Rows ``[start, stop)`` of dim 0 of the dequantized ``key``, float32. ``weight`` and ``scale`` are
        safetensors slices (``get_slice``): a 2-D weight is read for the 128-row blocks covering the rows only,
        dequantized, then cropped; a 3-D (fused experts) weight's dim 0 is the expert, not blocked."""
        shape = tuple(weight.get_shape())
        self.check_scale(key, shape, tuple(scale.get_shape()))
        if len(shape) >= 3:
            return self.dequantize(weight[start:stop], scale[start:stop])
        first, last = start // self.block_rows, math.ceil(stop / self.block_rows)
        lo = first * self.block_rows
        block_RC = self.dequantize(weight[lo:min(last * self.block_rows, shape[0])], scale[first:last])
        return block_RC[start - lo:stop - lo]

    def check_scale(self, key: str, shape: tuple[int, ...], scale_shape: tuple[int, ...]) -> None:
        want = self.scale_shape(shape)
        if tuple(scale_shape) != want:
            raise UnsupportedQuantizationError(
                f"{self.scale_key(key)} has shape {list(scale_shape)}, but a {list(shape)} weight in "
                f"{self.block_rows}x{self.block_cols} blocks has {list(want)} scales: the checkpoint does not match "
                "its quantization_config.weight_block_size")


def _scale_values(scale: Tensor) -> Tensor:
    """Scales as float32. MXFP8-style ``ue8m0`` scales stored as bytes are exponents: ``2 ** (byte - 127)``."""
    if scale.dtype == torch.uint8:
        return (scale.to(torch.float32) - 127.0).exp2()
    return scale.to(torch.float32)


def quantization_method(quantization) -> str:
    """The ``quant_method`` of a ``quantization_config`` (a dict, as configs read from JSON hold it, or an object)."""
    if isinstance(quantization, Mapping):
        return str(quantization.get("quant_method"))
    return str(getattr(quantization, "quant_method", type(quantization).__name__))


def fp8_blocks(config_or_quantization) -> Fp8Blocks | None:
    """How the checkpoint of ``config`` (or its ``quantization_config`` dict) is quantized: None for plain weights,
    :class:`Fp8Blocks` for 2-D block FP8; any other format raises :class:`UnsupportedQuantizationError` naming it."""
    quantization = (config_or_quantization if isinstance(config_or_quantization, Mapping)
                    else getattr(config_or_quantization, "quantization_config", None))
    if not quantization:
        return None
    method = quantization_method(quantization)
    get = quantization.get if isinstance(quantization, Mapping) else lambda k, d=None: getattr(quantization, k, d)
    if method.lower().replace("-", "_") != _READABLE:
        raise UnsupportedQuantizationError(
            f"quantization_config.quant_method={method!r}: weights in this format are not read (only block FP8, "
            f"quant_method='fp8' with a 2-D weight_block_size, is dequantized on load). Convert the checkpoint to "
            "bf16 once (from_pretrained with the format's own dequantization, then save_pretrained) and pass that "
            "directory")
    block = get("weight_block_size")
    if (not isinstance(block, (list, tuple)) or len(block) != 2
            or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
        raise UnsupportedQuantizationError(
            f"quantization_config.quant_method='fp8' with weight_block_size={block!r}: only block-scaled FP8 with "
            "a 2-D block (e.g. [128, 128], one weight_scale_inv per block) is dequantized on load; per-tensor or "
            "per-channel FP8 is not read. Convert the checkpoint to bf16 once and pass that directory")
    if get("expert_dtype", "fp8") not in (None, "fp8"):  # packed FP4 experts (e.g. DeepSeek-V4)
        raise UnsupportedQuantizationError(
            f"quantization_config.quant_method='fp8' with expert_dtype={get('expert_dtype')!r}: packed FP4 experts "
            "are not read; convert the checkpoint to bf16 once and pass that directory")
    return Fp8Blocks(int(block[0]), int(block[1]))


@dataclass(frozen=True)
class Mxfp4Experts:
    """gpt-oss's MXFP4 experts: read through :func:`checkpoint_mxfp4` and :func:`dequantize_mxfp4_expert`."""

    block: int = MXFP4_BLOCK


def _is_mxfp4(quantization) -> bool:
    return bool(quantization) and quantization_method(quantization).lower() == MXFP4_METHOD


def _model_type(config) -> str | None:
    text = getattr(config, "text_config", None)  # a multimodal wrapper's language model
    return getattr(config, "model_type", None) if text is None else getattr(text, "model_type", None)


def hub_quantization(config) -> Fp8Blocks | Mxfp4Experts | None:
    """How the hub checkpoint of ``config`` is quantized and read: None for plain weights, :class:`Fp8Blocks` for 2-D
    block FP8, :class:`Mxfp4Experts` for gpt-oss's MXFP4 experts; any other format (MXFP4 of another family
    included) raises :class:`UnsupportedQuantizationError` naming it."""
    quantization = getattr(config, "quantization_config", None)
    if _is_mxfp4(quantization) and _model_type(config) in MXFP4_MODEL_TYPES:
        return Mxfp4Experts()
    return fp8_blocks(config)


def source_fp8_blocks(model_dir: str | Path) -> Fp8Blocks | None:
    """:func:`fp8_blocks` of the ``config.json`` in ``model_dir`` (read as JSON: no config class involved); None
    for a directory without one (a tensors-only dir, as an export is before its config is written), and for
    gpt-oss's MXFP4, which holds no FP8 (:func:`checkpoint_mxfp4` pairs its tensors)."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        return None
    config = json.loads(path.read_text())
    quantization = config.get("quantization_config") or {}
    if _is_mxfp4(quantization) and config.get("model_type") in MXFP4_MODEL_TYPES:
        return None
    return fp8_blocks(quantization)


def without_quantization(config):
    """``config`` (changed in place) without its ``quantization_config``: a model built from it holds plain tensors in
    the training dtype, and every config written from it (stage dirs, exports) describes the dequantized model."""
    if "quantization_config" in vars(config):
        delattr(config, "quantization_config")
    return config


def scale_pairs(dtypes: Mapping[str, str], shapes: Mapping[str, tuple[int, ...]], blocks: Fp8Blocks | None,
                where: str) -> dict[str, str]:
    """``{weight key: scale key}`` of a checkpoint's float8 tensors, from its safetensors headers (``dtypes``:
    key -> safetensors dtype name). Raises :class:`UnsupportedQuantizationError` for a float8 tensor without its
    scale (or in a checkpoint whose config declares no FP8), a scale without its float8 weight, or a scale grid that
    does not match the weight's shape."""
    pairs: dict[str, str] = {}
    for key, dtype in dtypes.items():
        if key.endswith(SCALE_SUFFIX):
            weight = key[: -len(SCALE_SUFFIX)]
            if weight not in dtypes:
                raise UnsupportedQuantizationError(f"{where}: {key} has no weight {weight!r} in the checkpoint")
            if dtypes[weight] not in FP8_DTYPES:  # read as it is, its scale would be silently dropped
                raise UnsupportedQuantizationError(
                    f"{where}: {weight} has a {SCALE_SUFFIX} but is {dtypes[weight]}, not float8: a quantization "
                    "format this project does not read")
            continue
        if dtype not in FP8_DTYPES:
            continue
        if blocks is None:
            raise UnsupportedQuantizationError(
                f"{where}: {key} is {dtype} but config.json has no block-FP8 quantization_config: its scales are "
                "unknown, so it cannot be dequantized")
        scale = blocks.scale_key(key)
        if scale not in dtypes:
            raise UnsupportedQuantizationError(
                f"{where}: {key} is {dtype} but its {scale} is missing from the checkpoint: without its block scales "
                "the weight cannot be dequantized (an incomplete download or conversion?)")
        blocks.check_scale(key, tuple(shapes[key]), tuple(shapes[scale]))
        pairs[key] = scale
    return pairs


@dataclass(frozen=True)
class HeaderEntry:
    """One tensor of a safetensors checkpoint, from its file's header: where it is, its dtype name and shape."""

    path: Path
    dtype: str
    shape: tuple[int, ...]


def checkpoint_headers(model_dir: str | Path) -> dict[str, HeaderEntry]:
    """Every tensor of the safetensors checkpoint in ``model_dir``, from the headers alone (no tensor is read)."""
    entries: dict[str, HeaderEntry] = {}
    for path in weight_files(model_dir):
        header, problem = safetensors_header(path)
        if problem is not None:
            raise ValueError(f"{path}: {problem}")
        for key, info in header.items():
            entries[key] = HeaderEntry(path, str(info["dtype"]), tuple(int(d) for d in info["shape"]))
    return entries


def checkpoint_fp8(model_dir: str | Path, headers: Mapping[str, HeaderEntry] | None = None
                   ) -> tuple[Fp8Blocks | None, dict[str, str]]:
    """``(blocks, {weight key: scale key})`` of the checkpoint in ``model_dir``, every float8 weight paired with its
    own scale (:func:`scale_pairs`); raises :class:`UnsupportedQuantizationError` naming what does not fit."""
    blocks = source_fp8_blocks(model_dir)
    headers = checkpoint_headers(model_dir) if headers is None else headers
    pairs = scale_pairs({k: e.dtype for k, e in headers.items()}, {k: e.shape for k, e in headers.items()}, blocks,
                        where=str(model_dir))
    return blocks, pairs


def checkpoint_mxfp4(model_dir: str | Path, headers: Mapping[str, HeaderEntry] | None = None
                     ) -> dict[str, tuple[str, str]]:
    """``{fused expert name: (blocks key, scales key)}`` of the MXFP4-packed tensors of the checkpoint in
    ``model_dir`` (uint8 ``<name>_blocks [E, out, in/32, 16]`` with ``<name>_scales [E, out, in/32]``), from the
    headers alone; {} for a checkpoint without any. Raises :class:`UnsupportedQuantizationError` for blocks without
    their scales (or the reverse), shapes that do not pair up, or packed tensors whose config.json declares no
    gpt-oss MXFP4."""
    headers = checkpoint_headers(model_dir) if headers is None else headers
    pairs: dict[str, tuple[str, str]] = {}
    for key, entry in headers.items():
        if not key.endswith(MXFP4_BLOCKS) or entry.dtype != "U8":
            continue
        name = key[: -len(MXFP4_BLOCKS)]
        scales = name + MXFP4_SCALES
        if scales not in headers:
            raise UnsupportedQuantizationError(
                f"{model_dir}: {key} is MXFP4-packed but its {scales} is missing from the checkpoint: without its "
                "scales it cannot be dequantized (an incomplete download or conversion?)")
        want = (*entry.shape[:-1],)
        if len(entry.shape) != 4 or entry.shape[-1] != MXFP4_BLOCK // 2 or headers[scales].shape != want:
            raise UnsupportedQuantizationError(
                f"{model_dir}: {key} {list(entry.shape)} with {scales} {list(headers[scales].shape)}: MXFP4 experts "
                f"are [E, out, in/{MXFP4_BLOCK}, {MXFP4_BLOCK // 2}] bytes with [E, out, in/{MXFP4_BLOCK}] scales")
        pairs[name] = (key, scales)
    orphans = [k for k, e in headers.items() if k.endswith(MXFP4_SCALES) and e.dtype == "U8"
               and k[: -len(MXFP4_SCALES)] not in pairs]
    if orphans:
        raise UnsupportedQuantizationError(f"{model_dir}: {orphans[0]} has no {MXFP4_BLOCKS} tensor beside it")
    if pairs:
        config_path = Path(model_dir) / "config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        if not (_is_mxfp4(config.get("quantization_config")) and config.get("model_type") in MXFP4_MODEL_TYPES):
            raise UnsupportedQuantizationError(
                f"{model_dir}: {next(iter(pairs))}{MXFP4_BLOCKS} is MXFP4-packed but config.json declares no "
                f"quant_method='mxfp4' of a {'/'.join(MXFP4_MODEL_TYPES)} model: its layout is unknown")
    return pairs


def dequantize_mxfp4_expert(blocks, scales, expert: int) -> Tensor:
    """Expert ``expert`` of an MXFP4-packed fused tensor (safetensors slices or tensors ``[E, out, in/32, 16]`` /
    ``[E, out, in/32]``), dequantized to float32 ``[in, out]``, the in-memory layout of gpt-oss's experts
    (gate_up_proj ``[H, 2I]``, down_proj ``[I, H]``). transformers' own conversion does it (its FP4 table, nibble
    order and exponent bias), so the values are those ``from_pretrained`` dequantizes to (in float32, which holds an
    FP4 value times its power-of-two scale exactly for every normal exponent)."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    return convert_moe_packed_tensors(blocks[expert:expert + 1], scales[expert:expert + 1], dtype=torch.float32)[0]
