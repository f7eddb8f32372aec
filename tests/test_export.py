"""The export under every precision the recipes train in: a student that Lightning's ``*-true`` precision converted
with ``.to(dtype)`` still reloads with stock ``from_pretrained`` to bit-identical logits, and a mismatch names the
tensors that differ. (The shipped recipes themselves run end to end at their precision in tests/test_recipes.py.)"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers import FAMILIES, ROOT, random_batch, read_summary, tiny_model, tiny_recipe
from lightning_slimmoe.export import ExportMismatchError, export_hf
from lightning_slimmoe.module import StageModule


def _dtypes(model) -> dict[str, torch.dtype]:
    return {name: t.dtype for name, t in [*model.named_parameters(), *model.named_buffers()]}


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_true_conversion_keeps_what_from_pretrained_keeps_and_the_export_reloads_identically(family, tmp_path):
    tiny_model(family).save_pretrained(tmp_path / "teacher")
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "teacher", dtype=torch.bfloat16)  # as load_model does
    teacher = AutoModelForCausalLM.from_pretrained(tmp_path / "teacher", dtype=torch.bfloat16)
    loaded = _dtypes(student)
    module = StageModule(student, teacher).to(torch.bfloat16)  # what HalfPrecision.convert_module does
    assert _dtypes(module.student) == loaded  # rotary inv_freq and the fp32-kept router biases stay fp32
    assert _dtypes(module.teacher) == loaded
    assert module.val_lm_loss.mean_value.dtype == torch.float32  # validation means accumulate in fp32
    export_hf(module.student, tmp_path / "hf", probe_ids=random_batch()["input_ids"])  # raises on any difference


def test_a_mismatch_names_the_tensor_and_its_dtypes(tmp_path):
    student = tiny_model("qwen3_moe").to(torch.bfloat16)  # plain .to(): inv_freq rounded to bf16
    with pytest.raises(ExportMismatchError) as err:
        export_hf(student, tmp_path / "hf", probe_ids=random_batch()["input_ids"])
    assert "model.rotary_emb.inv_freq: bfloat16 trained, float32 reloaded" in str(err.value)
    assert not (tmp_path / "hf").exists()  # nothing half-written appears


def _train(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_bf16_true_run_exports_and_a_resume_at_another_precision_names_it(tmp_path, corpus_file):
    from helpers import make_teacher_dir

    teacher = make_teacher_dir(tmp_path / "teacher", "qwen3_moe", corpus_file)
    recipe = tiny_recipe(tmp_path, teacher, corpus_file)
    done = _train("--config", recipe, "--trainer.precision", "bf16-true")
    assert done.returncode == 0, done.stderr[-3000:]
    summary = read_summary(tmp_path / "run")
    # the validation perplexity is accumulated in fp32, not rounded to one bf16 value for every stage
    assert len({s["val_ppl"] for s in summary["stages"]} | {summary["teacher"]["val_ppl"]}) == 3
    final = AutoModelForCausalLM.from_pretrained(summary["final_dir"])
    assert final.config.dtype == torch.bfloat16
    other = _train("--config", recipe, "--resume", "true", "--trainer.precision", "32-true")
    assert other.returncode == 2
    assert 'precision.trainer: "bf16-true" -> "32-true"' in other.stderr
    assert "fingerprint" not in other.stderr
