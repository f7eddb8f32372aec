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


# ---------------------------------------------------------------------------------------------------
# What serving engines read from an export's config.json (issue 24): both writers agree
# ---------------------------------------------------------------------------------------------------
MLA = ("deepseek_v2", "deepseek_v3", "glm4_moe_lite")


@pytest.mark.parametrize("family", FAMILIES)
def test_export_config_holds_what_serving_engines_read_and_reloads_identically(family, tmp_path):
    import json

    from lightning_slimmoe.export import export_sharded_hf
    from lightning_slimmoe.families import head_dim

    model = tiny_model(family)
    model.config.quantization_config = {"quant_method": "fp8"}  # a teacher's, left on a config: never exported
    ids = random_batch()["input_ids"]
    export_hf(model, tmp_path / "hf", probe_ids=ids)  # raises unless stock from_pretrained gives identical logits
    del model.config.quantization_config
    export_sharded_hf(model, tmp_path / "sharded")  # the tensor-by-tensor writer (one process: no process group)
    written = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert json.loads((tmp_path / "sharded" / "config.json").read_text()) == written
    expected = "PhiMoEForCausalLM" if family == "phimoe" else type(model).__name__  # as the hub and vLLM spell it
    assert written["architectures"] == [expected]
    assert "quantization_config" not in written
    if family in MLA:  # no single per-head width: the q/k and v widths are written
        assert all(k in written for k in ("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"))
    else:
        assert written["head_dim"] == head_dim(model.config)  # OLMoE's config class has none: derived
    for directory in ("hf", "sharded"):
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / directory).eval()
        with torch.no_grad():
            assert torch.equal(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_a_slimmed_phimoe_keeps_the_hub_spelling_and_a_teachers_own_spelling_is_kept(tmp_path):
    import json

    from lightning_slimmoe.slimming import slim_model_

    from helpers import random_keep

    model = tiny_model("phimoe")
    slim_model_(model, random_keep(model, width=16, groups=1))
    export_hf(model, tmp_path / "phimoe", probe_ids=random_batch()["input_ids"])
    config = json.loads((tmp_path / "phimoe" / "config.json").read_text())
    assert config["architectures"] == ["PhiMoEForCausalLM"] and config["head_dim"] == 8
    assert config["num_attention_heads"] == 2 and config["num_key_value_heads"] == 1
    mixtral = tiny_model("mixtral")
    mixtral.config.architectures = ["MIXTRALForCausalLM"]  # a teacher's own spelling of the same class
    export_hf(mixtral, tmp_path / "mixtral")
    assert json.loads((tmp_path / "mixtral" / "config.json").read_text())["architectures"] == ["MIXTRALForCausalLM"]
    mixtral.config.architectures = ["MixtralForSequenceClassification"]  # another class: not ours to write
    export_hf(mixtral, tmp_path / "mixtral2")
    assert json.loads((tmp_path / "mixtral2" / "config.json").read_text())["architectures"] == ["MixtralForCausalLM"]


def test_the_export_carries_the_vocabulary_files_the_tokenizer_was_read_from(tmp_path):
    """A SentencePiece ``tokenizer.model`` that ``save_pretrained`` does not write again is copied beside the saved
    tokenizer: llama.cpp's converter reads PhiMoE's and Llama's vocabularies from it."""
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "<unk>": 1}, "<unk>")))
    (tmp_path / "tokenizer.model").write_bytes(b"sentencepiece model bytes")
    tokenizer.vocab_files_names = {**tokenizer.vocab_files_names, "vocab_file": "tokenizer.model"}
    tokenizer.vocab_file = str(tmp_path / "tokenizer.model")
    export_hf(tiny_model("mixtral"), tmp_path / "hf", tokenizer=tokenizer)
    assert (tmp_path / "hf" / "tokenizer.model").read_bytes() == b"sentencepiece model bytes"
    assert (tmp_path / "hf" / "tokenizer.json").exists()
