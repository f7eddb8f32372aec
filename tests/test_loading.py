"""Sharded loading (lightning_slimmoe/loading.py): a meta-built model filled from safetensors equals
``from_pretrained`` (+ ``slim_model_``) exactly, and under 2 gloo ranks no rank holds the whole model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from helpers import ATTN_PRUNABLE, FAMILIES, random_batch, random_keep, tiny_model
from lightning_slimmoe.loading import materialize_, meta_model, pending_fingerprint, pending_load
from lightning_slimmoe.module import model_fingerprint
from lightning_slimmoe.slimming import remove_experts_, slim_model_

ROOT = Path(__file__).resolve().parents[1]


def assert_same_model(a, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert sa[name].dtype == sb[name].dtype and torch.equal(sa[name], sb[name]), name
    ba, bb = dict(a.named_buffers()), dict(b.named_buffers())  # incl. non-persistent (rotary inv_freq)
    assert ba.keys() == bb.keys() and all(torch.equal(ba[k], bb[k]) for k in ba)
    config = lambda m: {k: v for k, v in m.config.to_dict().items() if k != "_name_or_path"}
    assert config(a) == config(b)


def loaded(source, dtype=torch.float32, **kw):
    model = meta_model(str(source), dtype, **kw)
    assert next(model.parameters()).is_meta
    assert materialize_(model, "cpu") and pending_load(model) is None
    assert not materialize_(model, "cpu")  # idempotent: a loaded model is left alone
    return model.eval()


@pytest.mark.parametrize("family_name", FAMILIES)
def test_meta_load_equals_from_pretrained(family_name, tmp_path):
    tiny_model(family_name).save_pretrained(tmp_path)
    for dtype in (torch.float32, torch.bfloat16):
        reference = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=dtype).eval()
        assert_same_model(loaded(tmp_path, dtype), reference)
        # The fingerprint of the pending (unloaded) model is the one a loaded model gives.
        assert pending_fingerprint(meta_model(str(tmp_path), dtype)) == model_fingerprint(reference)


@pytest.mark.parametrize("family_name", FAMILIES)
def test_meta_load_with_keep_equals_slim_model(family_name, tmp_path):
    model = tiny_model(family_name)
    model.save_pretrained(tmp_path)
    groups = 1 if family_name in ATTN_PRUNABLE else model.config.num_key_value_heads
    keep = random_keep(model, width=8, groups=groups, shared_width=12, seed=3)
    reference = slim_model_(AutoModelForCausalLM.from_pretrained(tmp_path).eval(), keep)
    got = loaded(tmp_path, keep=keep)
    assert_same_model(got, reference)
    ids = random_batch()["input_ids"]
    with torch.no_grad():
        assert torch.equal(got(input_ids=ids).logits, reference(input_ids=ids).logits)


def test_meta_load_with_expert_removal_and_keep(tmp_path):
    model = tiny_model("qwen2_moe")
    model.save_pretrained(tmp_path)
    kept_experts = {0: torch.tensor([3, 1]), 1: torch.tensor([0, 2])}
    reference = remove_experts_(AutoModelForCausalLM.from_pretrained(tmp_path).eval(), kept_experts)
    keep = random_keep(reference, width=8, groups=1, shared_width=12, seed=4)
    slim_model_(reference, keep)
    assert_same_model(loaded(tmp_path, keep=keep, kept_experts=kept_experts), reference)


def test_fused_layout_and_sharded_files(tmp_path):
    """A checkpoint in the in-memory layout (fused 3-D experts), split over several files, loads too."""
    model = tiny_model("phimoe")
    model.save_pretrained(tmp_path)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    (tmp_path / "model.safetensors").unlink()
    names = sorted(state)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in halves.items():
        save_file({k: state[k] for k in keys}, str(tmp_path / file), metadata={"format": "pt"})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: f for f, keys in halves.items() for k in keys}}))
    keep = random_keep(model, width=8, groups=1, seed=7)
    assert_same_model(loaded(tmp_path, keep=keep), slim_model_(model, keep))


def test_tied_embeddings(tmp_path):
    model = tiny_model("qwen3_moe", tie_word_embeddings=True)
    model.save_pretrained(tmp_path)
    reference = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    got = loaded(tmp_path)
    assert got.lm_head.weight is got.model.embed_tokens.weight
    assert_same_model(got, reference)
    assert pending_fingerprint(meta_model(str(tmp_path), torch.float32)) == model_fingerprint(reference)


def test_missing_tensor_is_named(tmp_path):
    model = tiny_model("mixtral")
    model.save_pretrained(tmp_path)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "model.norm.weight"}
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(KeyError, match="model.norm.weight"):
        loaded(tmp_path)


@pytest.mark.distributed
def test_sharded_scores_equal_single_process(tmp_path):
    """Every criterion scored on FSDP2-sharded student and teacher (2 gloo ranks) gives the single-process
    scores, so every rank keeps what one process keeps (docs/design.md §5)."""
    from lightning_slimmoe.distill import KDConfig
    from lightning_slimmoe.importance import CRITERIA, compute_scores, expert_saliency
    from lightning_slimmoe.slimming import resolve_target, select_keep

    dirs = []
    for family_name in FAMILIES:
        tiny_model(family_name, seed=1).save_pretrained(tmp_path / family_name / "student")
        tiny_model(family_name, seed=2).save_pretrained(tmp_path / family_name / "teacher")
        dirs.append(str(tmp_path / family_name))
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(ROOT / "tests" / "sharded_scores_worker.py"), str(tmp_path / "scores.pt"), *dirs],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    sharded = torch.load(tmp_path / "scores.pt", weights_only=False)
    batches = [random_batch(seed=s) for s in range(3)]
    for source in dirs:
        student = AutoModelForCausalLM.from_pretrained(source + "/student").eval()
        teacher = AutoModelForCausalLM.from_pretrained(source + "/teacher").eval()
        groups = 1 if Path(source).name in ATTN_PRUNABLE else student.config.num_key_value_heads
        target = resolve_target(student.config, expert_width=8, attention_groups=groups)
        for criterion in CRITERIA:
            one = compute_scores(student, batches, criterion, teacher=teacher, kd=KDConfig(top_k=5, temperature=2.0),
                                 seed=3)
            two = sharded[source][criterion]
            for kind in ("experts", "shared", "groups"):
                a, b = getattr(one, kind), two[kind]
                assert a.keys() == b.keys(), (source, criterion, kind)
                for layer in a:
                    # Scores are sums of products of float32 gradients whose reduction order differs across ranks
                    # (Fisher squares them); the absolute tolerance follows the layer's scale, the ranking is
                    # checked exactly by the digest below.
                    scale = float(a[layer].abs().max())
                    where = f"{source} {criterion} {kind} {layer}"
                    torch.testing.assert_close(b[layer], a[layer], rtol=1e-5, atol=max(1e-8, 1e-5 * scale),
                                               msg=lambda m, where=where: f"{where}: {m}")
            assert select_keep(one, target).digest() == select_keep(type(one)(**two), target).digest()
        for layer, s in expert_saliency(student, batches).items():
            torch.testing.assert_close(sharded[source]["saliency"][layer], s, rtol=1e-5, atol=1e-8)


# ---------------------------------------------------------------------------------------------------
# Two gloo ranks: teacher + student loaded shard by shard, scored, sliced, exported — per-rank peak RSS
# ---------------------------------------------------------------------------------------------------
@pytest.mark.distributed
def test_two_ranks_never_hold_the_whole_model(tmp_path):
    """Each rank's peak RSS while loading teacher + student, scoring, slicing and exporting, against the size
    of ONE model: the whole-model path needs >= 1x per model loaded (2x for teacher + student, 3x with the
    scoring gradients); measured figures are in docs/scaling.md."""
    import os

    from transformers import AutoConfig

    # ~330 MB in fp32, nearly all of it experts (what dominates a real MoE), in 32 decoder layers so that one
    # layer — what FSDP gathers at a time — is a small part of the model, as in a real one.
    config = AutoConfig.for_model("qwen3_moe", vocab_size=512, hidden_size=512, num_hidden_layers=32,
                                  num_attention_heads=8, num_key_value_heads=4, head_dim=64, moe_intermediate_size=96,
                                  num_experts=12, num_experts_per_tok=2, intermediate_size=1024,
                                  max_position_embeddings=64, tie_word_embeddings=False)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "teacher")
    size = sum(p.stat().st_size for p in (tmp_path / "teacher").glob("*.safetensors"))
    assert size > 300 * 2**20
    # glibc's dynamic mmap threshold keeps freed multi-MB buffers (FSDP's per-layer all-gathers) in the heap, so
    # RSS would count memory the program has already released; a fixed threshold returns them to the OS and the
    # peak RSS measures what is live.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(ROOT / "tests" / "sharded_load_worker.py"), str(tmp_path / "teacher"), str(tmp_path / "out")],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    reports = [json.loads((tmp_path / "out" / f"rank{r}.json").read_text()) for r in range(2)]
    print(json.dumps({"checkpoint_MiB": round(size / 2**20, 1),
                      **{f"rank{i}": {k: round(v / 2**20, 1) for k, v in r.items() if k.endswith("growth")}
                         for i, r in enumerate(reports)}}))
    for report in reports:
        assert report["teacher_growth"] < 0.6 * size, (report, size)  # the teacher: half of it, never whole
        assert report["load_growth"] < 1.2 * size, (report, size)  # teacher + student (whole: 2x)
        assert report["peak_growth"] < 2.0 * size, (report, size)  # + scoring grads, slice, export (whole: 3x)
    # The streamed export reloads with stock from_pretrained to the single-process slice of the same model, in
    # the layout save_pretrained writes.
    from lightning_slimmoe.slimming import KeepIndices

    keep = KeepIndices.from_dict(torch.load(tmp_path / "out" / "keep.pt", weights_only=True))
    reference = slim_model_(AutoModelForCausalLM.from_pretrained(tmp_path / "teacher").eval(), keep)
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "hf").eval()
    assert_same_model(exported, reference)
    reference.save_pretrained(tmp_path / "reference")
    assert _weight_keys(tmp_path / "out" / "hf") == _weight_keys(tmp_path / "reference")


def _weight_keys(directory: Path) -> set[str]:
    from safetensors import safe_open

    keys = set()
    for file in directory.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as f:
            keys.update(f.keys())
    return keys


@pytest.mark.parametrize("family_name", ["deepseek_v3", "glm4_moe", "glm4_moe_lite"])
def test_mtp_layer_past_the_decoder_is_never_read(family_name, tmp_path):
    """DeepSeek-V3 / GLM hub checkpoints keep their MTP layer at model.layers.<num_hidden_layers>, under the decoder's
    own prefix. A checkpoint holding one (a copy of the last decoder layer's keys, other values, plus the MTP-only
    tensors) loads the decoder weights alone, single process and sharded reader alike, with and without a keep."""
    from safetensors import safe_open

    from lightning_slimmoe.checkpoint_layout import CheckpointLayout, sharded_read_problem
    from lightning_slimmoe.export import dropped_parts
    from lightning_slimmoe.sources import check_weight_files

    model = tiny_model(family_name, num_nextn_predict_layers=1)
    model.save_pretrained(tmp_path)
    n = model.config.num_hidden_layers
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    last = f"model.layers.{n - 1}."
    mtp = {f"model.layers.{n}." + k.removeprefix(last): torch.randn_like(v) * 3
           for k, v in tensors.items() if k.startswith(last)}
    hidden = model.config.hidden_size
    mtp.update({f"model.layers.{n}.eh_proj.weight": torch.randn(hidden, 2 * hidden),
                f"model.layers.{n}.enorm.weight": torch.randn(hidden),
                f"model.layers.{n}.shared_head.head.weight": torch.randn_like(tensors["lm_head.weight"])})
    assert any(".experts.0." in k for k in mtp)  # per-expert keys: what an unbounded layer pattern would index
    save_file({**tensors, **mtp}, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})

    check_weight_files("teacher", str(tmp_path))
    assert sharded_read_problem(str(tmp_path), model.config) is None
    layout = CheckpointLayout(model.config)
    for key in mtp:  # layer n is no decoder layer: no expert, fused, router or attention key of the model
        assert layout.decoder_layer(key) is None and layout.expert_key(key) is None and layout.fused_key(key) is None
        assert layout.expert_indexed(key) is None
    assert dropped_parts(model.config) == {"mtp": "dropped"}

    ids = random_batch()["input_ids"]
    reference = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert_same_model(reference, model)  # stock from_pretrained drops layer n
    assert_same_model(loaded(tmp_path), reference)
    keep = random_keep(model, width=8, groups=model.config.num_key_value_heads, shared_width=8, seed=1)
    got, want = loaded(tmp_path, keep=keep), slim_model_(AutoModelForCausalLM.from_pretrained(tmp_path).eval(), keep)
    assert_same_model(got, want)
    with torch.no_grad():
        assert torch.equal(got(input_ids=ids).logits, want(input_ids=ids).logits)
