"""The streaming (tensor-by-tensor) checkpoint slicer: same model as in-memory slicing, bounded memory."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import FAMILIES, random_batch, tiny_model
from lightning_slimmoe.families import get_family
from lightning_slimmoe.slimming import slim_model_
from lightning_slimmoe.streaming import slim_checkpoint
from test_slimming import ATTN_PRUNABLE, random_keep

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("family_name", FAMILIES)
def test_streaming_slice_equals_in_memory_slice(family_name, tmp_path):
    model = tiny_model(family_name)
    model.save_pretrained(tmp_path / "src")
    groups = 1 if family_name in ATTN_PRUNABLE else model.config.num_key_value_heads
    keep = random_keep(model, width=8, groups=groups, shared_width=12, seed=5)
    slim_checkpoint(tmp_path / "src", tmp_path / "dst", keep, max_shard_bytes=4096)  # many shards
    assert len(json.loads((tmp_path / "dst/model.safetensors.index.json").read_text())["weight_map"]) > 0
    assert not (tmp_path / "dst.tmp").exists()
    streamed = AutoModelForCausalLM.from_pretrained(tmp_path / "dst").eval()
    slim_model_(model, keep)
    ids = random_batch()["input_ids"]
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, streamed(input_ids=ids).logits)
    assert get_family(streamed).expert_width(streamed.config) == 8


def test_fused_layout_is_sliced_too(tmp_path):
    from safetensors.torch import save_file
    model = tiny_model("mixtral")
    model.save_pretrained(tmp_path / "src")
    # Rewrite the checkpoint with fused 3-D expert tensors (the in-memory transformers 5 layout).
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    (tmp_path / "src/model.safetensors").unlink()
    save_file(state, str(tmp_path / "src/model.safetensors"), metadata={"format": "pt"})
    keep = random_keep(model, width=8, groups=1, seed=2)
    slim_checkpoint(tmp_path / "src", tmp_path / "dst", keep)
    slim_model_(model, keep)
    streamed = AutoModelForCausalLM.from_pretrained(tmp_path / "dst").eval()
    ids = random_batch()["input_ids"]
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, streamed(input_ids=ids).logits)


_RSS_SCRIPT = r"""
import resource, sys, torch
sys.path.insert(0, "tests")
from lightning_slimmoe.streaming import slim_checkpoint
from lightning_slimmoe.slimming import KeepIndices
from transformers import AutoConfig
config = AutoConfig.from_pretrained(sys.argv[1])
keep = KeepIndices(experts={l: torch.arange(0, config.intermediate_size, 4).repeat(config.num_local_experts, 1)
                            for l in range(config.num_hidden_layers)},
                   groups={l: torch.tensor([0]) for l in range(config.num_hidden_layers)})
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
slim_checkpoint(sys.argv[1], sys.argv[2], keep, max_shard_bytes=32 * 2**20)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024)
"""


def test_streaming_peak_memory_is_far_below_checkpoint_size(tmp_path):
    from transformers import AutoConfig
    config = AutoConfig.for_model("phimoe", vocab_size=256, hidden_size=512, num_hidden_layers=4, num_attention_heads=4,
                                  num_key_value_heads=2, intermediate_size=2048, num_local_experts=16)
    with torch.device("meta"):
        shapes = AutoModelForCausalLM.from_config(config)
    model = AutoModelForCausalLM.from_config(config)  # ~0.8 GB fp32 checkpoint, mostly experts
    model.save_pretrained(tmp_path / "src")
    del model, shapes
    size = sum(p.stat().st_size for p in (tmp_path / "src").glob("*.safetensors"))
    out = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(tmp_path / "src"), str(tmp_path / "dst")], cwd=ROOT,
                         capture_output=True, text=True, timeout=300, check=True)
    peak_growth = int(out.stdout.strip().splitlines()[-1])
    assert size > 600 * 2**20
    assert peak_growth < size / 5, f"peak RSS grew {peak_growth / 2**20:.0f} MiB slicing a {size / 2**20:.0f} MiB checkpoint"
    assert AutoConfig.from_pretrained(tmp_path / "dst").intermediate_size == 512
