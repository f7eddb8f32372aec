"""Where models and tokenizers come from: a hub id, a local HF dir, a config-only JSON or a shipped recipe file.

Each check here runs before any weight is read, so a bad source fails in seconds naming the field: a path that is
not a model dir, a model that ships code, an unsupported family, a quantization format that is not read, FP8
weights without their scales, pickled weights, tokenizers that differ.
:func:`load_model` then reads the weights, whole or (sharded runs) on the meta device with the load pending; a
block-FP8 checkpoint is dequantized as it is read (dequantize.py), so the model holds plain tensors either way.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from lightning_slimmoe.config import ConfigError
from lightning_slimmoe.dequantize import (Fp8Blocks, Mxfp4Experts, UnsupportedQuantizationError, checkpoint_fp8,
                                          checkpoint_mxfp4, hub_quantization, without_quantization)
from lightning_slimmoe.errors import InputNotFoundError
from lightning_slimmoe.families import UnsupportedModelError, get_family
from lightning_slimmoe.loading import materialize_, meta_model, own_mapped_tensors_
from lightning_slimmoe.storage import model_weights_problem

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_PICKLED = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def shipped_conf_dir() -> Path:
    """The recipes shipped with the project: ``conf/`` of the checkout, or its copy in the installed package."""
    here = Path(__file__).resolve().parent
    checkout = here.parent / "conf"
    return checkout if checkout.is_dir() else here / "conf"


def resolve_path(path: str) -> str:
    """``path`` as given when it exists; else, for a path under ``conf/``, the shipped file of that name (so an
    installed ``slimmoe`` finds ``conf/phi_tiny.yaml`` and the model JSONs it names from any directory)."""
    if os.path.exists(path) or not Path(path).parts or Path(path).parts[0] != "conf":
        return path
    shipped = shipped_conf_dir().joinpath(*Path(path).parts[1:])
    return str(shipped) if shipped.exists() else path


def _check_source(field: str, source: str) -> None:
    if os.path.exists(source):
        if not os.path.isfile(os.path.join(source, "config.json")):
            raise ConfigError(f"{field}={source!r}: directory has no config.json (not a Hugging Face model dir)")
        return
    if source.startswith((".", "/", "~")) or not _HUB_ID.match(source):
        raise InputNotFoundError(f"{field}={source!r}: no such local path, and not a hub id of the form 'org/name'")


def load_config(field: str, source: str, trust_remote_code: bool = False, local_files_only: bool = False):
    """The config of ``source`` (HF dir, hub id or config JSON) of a supported MoE family, else a clear error.
    ``local_files_only``: a hub id is read from the Hugging Face cache only (OSError when it is not there)."""
    if source.endswith(".json"):
        source = resolve_path(source)
        if not os.path.isfile(source):
            raise InputNotFoundError(f"{field}={source!r}: config file not found")
    else:
        _check_source(field, source)
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code,
                                            local_files_only=local_files_only)
    except ValueError as err:
        if "trust_remote_code" in str(err):
            raise ConfigError(
                f"{field}={source!r} ships custom modelling code (as the released Phi-mini/tiny-MoE checkpoints "
                "do); loading it runs that code, so it is off by default. Set `trust_remote_code: true` in the "
                "YAML only if you trust the source.") from err
        raise
    try:  # unsupported / dense model_type fails here, naming the key that points at it
        get_family(config)
    except UnsupportedModelError as err:
        raise UnsupportedModelError(f"{field}={source!r}: {err}") from None
    quantization_of(field, source, config)
    # Block FP8 is dequantized on load: every shape planned from here on, and every config written from it (stage
    # dirs, exports), describes the dequantized model.
    return without_quantization(config)


def offline_config(field: str, source: str, trust_remote_code: bool = False):
    """The config of ``source`` where it can be read without the network, checked as :func:`load_config` checks it:
    a local HF dir, or a hub id whose config is already in the Hugging Face cache. None where it cannot: a hub id not
    downloaded yet, or a local path that does not exist yet (a teacher that is still to be downloaded)."""
    if os.path.exists(source):
        return load_config(field, source, trust_remote_code)
    if source.startswith((".", "/", "~")) or not _HUB_ID.match(source):
        return None
    try:
        return load_config(field, source, trust_remote_code, local_files_only=True)
    except OSError:  # not in the cache (transformers says so with an OSError; nothing was fetched)
        return None


def quantization_of(field: str, source: str, config=None, trust_remote_code: bool = False
                    ) -> Fp8Blocks | Mxfp4Experts | None:
    """How the weights of ``source`` are quantized: None (plain), block FP8 or gpt-oss's MXFP4 experts (both
    dequantized on load); any other format is refused naming it and the field, before any weight is read."""
    if config is None:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    try:
        return hub_quantization(config)
    except UnsupportedQuantizationError as err:
        raise ConfigError(f"{field}={source!r} holds quantized weights that are not read: {err}") from err


def check_weight_files(field: str, source: str | None) -> None:
    """Weights are read from safetensors only (a pickled ``pytorch_model.bin`` can run code when loaded), and every
    safetensors file is checked against its header and the index before anything is written: a truncated or damaged
    shard is named now, not hours later (headers only; no tensor is read)."""
    if not source or not os.path.isdir(source):
        return  # hub ids: from_pretrained(use_safetensors=True) refuses pickled weights itself
    files = os.listdir(source)
    if not any(f.endswith(".safetensors") or f.endswith(".safetensors.index.json") for f in files):
        pickled = sorted(f for f in files if f.endswith(_PICKLED))
        raise ConfigError(
            f"{field}={source!r}: no *.safetensors weights in the directory"
            + (f" (found {pickled}: pickle-based weights are refused because loading them can run code; "
               "convert them once, in a process you trust, with "
               "`AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)`)"
               if pickled else ""))
    problem = model_weights_problem(source)
    if problem is not None:
        raise ConfigError(f"{field}={source!r}: damaged weights: {problem}")
    try:  # every float8 weight has its own weight_scale_inv of the right grid, MXFP4 blocks their scales (headers)
        checkpoint_fp8(source)
        checkpoint_mxfp4(source)
    except UnsupportedQuantizationError as err:
        raise ConfigError(f"{field}={source!r}: {err}") from err


def load_model(source: str, dtype: torch.dtype, trust_remote_code: bool = False, sharded: bool = False):
    """The model in ``source``, whole (``from_pretrained``) — or, for a sharded run, on the meta device with
    its load pending: ``StageModule.configure_model`` shards it and each rank reads only its own rows of every
    tensor (loading.py), so no rank ever holds the whole model (docs/design.md §4)."""
    if sharded:
        return meta_model(source, dtype, trust_remote_code=trust_remote_code)
    if quantization_of("model", source, trust_remote_code=trust_remote_code) is not None:
        # Block FP8 / MXFP4: read whole through the checkpoint reader a sharded rank uses, which dequantizes each
        # tensor (transformers' own FP8 dequantization gets edge blocks wrong, dequantize.py), in the training dtype.
        model = meta_model(source, dtype, trust_remote_code=trust_remote_code)
        materialize_(model, "cpu")
        return model.eval()
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, trust_remote_code=trust_remote_code,
                                                 use_safetensors=True)
    own_mapped_tensors_(model)  # no checkpoint pages stay resident for the run (loading.py)
    return model


def tokenizer_signature(tokenizer) -> dict:
    vocab = sorted(tokenizer.get_vocab().items())
    return {"vocab_hash": hashlib.sha256(json.dumps(vocab).encode()).hexdigest(), "size": len(tokenizer),
            "special": {k: v for k, v in sorted(tokenizer.special_tokens_map.items()) if isinstance(v, str)},
            "eos_token_id": tokenizer.eos_token_id, "bos_token_id": tokenizer.bos_token_id}


def check_tokenizers_match(what: str, ours, theirs) -> None:
    a, b = tokenizer_signature(ours), tokenizer_signature(theirs)
    if a != b:
        diff = {k: (a[k], b[k]) for k in a if a[k] != b[k]}
        raise ConfigError(f"{what}: tokenizers differ (a different tokenizer, even with the same vocab size, makes "
                          f"KD compare unrelated tokens): {diff}")
