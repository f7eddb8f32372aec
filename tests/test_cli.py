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
    assert options[:10] == ["--json", "--memory", "--gpus", "--gpu-memory-gib", "--mfu", "--peak-tflops", "--serve",
                            "--serve-tp", "--serve-dtype", "--strict"], options[:11]
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


@pytest.mark.parametrize("orig_argv, argv, args, expected", [
    # python train.py ...: the interpreter as typed, the script, the arguments, then --resume true
    (["python3", "-u", "train.py", "--config", "my run.yaml"], ["train.py", "--config", "my run.yaml"],
     ["--config", "my run.yaml"], "python3 -u train.py --config 'my run.yaml' --resume true"),
    # python train.py alone (the demo)
    (["python", "train.py"], ["train.py"], [], "python train.py --resume true"),
    # an earlier --resume, in either form, is replaced, not repeated
    (["python", "train.py", "--resume", "false", "--config", "X.yaml"], ["train.py", "--resume", "false", "--config",
     "X.yaml"], ["--resume", "false", "--config", "X.yaml"], "python train.py --config X.yaml --resume true"),
    (["python", "train.py", "--resume=true"], ["train.py", "--resume=true"], ["--resume=true"],
     "python train.py --resume true"),
    # python -m lightning_slimmoe train ...: the subcommand stays
    (["python", "-m", "lightning_slimmoe", "train", "--config", "X.yaml"],
     ["/site/lightning_slimmoe/__main__.py", "train", "--config", "X.yaml"], ["--config", "X.yaml"],
     "python -m lightning_slimmoe train --config X.yaml --resume true"),
    # main(args) called from Python with other arguments than the process's: the documented command
    (["python", "-m", "pytest", "-q"], ["pytest", "-q"], ["--config", "X.yaml"],
     "python train.py --config X.yaml --resume true"),
    (["python", "-m", "pytest", "-q"], ["pytest", "-q"], [], "python train.py --resume true"),
])
def test_resume_command_is_the_users_own_command_with_resume(monkeypatch, orig_argv, argv, args, expected):
    from lightning_slimmoe import cli

    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    monkeypatch.setattr(sys, "orig_argv", orig_argv)
    monkeypatch.setattr(sys, "argv", argv)
    assert cli.resume_command(args) == expected


def test_resume_command_under_torchrun_is_the_torchrun_command(monkeypatch):
    """A rank started by torchrun resumes by starting torchrun again: its parent's command line."""
    from lightning_slimmoe import cli

    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    monkeypatch.setattr(sys, "orig_argv", ["/venv/bin/python", "-u", "train.py", "--config", "X.yaml"])
    monkeypatch.setattr(sys, "argv", ["train.py", "--config", "X.yaml"])
    monkeypatch.setattr(cli, "_parent_command", lambda: [
        "/venv/bin/python", "/venv/bin/torchrun", "--nproc-per-node", "8", "train.py", "--config", "X.yaml"])
    assert cli.resume_command(["--config", "X.yaml"]) == \
        "/venv/bin/python /venv/bin/torchrun --nproc-per-node 8 train.py --config X.yaml --resume true"


def test_parent_command_reads_the_parent_process_command_line():
    """What _parent_command reads in a child of this process is this process's own command line."""
    if not Path(f"/proc/{os.getpid()}/cmdline").exists():
        pytest.skip("no /proc")
    code = "import json; from lightning_slimmoe.cli import _parent_command; print(json.dumps(_parent_command()))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.splitlines()[-1]) == sys.orig_argv


@pytest.mark.parametrize("form, expected", [
    ("ModelParallelStrategy", "AtomicModelParallelStrategy"),
    ("lightning.pytorch.strategies.ModelParallelStrategy", "AtomicModelParallelStrategy"),
    ('{"class_path": "lightning.pytorch.strategies.ModelParallelStrategy"}', "AtomicModelParallelStrategy"),
    ("AtomicModelParallelStrategy", "AtomicModelParallelStrategy"),
    ("FSDPStrategy", "SlimFSDPStrategy"),
    ("lightning.pytorch.strategies.FSDPStrategy", "SlimFSDPStrategy"),
    ("fsdp", "SlimFSDPStrategy"),
    ("DDPStrategy", "DDPStrategy"),
    ("ddp", "DDPStrategy"),
])
def test_strategy_given_by_class_name_or_path_builds_that_strategy(form, expected):
    """--trainer.strategy as a class name or dotted path (not only a YAML class_path) gives every Trainer of the run
    that class (the stock FSDP ones swapped for ours, as from a YAML)."""
    from lightning_slimmoe.cli import SlimMoECLI, with_default_config

    cli = SlimMoECLI(args=with_default_config(["--trainer.strategy", form, "--trainer.devices", "2"]))
    assert type(cli.make_trainer().strategy).__name__ == expected


@pytest.mark.parametrize("form", ["ModelParalelStrategy", "lightning.pytorch.strategies.Strategy", "os.path",
                                  "no_such_module.ModelParallelStrategy"])
def test_bad_strategy_name_is_one_error_line(form, capsys):
    from lightning_slimmoe.cli import main, run_command

    with pytest.raises(SystemExit) as stopped:
        run_command(main, ["--trainer.strategy", form])
    assert stopped.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: trainer.strategy={form!r} is neither"), err
    assert "ModelParallelStrategy, " in err[0] and "lightning.pytorch.strategies.ModelParallelStrategy" in err[0]
