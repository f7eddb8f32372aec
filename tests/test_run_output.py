"""What a user reads from a run: the console of ``train.py`` (each thing said once, one progress-bar style, a bar
with its total, where to look at the end), the model card in ``final/`` and ``eval``'s default window (the
seq_len the model was trained at, carried by the export)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from helpers import ROOT, tiny_recipe

STAGE = {"name": "slim", "expert_width": 16, "criterion": "activation", "calibration_tokens": 128,
         "max_tokens": 2 * 4 * 32, "kd": {"top_k": 8, "tail_bucket": True}}


@pytest.fixture(scope="module")
def run(tmp_path_factory, phimoe_teacher, corpus_file):
    """One 1-stage train.py run, as a user starts it, with the progress bar and the module summary on (the tiny
    recipes turn them off): ``(run_dir, stdout, stderr)``."""
    root = tmp_path_factory.mktemp("console")
    recipe = Path(tiny_recipe(root, phimoe_teacher, corpus_file, stages=[STAGE]))
    config = yaml.safe_load(recipe.read_text())
    config["trainer"].update(enable_progress_bar=True, enable_model_summary=True)
    recipe.write_text(yaml.safe_dump(config, sort_keys=False))
    out = subprocess.run([sys.executable, "train.py", "--config", str(recipe)], cwd=ROOT, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]
    return root / "run", out.stdout, out.stderr


def test_train_console_says_each_thing_once_and_where_to_look(run):
    run_dir, stdout, stderr = run
    console = stdout + stderr
    lines = console.replace("\r", "\n").splitlines()
    assert console.count("Seed set to") <= 1, console.count("Seed set to")
    assert "Loading weights" not in console  # transformers' bar of every from_pretrained
    assert "Total FLOPs" not in console and "Total Flops" not in console  # always 0: no example_input_array
    assert "Params" in console  # the module summary itself is still shown
    assert "TPU available" not in console and "GPU available: False" not in console
    assert "━" not in console  # no rich bar beside the tqdm ones (teacher validation used Lightning's default)
    bar = [line for line in lines if line.startswith("[slim]:")]
    assert bar and all("/2 " in line for line in bar), bar  # every line of the stage's bar has its total
    tail = [line for line in stdout.splitlines() if line.strip()][-3:]
    assert tail == [f"final model: {run_dir / 'final'}", f"summary:     {run_dir / 'summary.json'}",
                    f"monitor:     tensorboard --logdir {run_dir / 'tb'}"], tail


def test_resumed_stage_bar_counts_from_its_step_to_its_total(capsys):
    """A stage resumed mid-way gets no on_train_epoch_start (the "epoch" had begun): the bar is made with the total
    and the step, where it read ``58/?``."""
    from callbacks.monitoring import StageProgressBar

    progress = StageProgressBar("slim50", 100)
    progress._trainer = trainer = SimpleNamespace(global_step=58)
    progress.on_train_start(trainer, None)  # Lightning makes the bar here; a resumed stage's epoch start never comes
    bar = progress.train_progress_bar
    assert (bar.total, bar.n) == (100, 58)
    progress.on_train_epoch_start(trainer)  # a fresh stage's: the bar stays as it was made
    assert (bar.total, bar.n) == (100, 58)
    bar.close()
    assert "/?" not in capsys.readouterr().out


def test_every_export_carries_its_training_seq_len(run):
    run_dir = run[0]
    for directory in (run_dir / "stage_0_slim" / "hf", run_dir / "final"):
        record = json.loads((directory / "slimmoe.json").read_text())
        assert record["seq_len"] == 32 and record["stage"] == "slim", directory


def test_eval_defaults_to_the_training_seq_len(run, tmp_path, corpus_file, capsys):
    """`eval` scores with the window the model trained at: from the slimmoe.json in a copied final/, from run.json for
    a final/ in its run that has none (exported before the file existed), else min(512, max_position_embeddings) -
    and says which on stderr."""
    from lightning_slimmoe.cli import evaluate

    run_dir = run[0]
    copied = tmp_path / "elsewhere" / "model"
    shutil.copytree(run_dir / "final", copied)
    old_run = tmp_path / "old_run"
    shutil.copytree(run_dir / "final", old_run / "final")
    shutil.copy(run_dir / "run.json", old_run / "run.json")
    (old_run / "final" / "slimmoe.json").unlink()
    bare = tmp_path / "bare"
    shutil.copytree(copied, bare)
    (bare / "slimmoe.json").unlink()
    for model, seq_len, why in ((copied, 32, "slimmoe.json"), (old_run / "final", 32, "run.json"),
                                (bare, 128, "max_position_embeddings=128")):
        result = evaluate(["--model", str(model), "--ppl-file", corpus_file, "--max-windows", "2", "--json"])
        err = capsys.readouterr().err
        assert result["perplexity"]["seq_len"] == seq_len, model
        assert f"seq_len {seq_len}: " in err and why in err, err
    assert evaluate(["--model", str(copied), "--ppl-file", corpus_file, "--max-windows", "2", "--seq-len", "16",
                     "--json"])["perplexity"]["seq_len"] == 16


def test_model_card_carries_the_run_numbers():
    """The card of final/ rounds agreement and holds the recipe's facts itself (final/ is often copied away from
    summary.json): seq_len, tokens, each stage's criterion and KD settings."""
    from lightning_slimmoe.config import PretrainConfig, StageConfig
    from lightning_slimmoe.distill import KDConfig
    from lightning_slimmoe.export import model_card

    widths = dict(num_attention_heads=8, num_key_value_heads=4, total_params=4_402_944, active_params=2_043_648)
    summary = {"teacher": {"source": "teacher-dir", "expert_width": 256, "val_ppl": 29.6, **widths},
               "stages": [{"name": "pretrain", "expert_width": 256, "tokens": 1_601_536, "val_ppl": 29.638,
                           "teacher_top1_agreement": None, "model_type": "phimoe", **widths},
                          {"name": "slim50", "expert_width": 128, "tokens": 321_536, "val_ppl": 31.224,
                           "teacher_top1_agreement": 0.8802490234375, "model_type": "phimoe", **widths}]}
    stages = [StageConfig(name="pretrain", pretrain=PretrainConfig(model_config="demo.json")),
              StageConfig(name="slim50", expert_width=0.5, criterion="activation", calibration_tokens=32_768,
                          kd=KDConfig(top_k=8, temperature=2.0, lm_weight=0.25, tail_bucket=True))]
    card = model_card(summary, stages, seq_len=128)
    assert "0.880 |" in card and "0.8802490234375" not in card
    assert "beside this directory" not in card
    assert "Sequences of 128 tokens" in card and "1,601,536" in card and "321,536" in card
    slim_row = next(line for line in card.splitlines() if line.startswith("| slim50 | activation"))
    assert slim_row.split(" | ")[1:] == ["activation on 32,768 tokens", "KD from the teacher + 0.25 LM", "8", "2",
                                         "yes", "0.0003 |"], slim_row
    assert "| pretrain | - | from scratch, LM loss |" in card


def test_eval_and_export_print_no_per_load_progress_bars(run, corpus_file):
    """`slimmoe eval` and `export` load whole models as `train` does: no transformers 'Loading weights' bars."""
    run_dir = run[0]
    done = subprocess.run([sys.executable, "-m", "lightning_slimmoe", "eval", "--model", str(run_dir / "final"),
                           "--ppl-file", corpus_file, "--max-windows", "2"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "perplexity" in done.stdout and "Loading weights" not in done.stdout + done.stderr
