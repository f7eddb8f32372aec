"""Block-FP8 hub checkpoints (DeepSeek-V3 / R1, MiniMax-M2) are dequantized on load (lightning_slimmoe/dequantize.py).

Each test writes a tiny checkpoint in the hub's FP8 layout — per-expert keys, every linear ``X.weight`` float8_e4m3fn
in 128x128 blocks with its fp32 ``X.weight_scale_inv``, embeddings / norms / router / lm_head unquantized — with
dims (200, 136) that leave partial edge blocks, and its dequantized fp32 twin (no ``quantization_config``). Loading,
slimming (whole or through the sharded reader, at any row offset), fingerprints and exports of the FP8 dir must
equal those of the twin bit for bit; other quantization formats and incomplete FP8 checkpoints are refused.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from helpers import FP8_BLOCK, FP8_CONFIG, FP8_NOT_QUANTIZED, quantize_blocks, random_batch, random_keep, tiny_model
from lightning_slimmoe.config import ConfigError
from lightning_slimmoe.dequantize import Fp8Blocks, UnsupportedQuantizationError, scale_pairs
from lightning_slimmoe.export import export_hf, export_sharded_hf
from lightning_slimmoe.loading import CheckpointReader, materialize_, meta_model, pending_fingerprint
from lightning_slimmoe.models import persistent_tensors
from lightning_slimmoe.module import model_fingerprint
from lightning_slimmoe.slimming import remove_experts_, slim_model_
from lightning_slimmoe.sources import check_weight_files, load_config, load_model

BLOCK = FP8_BLOCK
# hidden 200 and expert width 136 are not multiples of 128: every expert and projection has partial edge blocks
DIMS = dict(hidden_size=200, moe_intermediate_size=136, intermediate_size=264)
FP8_FAMILIES = {
    "deepseek_v3": (DIMS, {}),
    "minimax_m2": (dict(hidden_size=200, intermediate_size=136),
                   {"modules_to_not_convert": ["gate", "e_score_correction_bias", "lm_head"]}),  # as the hub's
}


def dequantize_blocks(q_RC: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The reference dequantization, block by block (independent of the library's vectorised one)."""
    out_RC = q_RC.float()
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            out_RC[i * BLOCK:(i + 1) * BLOCK, j * BLOCK:(j + 1) * BLOCK] *= scale[i, j]
    return out_RC


def _save(tensors: dict, out: Path, config: dict, shards: int = 1) -> None:
    """Write ``tensors`` as an HF dir; with ``shards`` > 1, round-robin over files (a scale may sit in another shard
    than its weight, as nothing in the format forbids)."""
    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps(config))
    if shards == 1:
        save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
        return
    names = sorted(tensors)
    files = [f"model-{k + 1:05d}-of-{shards:05d}.safetensors" for k in range(shards)]
    weight_map = {name: files[k % shards] for k, name in enumerate(names)}
    for file in files:
        save_file({n: tensors[n] for n in names if weight_map[n] == file}, out / file, metadata={"format": "pt"})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def write_fp8_pair(root: Path, family: str) -> tuple[Path, Path]:
    """``(fp8 dir, dequantized twin dir)`` of one tiny random model of ``family`` in the hub layout."""
    dims, extra = FP8_FAMILIES[family]
    tiny_model(family, **dims).save_pretrained(root / "orig")  # the hub layout: per-expert keys
    hub = load_file(root / "orig" / "model.safetensors")
    config = json.loads((root / "orig" / "config.json").read_text())
    if family == "deepseek_v3":  # the hub's MTP layer model.layers.<num_hidden_layers>: FP8 too, never read
        hub[f"model.layers.{config['num_hidden_layers']}.mlp.experts.0.gate_proj.weight"] = torch.randn(136, 200)
    fp8, twin = {}, {}
    for key, tensor in hub.items():
        if tensor.dim() == 2 and key.endswith(".weight") and not any(p in key for p in FP8_NOT_QUANTIZED):
            q_RC, scale = quantize_blocks(tensor)
            fp8[key], fp8[key + "_scale_inv"] = q_RC, scale
            twin[key] = dequantize_blocks(q_RC, scale)
        else:
            fp8[key] = twin[key] = tensor
    _save(fp8, root / "fp8", {**config, "quantization_config": {**FP8_CONFIG, **extra}}, shards=2)
    _save(twin, root / "twin", config)
    return root / "fp8", root / "twin"


@pytest.fixture(scope="module", params=sorted(FP8_FAMILIES))
def pair(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    return (request.param, *write_fp8_pair(root, request.param))


def assert_same_weights(a, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert sa[name].dtype == sb[name].dtype and torch.equal(sa[name], sb[name]), name


def loaded(source, dtype=torch.float32, **kw):
    model = meta_model(str(source), dtype, **kw)
    assert materialize_(model, "cpu")
    return model.eval()


# --- (a) the FP8 dir loads as its dequantized twin ---------------------------------------------------------------
def test_fp8_dir_loads_as_its_dequantized_twin(pair):
    family, fp8, twin = pair
    check_weight_files("teacher", str(fp8))  # every float8 weight has its scale
    assert not hasattr(load_config("teacher", str(fp8)), "quantization_config")
    ids = random_batch()["input_ids"]
    for dtype in (torch.float32, torch.bfloat16):
        ours = load_model(str(fp8), dtype)
        reference = AutoModelForCausalLM.from_pretrained(twin, dtype=dtype).eval()
        assert not ours.training and "quantization_config" not in ours.config.to_dict()
        assert_same_weights(ours, reference)
        with torch.no_grad():
            assert torch.equal(ours(input_ids=ids).logits, reference(input_ids=ids).logits)
        # the fingerprint a sharded run records before loading is the one a single process records
        assert pending_fingerprint(meta_model(str(fp8), dtype)) == model_fingerprint(ours)


def test_fp8_weights_are_not_those_of_a_plain_cast(pair):
    """Guard on the fixture: the scales matter (a cast of the float8 values alone would be far off)."""
    family, fp8, twin = pair
    raw = {k: v for f in sorted(fp8.glob("*.safetensors")) for k, v in load_file(f).items()}
    weight = next(k for k in raw if k.endswith("experts.1.down_proj.weight") or k.endswith("experts.1.w2.weight"))
    assert raw[weight].dtype == torch.float8_e4m3fn and weight + "_scale_inv" in raw
    assert not torch.allclose(raw[weight].float(), load_file(twin / "model.safetensors")[weight])


# --- (b) the same slimmed model from both, through the sharded reader too --------------------------------------
def test_sharded_reader_slims_fp8_as_twin(pair):
    family, fp8, twin = pair
    # expert removal too where the tiny model allows it (DeepSeek-V3's 2 groups of top-2 need all 4 experts)
    kept_experts = {} if family == "deepseek_v3" else {0: torch.tensor([3, 0]), 1: torch.tensor([1, 2])}
    reference = AutoModelForCausalLM.from_pretrained(twin).eval()
    if kept_experts:
        remove_experts_(reference, kept_experts)
    keep = random_keep(reference, width=72, groups=reference.config.num_key_value_heads, shared_width=72, seed=5)
    assert any(k.min() < BLOCK <= k.max() for k in keep.experts.values())  # kept rows span two scale blocks
    slim_model_(reference, keep)
    got = loaded(fp8, keep=keep, kept_experts=kept_experts)
    assert_same_weights(got, reference)
    ids = random_batch()["input_ids"]
    with torch.no_grad():
        assert torch.equal(got(input_ids=ids).logits, reference(input_ids=ids).logits)
    # Each FSDP2 rank reads its own dim-0 chunk: 3 uneven chunks start inside scale blocks (e.g. row 67 of 200).
    like = dict(persistent_tensors(meta_model(str(fp8), torch.float32, keep=keep, kept_experts=kept_experts)))
    with CheckpointReader(fp8, got, keep, kept_experts) as ours, CheckpointReader(twin, got, keep, kept_experts) as ref:
        for name, tensor in like.items():
            if tensor.dim() == 0:
                continue
            bounds = [0, *torch.tensor([len(c) for c in torch.arange(tensor.shape[0]).chunk(3)]).cumsum(0).tolist()]
            for start, stop in zip(bounds, bounds[1:]):
                a = [b for _, b in ours.blocks(name, tensor, start, stop)]
                b = [b for _, b in ref.blocks(name, tensor, start, stop)]
                assert len(a) == len(b) and all(torch.equal(x.float(), y.float()) for x, y in zip(a, b)), \
                    (name, start, stop)


# --- (c) the export of a slimmed FP8-loaded model is a plain checkpoint --------------------------------------
def test_export_of_slimmed_fp8_model_reloads_with_stock_from_pretrained(pair, tmp_path):
    family, fp8, twin = pair
    student = load_model(str(fp8), torch.float32)
    keep = random_keep(student, width=72, groups=student.config.num_key_value_heads, shared_width=72, seed=7)
    slim_model_(student, keep)
    ids = random_batch()["input_ids"]
    whole = export_hf(student, tmp_path / "whole", probe_ids=ids)  # reloads with stock from_pretrained, same logits
    streamed = export_sharded_hf(loaded(fp8, keep=keep), tmp_path / "streamed")  # the sharded run's writer
    reference = slim_model_(AutoModelForCausalLM.from_pretrained(twin).eval(), keep)
    for out in (whole, streamed):
        config = json.loads((out / "config.json").read_text())
        assert "quantization_config" not in config and config["model_type"] == family
        files = list(out.glob("*.safetensors"))
        assert files and not any(k.endswith("_scale_inv") for f in files for k in load_file(f))
        assert_same_weights(AutoModelForCausalLM.from_pretrained(out).eval(), reference)


# --- (d) formats that are not read are refused, naming them ----------------------------------------------------
@pytest.mark.parametrize("quantization, named", [
    ({"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}, "'bitsandbytes'"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 128}, "'gptq'"),
    ({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemm"}, "'awq'"),
    ({"quant_method": "mxfp4", "modules_to_not_convert": ["router", "lm_head"]}, "'mxfp4'"),
    ({"quant_method": "compressed-tensors", "format": "float-quantized"}, "'compressed-tensors'"),
    ({**FP8_CONFIG, "weight_block_size": None}, "weight_block_size=None"),
    ({**FP8_CONFIG, "weight_block_size": [128]}, r"weight_block_size=\[128\]"),
])
def test_unsupported_quantization_is_refused_before_any_weight(tmp_path, pair, quantization, named):
    family, _, twin = pair
    source = Path(shutil.copytree(twin, tmp_path / "q"))
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "quantization_config": quantization}))
    with pytest.raises(ConfigError, match=rf"teacher='.*q'.*{named}.*not read"):
        load_config("teacher", str(source))
    with pytest.raises(ConfigError, match=named):
        load_model(str(source), torch.float32)
    with pytest.raises(UnsupportedQuantizationError, match=named):
        meta_model(str(source), torch.float32)


# --- (e) incomplete FP8 checkpoints are clear errors -------------------------------------------------------------
def _rewrite(source: Path, tmp_path: Path, change) -> Path:
    out = Path(shutil.copytree(source, tmp_path / "broken"))
    for file in out.glob("*.safetensors"):
        tensors = load_file(file)
        changed = change(tensors)
        if changed is not None:
            save_file(changed, file, metadata={"format": "pt"})
            if (out / "model.safetensors.index.json").exists():
                index = json.loads((out / "model.safetensors.index.json").read_text())
                index["weight_map"] = {k: v for k, v in index["weight_map"].items() if k in changed or v != file.name}
                (out / "model.safetensors.index.json").write_text(json.dumps(index))
    return out


def test_missing_weight_scale_inv_is_a_clear_error(tmp_path, pair):
    family, fp8, _ = pair
    victim = ("model.layers.1.mlp.experts.2.down_proj.weight_scale_inv" if family == "deepseek_v3"
              else "model.layers.1.block_sparse_moe.experts.2.w2.weight_scale_inv")
    broken = _rewrite(fp8, tmp_path, lambda t: {k: v for k, v in t.items() if k != victim} if victim in t else None)
    message = rf"{victim[: -len('_scale_inv')]} is F8_E4M3 but its {victim} is missing"
    with pytest.raises(ConfigError, match=message):
        check_weight_files("teacher", str(broken))  # the pipeline's header check, before any weight is read
    with pytest.raises(UnsupportedQuantizationError, match=message):
        load_model(str(broken), torch.float32)


def test_scale_grid_that_does_not_match_is_a_clear_error(tmp_path, pair):
    family, fp8, _ = pair

    def halve_blocks(tensors):  # scales for 64x64 blocks under a [128, 128] config
        keys = [k for k in tensors if k.endswith("_scale_inv")]
        return {**tensors, **{k: tensors[k].repeat_interleave(2, 0).repeat_interleave(2, 1) for k in keys}}
    broken = _rewrite(fp8, tmp_path, halve_blocks)
    with pytest.raises(ConfigError, match=r"_scale_inv has shape \[\d+, \d+\], but a \[\d+, \d+\] weight in 128x128"):
        check_weight_files("teacher", str(broken))


def test_float8_weights_without_fp8_config_are_refused(tmp_path, pair):
    family, fp8, _ = pair
    broken = Path(shutil.copytree(fp8, tmp_path / "noconfig"))
    config = json.loads((broken / "config.json").read_text())
    del config["quantization_config"]
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="is F8_E4M3 but config.json has no block-FP8 quantization_config"):
        check_weight_files("teacher", str(broken))


# --- the dequantizer itself --------------------------------------------------------------------------------------
class _Slice:
    """A stand-in for a safetensors slice (``get_shape`` + ``[a:b]``) over an in-memory tensor."""

    def __init__(self, tensor):
        self.tensor = tensor

    def get_shape(self):
        return list(self.tensor.shape)

    def __getitem__(self, item):
        return self.tensor[item]


def test_read_rows_of_2d_and_fused_3d_weights():
    torch.manual_seed(0)
    blocks = Fp8Blocks(BLOCK, BLOCK)
    q_RC, s = quantize_blocks(torch.randn(300, 200))
    full_RC = dequantize_blocks(q_RC, s)
    for start, stop in ((0, 300), (0, 0), (5, 6), (100, 260), (127, 129), (256, 300)):
        got = blocks.read_rows("x.weight", _Slice(q_RC), _Slice(s), start, stop)
        assert torch.equal(got, full_RC[start:stop]), (start, stop)
    # fused experts [E, R, C] with scales [E, ceil(R/128), ceil(C/128)]: dim 0 (experts) is not blocked
    pieces = [quantize_blocks(torch.randn(136, 200)) for _ in range(3)]
    q_ERC, s_E = torch.stack([p[0] for p in pieces]), torch.stack([p[1] for p in pieces])
    got = blocks.read_rows("mlp.experts.gate_up_proj", _Slice(q_ERC), _Slice(s_E), 1, 3)
    assert torch.equal(got, torch.stack([dequantize_blocks(*p) for p in pieces[1:]]))


def test_a_scale_pairs_with_its_own_weight_only():
    """``X.weight_scale_inv`` belongs to ``X.weight``: the router ``mlp.gate.weight`` never takes the scale of
    ``mlp.gate_proj.weight``, and a scale whose own weight is absent is an error, not a guess."""
    blocks = Fp8Blocks(BLOCK, BLOCK)
    dtypes = {"m.mlp.gate.weight": "BF16", "m.mlp.gate_proj.weight": "F8_E4M3",
              "m.mlp.gate_proj.weight_scale_inv": "F32"}
    shapes = {"m.mlp.gate.weight": (4, 200), "m.mlp.gate_proj.weight": (136, 200),
              "m.mlp.gate_proj.weight_scale_inv": (2, 2)}
    assert scale_pairs(dtypes, shapes, blocks, "ckpt") == {"m.mlp.gate_proj.weight": "m.mlp.gate_proj.weight_scale_inv"}
    orphan = {"m.mlp.gate.weight": "BF16", "m.mlp.gate.weight.weight_scale_inv": "F32"}
    with pytest.raises(UnsupportedQuantizationError, match="has no weight 'm.mlp.gate.weight.weight'"):
        scale_pairs(orphan, {}, blocks, "ckpt")
    with pytest.raises(UnsupportedQuantizationError, match="has a _scale_inv but is BF16, not float8"):
        scale_pairs({"m.w.weight": "BF16", "m.w.weight_scale_inv": "F32"}, {}, blocks, "ckpt")


def test_teacher_8bit_with_an_fp8_teacher_is_refused(pair):
    """bitsandbytes would take the float8 values without their scales: refused at planning, before any weight."""
    from types import SimpleNamespace

    from lightning_slimmoe.config import RunConfig, StageConfig
    from lightning_slimmoe.planning import plan_run, plan_shapes

    pytest.importorskip("bitsandbytes")
    family, fp8, _ = pair
    config = RunConfig(teacher=str(fp8), teacher_8bit=True, stages=[StageConfig(name="s", expert_width=64)])
    trainer = SimpleNamespace(strategy=object(), precision="32-true", world_size=1, accumulate_grad_batches=1)
    with pytest.raises(ConfigError, match="teacher_8bit: true with teacher=.*block FP8"):
        plan_run(config, plan_shapes(config), datamodule=None, trainer=trainer)
