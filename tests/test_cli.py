"""The command line as a user meets it: every subcommand's ``--help`` lists its options, ``plan`` works from any
directory with the shipped recipes, and a stock strategy named in a YAML is replaced only with a log line."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_slimmoe.config import RunConfig

ROOT = Path(__file__).resolve().parents[1]


def run_module(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "lightning_slimmoe", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=180)


def test_plan_help_lists_every_option():
    out = run_module("plan", "--help")
    assert out.returncode == 0, out.stderr
    for option in ["--json", "--memory", "--gpus", "--gpu-memory-gib", "--trainer.devices", "--data",
                   "--stages", *(f"--{f.name}" for f in dataclasses.fields(RunConfig))]:
        assert option in out.stdout, option
    assert "everything the run writes" in out.stdout  # RunConfig's attribute docstrings are the help text


def test_plan_help_shows_the_plan_options_first():
    """`plan --help` starts with the plan's own options (it was ~60 lines of usage and the Trainer's flags first);
    the recipe's options follow under their own heading."""
    out = run_module("plan", "--help")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("usage: slimmoe plan --config RECIPE") and len(lines[0]) < 120
    options = [line.split()[0] for line in lines if line.startswith("  -")]
    assert options[:7] == ["--json", "--memory", "--gpus", "--gpu-memory-gib", "--serve-tp", "--serve-dtype",
                           "--strict"], options[:8]
    headings = [line for line in lines if line and not line.startswith(" ") and line.endswith(":")]
    assert headings[0] == "plan options:" and headings[1].startswith("recipe options"), headings[:3]
    assert out.stdout.index("recipe options") < out.stdout.index("--trainer.devices")


@pytest.mark.parametrize("command, options", [
    ("eval", ["--model", "--ppl-file", "--tasks", "--teacher", "--seq-len", "--batch-size", "--max-windows", "--json"]),
    ("export", ["--checkpoint", "--out", "--config", "--tokenizer", "--no-tokenizer", "--max-shard-gib", "--no-verify"]),
])
def test_eval_and_export_help(command, options):
    out = run_module(command, "--help")
    assert out.returncode == 0, out.stderr
    assert all(o in out.stdout for o in options), out.stdout


def test_unknown_subcommand_prints_usage_and_fails():
    out = run_module("trian")
    assert out.returncode == 2 and "train" in out.stdout and "export" in out.stdout


def test_plan_from_another_directory_uses_the_shipped_recipe(tmp_path):
    out = run_module("plan", "--config", "conf/phi_tiny.yaml", "--json", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout[out.stdout.index("{"):])
    assert (plan["stages"][-1]["total_params"], plan["stages"][-1]["active_params"]) == (3_755_220_288, 1_288_969_536)
    assert not any(tmp_path.iterdir())  # plan writes nothing


def test_a_missing_recipe_outside_conf_is_not_substituted(tmp_path):
    out = run_module("plan", "--config", "recipes/phi_tiny.yaml", cwd=tmp_path)
    assert out.returncode != 0 and "recipes/phi_tiny.yaml" in out.stderr


def test_stock_strategies_are_replaced_with_a_log_line(caplog):
    from lightning.pytorch.strategies import ModelParallelStrategy

    from lightning_slimmoe import strategies

    strategies._SAID.clear()
    with caplog.at_level(logging.INFO):
        swapped = strategies.with_atomic_checkpoints(ModelParallelStrategy())
        again = strategies.with_atomic_checkpoints(ModelParallelStrategy())
        fsdp = strategies.with_atomic_checkpoints("fsdp")
    assert type(swapped) is strategies.AtomicModelParallelStrategy and type(again) is type(swapped)
    assert type(fsdp) is strategies.SlimFSDPStrategy
    lines = [r.getMessage() for r in caplog.records if "trainer.strategy" in r.getMessage()]
    assert len(lines) == 2, lines  # one line per swap, not one per stage
    assert "AtomicModelParallelStrategy" in lines[0] and "SlimFSDPStrategy" in lines[1]
    ours = strategies.AtomicModelParallelStrategy()
    assert strategies.with_atomic_checkpoints(ours) is ours  # our own class, named in a YAML: taken as it is
