"""Tiny random configs of every supported family, shared by all tests (LitGPT style)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

FAMILIES = ["phimoe", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe"]
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
}


def tiny_config(model_type: str, **overrides):
    kwargs = {**_COMMON, **_PER_FAMILY[model_type], **overrides}
    if model_type == "olmoe":
        kwargs.pop("head_dim")  # OLMoE sizes q/k norms from hidden_size: keep heads * head_dim == hidden
    return AutoConfig.for_model(model_type, **kwargs)


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


@pytest.fixture(params=FAMILIES)
def family_name(request):
    return request.param


# ---------------------------------------------------------------------------------------------------
# Pipeline fixtures: a small real corpus, tiny teacher dirs with tokenizers, tiny recipes.
# ---------------------------------------------------------------------------------------------------
import json
import os
import sysconfig
from pathlib import Path

import yaml

PIPELINE_FAMILY_OVERRIDES = {  # widths that stay grouped_mm-aligned after two halvings
    "phimoe": dict(intermediate_size=32), "mixtral": dict(intermediate_size=32),
    "qwen2_moe": dict(moe_intermediate_size=32, shared_expert_intermediate_size=32),
    "qwen3_moe": dict(moe_intermediate_size=32), "olmoe": dict(intermediate_size=32),
}


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory) -> str:
    """~120k characters of the standard library's own sources (present on every machine)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    text = "\n\n".join((stdlib / name).read_text(errors="replace") for name in
                       ("argparse.py", "textwrap.py", "functools.py", "json/decoder.py"))[:120_000]
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(text)
    return str(path)


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


@pytest.fixture(scope="session")
def phimoe_teacher(tmp_path_factory, corpus_file) -> str:
    return make_teacher_dir(tmp_path_factory.mktemp("teacher") / "phimoe", "phimoe", corpus_file)


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


@pytest.fixture
def no_weights(monkeypatch):
    """Any attempt to load (or build) model weights fails the test; the list records the attempts."""
    import lightning_slimmoe.pipeline as pipeline

    calls = []

    def refuse(*args, **kwargs):
        calls.append(args[:1])
        raise AssertionError(f"model weights were loaded: {args[:1]}")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(AutoModelForCausalLM, "from_config", refuse)
    monkeypatch.setattr(pipeline, "load_model", refuse)
    return calls
