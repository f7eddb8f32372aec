"""CLI conventions, `plan`, and every shipped recipe: parsed, validated, and run for a few steps on a tiny
stand-in teacher of the same family (LitGPT's test_config_hub pattern)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoConfig, AutoModelForCausalLM

from helpers import read_summary, tiny_recipe
from lightning_slimmoe.cli import SlimMoECLI, main
from lightning_slimmoe.data import TextDataModule
from lightning_slimmoe.planning import plan_shapes

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(p.name for p in (ROOT / "conf").glob("*.yaml"))


def test_recipe_list_is_complete():
    assert {"demo.yaml", "phi_mini.yaml", "phi_tiny.yaml", "mixtral.yaml", "qwen3_moe.yaml"} <= set(RECIPES)


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_parses_and_plans(recipe):
    cli = SlimMoECLI(args=["--config", str(ROOT / "conf" / recipe)])
    shapes = plan_shapes(cli.run_config)
    assert len(shapes.configs) == len(cli.run_config.stages) >= 2


def run_plan(recipe: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "lightning_slimmoe", "plan", "--config", f"conf/{recipe}", "--json"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120, check=True)
    return json.loads(out.stdout[out.stdout.index("{"):])


def test_plan_reproduces_the_paper_parameter_counts():
    mini, tiny = run_plan("phi_mini.yaml"), run_plan("phi_tiny.yaml")
    assert (mini["teacher"]["total_params"], mini["teacher"]["active_params"]) == (41_873_153_344, 6_640_999_744)
    final = mini["stages"][-1]
    assert (final["total_params"], final["active_params"]) == (7_647_632_704, 2_362_809_664)
    assert (final["expert_width"], final["num_experts"], final["num_attention_heads"], final["num_key_value_heads"]) == (960, 16, 32, 8)
    final = tiny["stages"][-1]
    assert (final["total_params"], final["active_params"]) == (3_755_220_288, 1_288_969_536)
    assert (final["expert_width"], final["num_attention_heads"], final["num_key_value_heads"], final["head_dim"]) == (448, 16, 4, 128)
    assert 2 <= len(mini["stages"]) <= 3 and 2 <= len(tiny["stages"]) <= 3


def test_print_config_and_overrides():
    out = subprocess.run([sys.executable, "train.py", "--config", "conf/demo.yaml", "--stages.1.max_tokens", "1e9",
                          "--print_config"], cwd=ROOT, capture_output=True, text=True, timeout=120, check=True)
    printed = yaml.safe_load(out.stdout)
    assert printed["stages"][1]["max_tokens"] == 1_000_000_000 and printed["stages"][1]["name"] == "slim50"
    assert printed["data"]["class_path"] == "lightning_slimmoe.data.TextDataModule"


@pytest.mark.parametrize("args, key", [
    (["--stages.1.max_tokenz", "5"], "max_tokenz"),
    (["--stages.1.kd.top_kk", "5"], "top_kk"),
    (["--outptu_dir", "x"], "outptu_dir"),
    (["--stages.9.max_tokens", "5"], "there are 3 stages"),
])
def test_typos_fail_naming_the_key(args, key, capsys):
    with pytest.raises(SystemExit):
        SlimMoECLI(args=["--config", str(ROOT / "conf/demo.yaml"), *args])
    assert key in capsys.readouterr().err


def test_typo_inside_yaml_names_the_key(tmp_path, corpus_file, capsys):
    recipe = Path(tiny_recipe(tmp_path, "org/model", corpus_file))
    text = recipe.read_text().replace("calibration_tokens", "calibraton_tokens", 1)
    recipe.write_text(text)
    with pytest.raises(SystemExit):
        SlimMoECLI(args=["--config", str(recipe)])
    assert "calibraton_tokens" in capsys.readouterr().err


def _stand_in_teacher(recipe: dict, tmp_path: Path, corpus: str) -> str:
    """Same family and the recipe's real expert widths/head counts, but hidden 64, one layer, tiny vocab."""
    source = recipe.get("teacher_config") or recipe["stages"][0]["pretrain"]["model_config"]
    config = AutoConfig.from_pretrained(ROOT / source)
    tokenizer = TextDataModule(files=[corpus]).train_tokenizer(300, str(tmp_path / "teacher"))
    config.hidden_size, config.num_hidden_layers, config.head_dim = 64, 1, 8
    config.vocab_size, config.max_position_embeddings = len(tokenizer), 256
    for key in ("router_jitter_noise", "input_jitter_noise"):
        if hasattr(config, key):
            setattr(config, key, 0.0)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    model.save_pretrained(tmp_path / "teacher")
    return str(tmp_path / "teacher")


@pytest.mark.slow
@pytest.mark.parametrize("recipe_name", [r for r in RECIPES if r != "demo.yaml"])
def test_recipe_runs_a_few_steps_on_a_stand_in(recipe_name, tmp_path, corpus_file):
    recipe = yaml.safe_load((ROOT / "conf" / recipe_name).read_text())
    teacher = _stand_in_teacher(recipe, tmp_path, corpus_file)
    args = ["--config", str(ROOT / "conf" / recipe_name), "--teacher", teacher, "--teacher_config", "null",
            "--output_dir", str(tmp_path / "run"), "--trainer.accelerator", "cpu", "--trainer.devices", "1",
            "--trainer.num_nodes", "1", "--trainer.precision", "32-true", "--trainer.strategy", "auto", "--trainer.limit_val_batches", "1",
            "--trainer.enable_progress_bar", "false", "--data.init_args.hub_dataset", "null",
            "--data.init_args.files", json.dumps([corpus_file]), "--data.init_args.seq_len", "16",
            "--data.init_args.batch_size", "2"]
    for i in range(len(recipe["stages"])):
        args += [f"--stages.{i}.max_tokens", "64", f"--stages.{i}.calibration_tokens", "32",
                 f"--stages.{i}.kd.chunk_tokens", "16", f"--stages.{i}.val_every_n_steps", "2"]
    main(args)
    summary = read_summary(tmp_path / "run")
    expected = [s.get("expert_width") for s in recipe["stages"]]
    got = [s["expert_width"] for s in summary["stages"]]
    assert all(g == e for g, e in zip(got, expected) if isinstance(e, int))
    assert got == sorted(got, reverse=True)


@pytest.mark.slow
def test_demo_recipe_runs_a_few_steps(tmp_path, corpus_file):
    args = ["--config", str(ROOT / "conf/demo.yaml"), "--output_dir", str(tmp_path / "run"),
            "--data.init_args.files", json.dumps([corpus_file]), "--data.init_args.seq_len", "32",
            "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false",
            "--stages.0.pretrain.tokenizer_vocab_size", "300"]
    for i in range(3):
        args += [f"--stages.{i}.max_tokens", "1024", f"--stages.{i}.calibration_tokens", "64"]
    main(args)
    summary = read_summary(tmp_path / "run")
    assert [s["expert_width"] for s in summary["stages"]] == [256, 128, 64]
    assert summary["stages"][-1]["num_key_value_heads"] == 2


def test_plan_memory_for_64_a100s():
    out = subprocess.run([sys.executable, "-m", "lightning_slimmoe", "plan", "--config", "conf/phi_tiny.yaml", "--json",
                          "--memory", "--gpus", "64", "--gpu-memory-gib", "80"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120, check=True)
    plan = json.loads(out.stdout[out.stdout.index("{"):])
    first = plan["stages"][0]["memory_gib_per_gpu"]
    assert first["fits"] and 0 < first["total"] < 80
    assert first["optimizer_state"] == pytest.approx(2 * first["student_weights"], rel=0.02)
    totals = [s["memory_gib_per_gpu"]["total"] for s in plan["stages"]]
    assert totals == sorted(totals, reverse=True)  # the biggest student is the first stage's
    few = subprocess.run([sys.executable, "-m", "lightning_slimmoe", "plan", "--config", "conf/phi_tiny.yaml", "--json",
                          "--memory", "--gpus", "2"], cwd=ROOT, capture_output=True, text=True, timeout=120, check=True)
    assert not json.loads(few.stdout[few.stdout.index("{"):])["stages"][0]["memory_gib_per_gpu"]["fits"]
