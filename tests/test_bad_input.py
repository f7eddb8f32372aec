"""Every bad input fails fast, before any model weight is loaded, naming the field, the value
and the rule, and writes nothing (output_dir stays absent)."""

from __future__ import annotations

import json
import shutil
import sysconfig
import time
from pathlib import Path

import pytest
import torch
import yaml
from transformers import LlamaConfig, LlamaForCausalLM

import lightning_slimmoe.pipeline as pipeline
from helpers import tiny_config, tiny_recipe
from lightning_slimmoe.cli import SlimMoECLI, dispatch, main
from lightning_slimmoe.families import UnsupportedModelError
from lightning_slimmoe.importance import ImportanceScores, model_shape
from lightning_slimmoe.planning import plan_shapes

FSDP1 = '{"class_path": "lightning.pytorch.strategies.FSDPStrategy"}'
STAGE = {"name": "s", "expert_width": 16, "calibration_tokens": 128, "max_tokens": 256}
MAX_S = 10.0


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, phimoe_teacher, corpus_file):
    """Odd teachers, students, tokenizers, corpora and scores files, made once."""
    from lightning_slimmoe.data import TextDataModule

    root = tmp_path_factory.mktemp("bad_inputs")
    # a teacher config with 4 KV groups (config only: nothing may need its weights)
    gqa4 = root / "gqa4"
    gqa4.mkdir()
    tiny_config("phimoe", vocab_size=320, intermediate_size=32, num_key_value_heads=4).save_pretrained(gqa4)
    # a student_init with another vocabulary
    vocab500 = root / "vocab500"
    vocab500.mkdir()
    tiny_config("phimoe", vocab_size=500, intermediate_size=32).save_pretrained(vocab500)
    # a different tokenizer with the teacher's vocab size
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    other_text = root / "other.txt"
    other_text.write_text("\n".join((stdlib / n).read_text(errors="replace") for n in ("inspect.py", "typing.py")))
    other_tok = root / "other_tokenizer"
    tok = TextDataModule(files=[str(other_text)]).train_tokenizer(320, str(other_tok))
    assert len(tok) == 320
    # a dense model (tiny llama, weights and all)
    llama = root / "llama"
    LlamaForCausalLM(LlamaConfig(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(llama)
    # a corpus shorter than one sequence
    short = root / "short.txt"
    short.write_text("def f(): pass\n")
    # scores of another model (a Mixtral with other widths)
    other = tiny_config("mixtral", intermediate_size=48)
    scores = ImportanceScores(criterion="magnitude", model_type="mixtral", shape=model_shape(other),
                              experts={i: torch.rand(4, 48) for i in range(2)},
                              groups={i: torch.rand(2) for i in range(2)})
    scores_file = root / "other_scores.pt"
    scores.save(str(scores_file))
    # the teacher with tied input/output embeddings (its config says so; FSDP1 cannot split the tie)
    tied = root / "tied"
    shutil.copytree(phimoe_teacher, tied)
    config = json.loads((tied / "config.json").read_text())
    (tied / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    return {"gqa4": str(gqa4), "vocab500": str(vocab500), "other_tok": str(other_tok), "llama": str(llama),
            "short": str(short), "scores": str(scores_file), "tied": str(tied)}


def stage(**kw) -> list[dict]:
    return [{**STAGE, **kw}]


# id -> (recipe edits (dict of top-level keys, with "stages", "data", "raw" for post-dump edits), extra args,
#        exception type, substrings the message must hold: field, value, rule)
ROWS = {
    "width_above_current": (dict(stages=stage(expert_width=64)), [], pipeline.ConfigError,
                            ["stages.0.expert_width=64", "larger than the current width 32", "only shrink"]),
    "width_zero": (dict(stages=stage(expert_width=0)), [], pipeline.ConfigError,
                   ["stages.0.expert_width=0", "must be > 0"]),
    "width_negative": (dict(stages=stage(expert_width=-8)), [], pipeline.ConfigError,
                       ["expert_width=-8", "must be > 0"]),
    "width_not_multiple_of_round_to": (dict(stages=stage(expert_width=20, round_to=16)), [], pipeline.ConfigError,
                                       ["expert_width=20", "multiple of round_to=16"]),
    "fraction_above_one": (dict(stages=stage(expert_width=1.5)), [], pipeline.ConfigError,
                           ["expert_width=1.5", "fraction must lie in (0, 1]"]),
    "gqa_groups_do_not_divide": (dict(teacher="gqa4", stages=stage(attention_groups=3)), [], pipeline.ConfigError,
                                 ["attention_groups=3", "must divide the current 4 KV groups"]),
    "gqa_groups_above_current": (dict(stages=stage(attention_groups=4)), [], pipeline.ConfigError,
                                 ["attention_groups=4", "exceeds the current 2 KV groups"]),
    "student_vocab_mismatch": (dict(student_init="vocab500"), [], pipeline.ConfigError,
                               ["student_init vocab_size=500", "teacher vocab_size=320", "same vocabulary"]),
    "other_tokenizer_same_vocab_size": (dict(data={"tokenizer": "other_tok"}), [], pipeline.ConfigError,
                                        ["data.tokenizer=", "other_tokenizer", "tokenizers differ", "vocab_hash"]),
    "dense_model_type": (dict(teacher="llama"), [], UnsupportedModelError,
                         ["model_type='llama'", "not supported", "dense"]),
    "corpus_shorter_than_one_sequence": (dict(data={"files": ["short"]}), [], ValueError,
                                         ["short.txt", "seq_len + 1 = 33", "at least 2 blocks"]),
    "unknown_stage_key": (dict(stages=stage(expert_widht=8)), [], SystemExit, ["expert_widht"]),
    "unknown_top_level_key": (dict(outptu_dir="x"), [], SystemExit, ["outptu_dir"]),
    "bad_value_in_stage": (dict(stages=stage(max_tokens=0)), [], ValueError,
                           ["stages[s].max_tokens=0", "must be > 0"]),
    "resume_without_a_run": ({}, ["--resume", "true"], pipeline.ConfigError,
                             ["--resume", "no run to resume", "output_dir="]),
    "missing_teacher_path": (dict(teacher="/nonexistent/teacher"), [], FileNotFoundError,
                             ["teacher='/nonexistent/teacher'", "no such local path"]),
    "scores_file_of_another_model": (dict(stages=stage(scores_file="scores", criterion="magnitude")), [],
                                     pipeline.ConfigError,
                                     ["stages.0.scores_file=", "other_scores.pt", "another model",
                                      "expert_width"]),
    "fsdp1_sharded_checkpoints": ({}, ["--trainer.strategy", json.dumps({
        "class_path": "lightning.pytorch.strategies.FSDPStrategy", "init_args": {"state_dict_type": "sharded"}})],
        ValueError, ["FSDPStrategy(state_dict_type='sharded')", "not supported", "ModelParallelStrategy"]),
    "fsdp1_tied_embeddings": (dict(teacher="tied"), ["--trainer.strategy", FSDP1], pipeline.ConfigError,
                              ["trainer.strategy=FSDPStrategy", "ties its input and output embeddings",
                               "ModelParallelStrategy"]),
    "teacher_8bit_with_fsdp1": (dict(teacher_8bit=True), ["--trainer.strategy", FSDP1], pipeline.ConfigError,
                                ["teacher_8bit: true", "sharded trainer.strategy", "FSDPStrategy"]),
    # a copied recipe's teacher_config (Phi-3.5-MoE) beside the user's own teacher dir: refused naming both
    "teacher_config_of_another_model": (dict(teacher_config="conf/models/phi-3.5-moe.json"), [], pipeline.ConfigError,
                                        ["teacher_config='conf/models/phi-3.5-moe.json'", "does not describe teacher=",
                                         "phimoe' (teacher_config vs teacher)", "hidden_size: 4096 vs 32",
                                         "expert_width: 6400 vs 32", "`--teacher_config null`"]),
    "seq_len_above_max_position_embeddings": (dict(data={"seq_len": 129}), [], pipeline.ConfigError,
                                              ["data.init_args.seq_len=129", "max_position_embeddings=128",
                                               "phimoe' (phimoe)", "RoPE scaling", "data.init_args.seq_len <= 128"]),
    # a strategy named by its class (short or dotted) is that class for planning too: plan_run sees it sharded
    "teacher_8bit_with_fsdp2_class_name": (dict(teacher_8bit=True), ["--trainer.strategy", "ModelParallelStrategy"],
                                           pipeline.ConfigError, ["teacher_8bit: true", "sharded trainer.strategy"]),
    "teacher_8bit_with_fsdp2_dotted_path": (dict(teacher_8bit=True), ["--trainer.strategy",
                                            "lightning.pytorch.strategies.ModelParallelStrategy"],
                                            pipeline.ConfigError, ["teacher_8bit: true", "sharded trainer.strategy"]),
    "fsdp1_tied_embeddings_class_name": (dict(teacher="tied"), ["--trainer.strategy", "FSDPStrategy"],
                                         pipeline.ConfigError, ["trainer.strategy=FSDPStrategy", "ties its input"]),
    "fsdp1_tied_embeddings_dotted_path": (dict(teacher="tied"), ["--trainer.strategy",
                                          "lightning.pytorch.strategies.FSDPStrategy"],
                                          pipeline.ConfigError, ["trainer.strategy=FSDPStrategy", "ties its input"]),
    "unknown_strategy": ({}, ["--trainer.strategy", "ModelParalelStrategy"], pipeline.ConfigError,
                         ["trainer.strategy='ModelParalelStrategy'", "neither a Lightning strategy name nor a strategy "
                          "class", "ModelParallelStrategy, ", "fsdp, ", "lightning.pytorch.strategies."]),
}


def _resolve(value, inputs):
    if isinstance(value, str):
        return inputs.get(value, value)
    if isinstance(value, list):
        return [_resolve(v, inputs) for v in value]
    if isinstance(value, dict):
        return {k: _resolve(v, inputs) for k, v in value.items()}
    return value


def _tree(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


@pytest.mark.parametrize("row", list(ROWS))
def test_bad_input_fails_fast_before_weights_and_writes_nothing(row, tmp_path, inputs, phimoe_teacher, corpus_file,
                                                                no_weights, capsys):
    edits, args, exc_type, needles = ROWS[row]
    edits = _resolve(dict(edits), inputs)
    stages = edits.pop("stages", stage())
    data = edits.pop("data", {})
    teacher = edits.pop("teacher", phimoe_teacher)
    recipe = Path(tiny_recipe(tmp_path, teacher, corpus_file, stages=stages, **edits))
    if data:
        config = yaml.safe_load(recipe.read_text())
        config["data"]["init_args"].update(data)
        recipe.write_text(yaml.safe_dump(config, sort_keys=False))
    before = _tree(tmp_path)
    started = time.time()
    with pytest.raises(exc_type) as info:
        main(["--config", str(recipe), *args])
    elapsed = time.time() - started
    message = str(info.value) if exc_type is not SystemExit else capsys.readouterr().err
    if exc_type is SystemExit:
        assert info.value.code not in (0, None)
    for needle in needles:
        assert needle in message, f"{row}: {needle!r} not in: {message}"
    assert not no_weights, f"{row}: weights were loaded before the error"
    assert elapsed < MAX_S, f"{row}: took {elapsed:.1f}s"
    assert not (tmp_path / "run").exists(), f"{row}: output_dir was created: {_tree(tmp_path / 'run')}"
    assert _tree(tmp_path) == before


def test_bad_input_leaves_an_existing_run_unchanged(tmp_path, phimoe_teacher, corpus_file, no_weights):
    """A finished-looking run dir and a resume with another stage list: refused, nothing touched."""
    recipe = Path(tiny_recipe(tmp_path, phimoe_teacher, corpus_file, stages=stage()))
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"stages": [], "teacher": phimoe_teacher, "student_init": None}))
    snapshot = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with pytest.raises(pipeline.ConfigError, match="already holds a run"):
        main(["--config", str(recipe)])
    with pytest.raises(pipeline.ConfigError, match=r"configuration differs"):
        main(["--config", str(recipe), "--resume", "true"])
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == snapshot
    assert not no_weights


def _pretrain_recipe(tmp_path, corpus: str) -> Path:
    model_config = tmp_path / "model.json"
    config = tiny_config("phimoe", intermediate_size=32)
    model_config.write_text(config.to_json_string())
    stages = [{"name": "pre", "pretrain": {"model_config": str(model_config), "tokenizer_vocab_size": 300},
               "max_tokens": 2 * 4 * 32},
              {"name": "slim", "expert_width": 16, "calibration_tokens": 128, "max_tokens": 2 * 4 * 32}]
    return Path(tiny_recipe(tmp_path, None, corpus, stages=stages))


def test_pretrain_run_with_too_short_corpus_writes_no_tokenizer(tmp_path, inputs, no_weights):
    """A pretrain run trains its tokenizer in memory; a corpus too short to pack fails before it is saved."""
    recipe = _pretrain_recipe(tmp_path, inputs["short"])
    with pytest.raises(ValueError, match="seq_len"):
        main(["--config", str(recipe)])
    assert not (tmp_path / "run").exists() and not no_weights


def test_pretrain_run_saves_its_tokenizer_and_resumes_with_it(tmp_path, corpus_file):
    from transformers import AutoTokenizer

    recipe = _pretrain_recipe(tmp_path, corpus_file)
    main(["--config", str(recipe)])
    tok_dir = tmp_path / "run" / "tokenizer"
    saved = AutoTokenizer.from_pretrained(tok_dir)
    final = AutoTokenizer.from_pretrained(tmp_path / "run" / "final")
    assert saved.get_vocab() == final.get_vocab() and len(saved) == 300
    main(["--config", str(recipe), "--resume", "true"])  # everything complete: skipped, same tokenizer
    assert AutoTokenizer.from_pretrained(tok_dir).get_vocab() == saved.get_vocab()


def plan(args: list[str]) -> dict:
    return dispatch(["plan", *args])  # `python -m lightning_slimmoe plan ...`, in this process


def _one_stage_recipe(tmp_path, teacher: str, corpus: str, **top) -> Path:
    return Path(tiny_recipe(tmp_path, teacher, corpus, stages=stage(max_tokens=2 * 4 * 32), **top))


def test_teacher_config_of_another_model_is_refused_by_plan(tmp_path, phimoe_teacher, corpus_file):
    """`plan` used to print the copied recipe's 30B-class shapes for the user's own teacher dir."""
    recipe = _one_stage_recipe(tmp_path, phimoe_teacher, corpus_file, teacher_config="conf/models/phi-3.5-moe.json")
    before = _tree(tmp_path)
    with pytest.raises(pipeline.ConfigError) as info:
        plan(["--config", str(recipe)])
    message = str(info.value)
    assert "teacher_config='conf/models/phi-3.5-moe.json'" in message and f"teacher={phimoe_teacher!r}" in message
    assert "num_hidden_layers: 32 vs 2" in message and "--teacher_config null" in message
    assert _tree(tmp_path) == before


def test_teacher_config_that_agrees_plans_the_teachers_own_config(tmp_path, phimoe_teacher, corpus_file,
                                                                  monkeypatch, capsys):
    """Same names and shapes: accepted, and the teacher's own config is the one planned from (here it differs from
    teacher_config only in max_position_embeddings); `train` goes on to load the teacher."""
    own = json.loads((Path(phimoe_teacher) / "config.json").read_text())
    json_config = tmp_path / "teacher.json"
    json_config.write_text(json.dumps({**own, "max_position_embeddings": 16}))
    recipe = _one_stage_recipe(tmp_path, phimoe_teacher, corpus_file, teacher_config=str(json_config))
    result = plan(["--config", str(recipe), "--json"])
    assert result["teacher"]["expert_width"] == 32 and result["stages"][0]["expert_width"] == 16
    cli = SlimMoECLI(args=["--config", str(recipe)])
    # seq_len 32 > the JSON's 16: planned from the teacher's own config (128), so no refusal either
    assert plan_shapes(cli.run_config, seq_len=32).teacher_config.max_position_embeddings == 128

    def loading(ctx):
        raise RuntimeError("the teacher is being loaded")

    monkeypatch.setattr(pipeline, "load_teacher", loading)
    with pytest.raises(RuntimeError, match="the teacher is being loaded"):
        main(["--config", str(recipe)])


def test_a_run_that_fails_before_its_first_stage_can_be_run_again(tmp_path, phimoe_teacher, corpus_file,
                                                                   monkeypatch):
    """A new run that fails after run.json was written but before any stage wrote a file (here: the teacher fails to
    load) removes what it created, and only that: the same command then runs."""
    recipe = _one_stage_recipe(tmp_path, phimoe_teacher, corpus_file)
    real_load_teacher = pipeline.load_teacher
    written = []

    def failing(ctx):
        written.append(sorted(p.name for p in ctx.run_dir.path.iterdir()))
        raise RuntimeError("teacher load failed")

    monkeypatch.setattr(pipeline, "load_teacher", failing)
    with pytest.raises(RuntimeError, match="teacher load failed"):
        main(["--config", str(recipe)])
    assert "run.json" in written[0] and not (tmp_path / "run").exists()
    # an output_dir that existed before keeps what was in it; only the run's own files go
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    with pytest.raises(RuntimeError, match="teacher load failed"):
        main(["--config", str(recipe)])
    assert _tree(tmp_path / "run") == ["notes.txt"]
    monkeypatch.setattr(pipeline, "load_teacher", real_load_teacher)
    main(["--config", str(recipe)])  # the same command, not refused as "already holds a run"
    assert (tmp_path / "run" / "summary.json").is_file() and (tmp_path / "run" / "notes.txt").read_text() == "mine"


def test_a_run_that_failed_after_its_first_stage_wrote_is_kept(tmp_path, phimoe_teacher, corpus_file, monkeypatch):
    """Once a stage has written a file (its keep indices here) the run is work to keep: a failure removes nothing,
    and a new run in that output_dir is refused as before."""
    from callbacks.student_config import StudentConfigWriter

    recipe = _one_stage_recipe(tmp_path, phimoe_teacher, corpus_file)

    def failing(self, trainer, pl_module):
        raise RuntimeError("failed at the start of the fit")

    monkeypatch.setattr(StudentConfigWriter, "on_fit_start", failing)
    with pytest.raises(RuntimeError, match="failed at the start of the fit"):
        main(["--config", str(recipe)])
    run = tmp_path / "run"
    assert (run / "run.json").is_file() and (run / "stage_0_s" / "keep.pt").is_file()
    with pytest.raises(pipeline.ConfigError, match=r"already holds a run; pass `--resume true`"):
        main(["--config", str(recipe)])


def test_a_killed_unstarted_run_is_named_and_resume_keeps_it(tmp_path, phimoe_teacher, corpus_file, monkeypatch):
    """A run killed before its first stage (no handler ran: simulated by skipping the clean-up) is refused by a new
    run with what it is and the way out; a failing --resume of it removes nothing."""
    recipe = _one_stage_recipe(tmp_path, phimoe_teacher, corpus_file)

    def failing(ctx):
        raise RuntimeError("teacher load failed")

    monkeypatch.setattr(pipeline, "load_teacher", failing)
    monkeypatch.setattr(pipeline.RunDir, "discard_unstarted", lambda self: False)
    with pytest.raises(RuntimeError):
        main(["--config", str(recipe)])
    monkeypatch.undo()
    monkeypatch.setattr(pipeline, "load_teacher", failing)
    with pytest.raises(pipeline.ConfigError, match="has not started a stage.*--resume true"):
        main(["--config", str(recipe)])
    snapshot = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    with pytest.raises(RuntimeError, match="teacher load failed"):
        main(["--config", str(recipe), "--resume", "true"])
    assert {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()} == snapshot


def test_seq_len_above_max_position_embeddings_is_refused(tmp_path, corpus_file, no_weights):
    """Also for a pretrain run (its teacher is the model_config it trains), by `plan` and `train`, before anything is
    written; a config that already scales RoPE is named as such."""
    from lightning_slimmoe.planning import check_seq_len

    recipe = _pretrain_recipe(tmp_path, corpus_file)
    for command in (plan, main):
        with pytest.raises(pipeline.ConfigError) as info:
            command(["--config", str(recipe), "--data.init_args.seq_len", "256"])
        message = str(info.value)
        assert "data.init_args.seq_len=256" in message and "max_position_embeddings=128" in message
        assert "stages[0].pretrain.model_config=" in message and "model.json" in message
    assert not (tmp_path / "run").exists() and not no_weights
    cli = SlimMoECLI(args=["--config", str(recipe)])
    plan_shapes(cli.run_config, seq_len=128)  # the limit itself is fine
    with pytest.raises(pipeline.ConfigError, match=r"already scales RoPE \(yarn\)"):
        check_seq_len(256, "teacher='x'", tiny_config("gpt_oss"))


# ---------------------------------------------------------------------------------------------------
# What the user sees: one `error:` line naming the key to change, exit status 2, no traceback
# ---------------------------------------------------------------------------------------------------
# id -> (recipe edits as in ROWS, extra args, the key the line must name)
USER_ERRORS = {
    "missing_teacher": (dict(teacher="/nonexistent/teacher"), [], "teacher='/nonexistent/teacher'"),
    "dense_teacher": (dict(teacher="llama"), [], "teacher="),
    "missing_corpus": (dict(data={"files": ["/nonexistent/corpus.txt"]}), [], "data.init_args.files"),
    "text_field_missing": (dict(data={"files": ["records"]}), [], "data.init_args.text_field"),
    # 0.75 of the teacher's 32, rounded to 64, is wider than the model
    "width_resolves_wider": (dict(stages=stage(expert_width=0.75, round_to=64)), [], "stages.0.expert_width=0.75"),
    "width_not_aligned": ({}, ["--stages.0.expert_width", "20"], "stages.0.expert_width=20"),
}


def _recipe_for(tmp_path, row, inputs, phimoe_teacher, corpus_file) -> Path:
    edits = _resolve(dict(row), {**inputs, "records": str(tmp_path / "records.jsonl")})
    (tmp_path / "records.jsonl").write_text("\n".join(json.dumps({"content": f"line {i}"}) for i in range(50)))
    recipe = Path(tiny_recipe(tmp_path, edits.pop("teacher", phimoe_teacher), corpus_file,
                              stages=edits.pop("stages", stage()), **{k: v for k, v in edits.items() if k != "data"}))
    if "data" in edits:
        config = yaml.safe_load(recipe.read_text())
        config["data"]["init_args"].update(edits["data"])
        recipe.write_text(yaml.safe_dump(config, sort_keys=False))
    return recipe


@pytest.mark.parametrize("case", list(USER_ERRORS))
def test_user_error_is_one_line_naming_the_key(case, tmp_path, inputs, phimoe_teacher, corpus_file, capsys):
    """train.py's path (`run_command(main, argv)`): exit status 2 and exactly one `error:` line on stderr, naming
    the key to change; no traceback."""
    from lightning_slimmoe.cli import run_command

    edits, args, key = USER_ERRORS[case]
    recipe = _recipe_for(tmp_path, edits, inputs, phimoe_teacher, corpus_file)
    with pytest.raises(SystemExit) as exit_:
        run_command(main, ["--config", str(recipe), *args])
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    assert key in lines[0], lines[0]
    assert "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_debug_shows_the_traceback(tmp_path, inputs, phimoe_teacher, corpus_file, monkeypatch):
    """`--debug` (taken out before the parser sees it) and SLIMMOE_DEBUG=1 re-raise the error with its traceback."""
    import subprocess
    import sys

    from helpers import ROOT
    from lightning_slimmoe.cli import run_command
    from lightning_slimmoe.errors import UserError

    recipe = _recipe_for(tmp_path, USER_ERRORS["missing_corpus"][0], inputs, phimoe_teacher, corpus_file)
    out = subprocess.run([sys.executable, str(ROOT / "train.py"), "--config", str(recipe), "--debug"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 1, out.stderr
    assert "Traceback (most recent call last)" in out.stderr
    assert "InputNotFoundError: data.init_args.files" in out.stderr
    monkeypatch.setenv("SLIMMOE_DEBUG", "1")
    with pytest.raises(UserError, match="data.init_args.files"):
        run_command(main, ["--config", str(recipe)])


def test_user_error_is_said_by_rank_zero_only(tmp_path, inputs, phimoe_teacher, corpus_file, capsys, monkeypatch):
    """Every rank checks the same inputs and raises the same error: only rank 0 prints it; every rank exits 2."""
    from lightning.pytorch.utilities import rank_zero_only

    from lightning_slimmoe.cli import run_command

    recipe = _recipe_for(tmp_path, USER_ERRORS["missing_corpus"][0], inputs, phimoe_teacher, corpus_file)
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    with pytest.raises(SystemExit) as exit_:
        run_command(main, ["--config", str(recipe)])
    assert exit_.value.code == 2
    assert "error:" not in capsys.readouterr().err
