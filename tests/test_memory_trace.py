"""The measured side of the memory plan: the per-phase trace (memory_trace.py), what loading leaves resident
(loading.own_mapped_tensors_), scoring's chunked contributions, and bench/memory.py's hub-layout writer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers import tiny_config, tiny_model, tiny_recipe, train
from lightning_slimmoe import memory_trace


@pytest.fixture
def trace_dir(tmp_path, monkeypatch):
    """A fresh trace for this test (the process's trace is made on first use)."""
    monkeypatch.setenv(memory_trace.ENV, str(tmp_path / "trace"))
    monkeypatch.setattr(memory_trace, "_TRACE", None)
    yield tmp_path / "trace"
    if memory_trace._TRACE is not None:
        memory_trace._TRACE._stop.set()
    monkeypatch.setattr(memory_trace, "_TRACE", None)


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_nested_phases_resume_the_outer_one_and_record_peak_and_seconds(trace_dir):
    memory_trace.set_stage("s")
    with memory_trace.phase("score"):
        with memory_trace.phase("load"):
            held = torch.ones(64 * 2**20 // 4)  # 64 MiB, held into the score phase's second segment
            held += 1
        del held
    memory_trace.set_stage(None)
    got = lines(trace_dir / "rank0.jsonl")
    assert [(r["stage"], r["phase"]) for r in got] == [(None, "baseline"), ("s", "score"), ("s", "load"),
                                                       ("s", "score")]
    load = got[2]
    assert load["peak_rss_gib"] - load["start_rss_gib"] >= 60 / 1024  # the 64 MiB, seen by the sampler or at exit
    assert all(r["seconds"] >= 0 and r["peak_rss_gib"] >= r["start_rss_gib"] for r in got)


def test_no_trace_without_the_variable(tmp_path, monkeypatch):
    monkeypatch.delenv(memory_trace.ENV, raising=False)
    monkeypatch.setattr(memory_trace, "_TRACE", None)
    with memory_trace.phase("load"):
        pass
    assert memory_trace.trace() is None and memory_trace.enter("train") is None


@pytest.mark.slow
def test_a_run_traces_every_phase_of_its_stages(tmp_path, phimoe_teacher, corpus_file, trace_dir):
    train(tiny_recipe(tmp_path, phimoe_teacher, corpus_file), tmp_path / "out")
    got = lines(trace_dir / "rank0.jsonl")
    assert got[0]["phase"] == "baseline"
    for stage in ("slim1", "slim2"):
        phases = {r["phase"] for r in got if r["stage"] == stage}
        assert {"load", "score", "train", "validate", "export"} <= phases, (stage, phases)
    assert {r["phase"] for r in got if r["stage"] == "teacher"} == {"validate"}


def _mapped_ranges() -> list[tuple[int, int]]:
    with open("/proc/self/maps") as f:
        return [tuple(int(x, 16) for x in line.split()[0].split("-")) for line in f
                if line.rstrip().endswith(".safetensors")]


@pytest.mark.parametrize("tied", [False, True])
def test_loaded_models_hold_no_view_of_the_checkpoint_file(tmp_path, tied):
    from lightning_slimmoe.sources import load_model

    model = tiny_model("qwen3_moe", tie_word_embeddings=tied).to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert any(lo <= p.untyped_storage().data_ptr() < hi for p in reference.parameters()
               for lo, hi in _mapped_ranges())  # what from_pretrained leaves: zero-copy views of the mmap
    loaded = load_model(str(tmp_path), torch.bfloat16)
    ranges = _mapped_ranges()
    assert not [n for n, t in [*loaded.named_parameters(), *loaded.named_buffers()]
                if any(lo <= t.untyped_storage().data_ptr() < hi for lo, hi in ranges)]
    assert (loaded.get_input_embeddings().weight is loaded.get_output_embeddings().weight) == tied
    expected = reference.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in loaded.state_dict().items())


def test_chunked_contributions_sum_as_the_whole_tensor(monkeypatch):
    from lightning_slimmoe import importance

    model = tiny_model("qwen3_moe")
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    whole = importance.structure_scores(model, importance.taylor_contribution)
    monkeypatch.setattr(importance, "CONTRIBUTION_CHUNK_ELEMENTS", 7)  # a row or two at a time
    chunked = importance.structure_scores(model, importance.taylor_contribution)
    for a, b in zip(whole, chunked):
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("model_type,sizes", [
    ("qwen3_moe", {}),
    ("deepseek_v2", {"first_k_dense_replace": 1, "num_hidden_layers": 2}),
    ("gpt_oss", {"hidden_size": 64, "intermediate_size": 64, "head_dim": 16}),
])
def test_bench_writes_a_checkpoint_in_the_hub_layout(tmp_path, corpus_file, model_type, sizes):
    """bench/memory.py's streamed writer: stock from_pretrained (and, for MXFP4, the pipeline's loader) reads it
    with every tensor found and none left over; per-expert keys where the hub has them."""
    from bench.memory import write_checkpoint
    from lightning_slimmoe.sources import load_model

    config = tiny_config(model_type, **sizes).to_dict()
    written = write_checkpoint(tmp_path, config, corpus_file, vocab=300)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    assert written["bytes"] == sum(p.stat().st_size for p in tmp_path.glob("*.safetensors"))
    if model_type == "gpt_oss":
        assert any(k.endswith("experts.gate_up_proj_blocks") for k in index)
        model = load_model(str(tmp_path), torch.float32)
    else:
        assert any(".experts.0.gate_proj.weight" in k for k in index)
        model, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], info
    ids = torch.randint(0, model.config.vocab_size, (1, 8))
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()
