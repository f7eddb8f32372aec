"""Fixtures shared by all tests, and the ``gpu`` marker's skip rule. Plain helpers live in helpers.py."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers import FAMILIES, make_teacher_dir


def pytest_collection_modifyitems(config, items):
    """``@pytest.mark.gpu`` tests are skipped (not failed) on a machine without a CUDA device; ``@pytest.mark.serving``
    tests without the engines' environments (helpers.serving_envs)."""
    from helpers import SERVING_SKIP, serving_envs

    envs = serving_envs()
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))
        if "serving" in item.keywords:
            missing = [e for e in ("vllm", "llamacpp", "tokenizer") if e in item.keywords and e not in envs]
            if missing:
                item.add_marker(pytest.mark.skip(reason=SERVING_SKIP.format(missing=", ".join(missing))))


@pytest.fixture(params=FAMILIES)
def family_name(request):
    return request.param


# ---------------------------------------------------------------------------------------------------
# Pipeline fixtures: a small real corpus, a tiny teacher dir with its tokenizer.
# ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory) -> str:
    """~120k characters of the standard library's own sources (present on every machine)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    text = "\n\n".join((stdlib / name).read_text(errors="replace") for name in
                       ("argparse.py", "textwrap.py", "functools.py", "json/decoder.py"))[:120_000]
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(text)
    return str(path)


@pytest.fixture(scope="session")
def phimoe_teacher(tmp_path_factory, corpus_file) -> str:
    return make_teacher_dir(tmp_path_factory.mktemp("teacher") / "phimoe", "phimoe", corpus_file)


@pytest.fixture
def no_weights(monkeypatch):
    """Any attempt to load (or build) model weights fails the test; the list records the attempts. A model built on
    the meta device (shapes only, as the memory plan builds one) holds no weights and is allowed."""
    import lightning_slimmoe.pipeline as pipeline

    calls = []
    build = AutoModelForCausalLM.from_config

    def refuse(*args, **kwargs):
        calls.append(args[:1])
        raise AssertionError(f"model weights were loaded: {args[:1]}")

    def build_on_meta_only(*args, **kwargs):
        return build(*args, **kwargs) if torch.get_default_device().type == "meta" else refuse(*args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(AutoModelForCausalLM, "from_config", build_on_meta_only)
    monkeypatch.setattr(pipeline, "load_model", refuse)
    return calls
