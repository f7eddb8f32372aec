"""The benchmark code paths (bench/quality.py, bench/speed.py, lightning_slimmoe.evaluate) on tiny presets.

Peers (TRL, lm-evaluation-harness) are optional extras: those tests are skipped when not installed.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from helpers import make_teacher_dir

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import quality, speed  # noqa: E402
from lightning_slimmoe.evaluate import HeldOutEval, perplexity, teacher_agreement, tokenize_windows  # noqa: E402


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory, corpus_file) -> str:
    return make_teacher_dir(tmp_path_factory.mktemp("qwen") / "m", "qwen3_moe", corpus_file)


@pytest.fixture(scope="module")
def short_text_file(tmp_path_factory, corpus_file) -> str:
    path = tmp_path_factory.mktemp("text") / "short.txt"
    path.write_text(Path(corpus_file).read_text()[:3000])
    return str(path)


def _load(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(path)


# ---------------------------------------------------------------------------------------------------
def test_perplexity_is_mean_nll_over_non_overlapping_windows(qwen_dir, short_text_file):
    model, tok = _load(qwen_dir)
    text = Path(short_text_file).read_text()
    seq_len = 24
    result = perplexity(model, tok, text, seq_len=seq_len, batch_size=3)
    ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"])
    num = ids.numel() // seq_len
    assert result.windows == num and result.tokens == num * (seq_len - 1)
    nll = 0.0
    with torch.no_grad():
        for w in ids[: num * seq_len].view(num, seq_len):  # one window at a time, independently
            logits = model(input_ids=w[None]).logits[0, :-1]
            nll += F.cross_entropy(logits, w[1:], reduction="sum").item()
    assert result.nll == pytest.approx(nll, rel=1e-5)
    assert result.ppl == pytest.approx(math.exp(nll / result.tokens), rel=1e-5)
    # the cached evaluator and the plain functions agree; a model agrees with itself everywhere
    evaluator = HeldOutEval(model, tok, text, seq_len=seq_len, batch_size=5)
    assert evaluator.teacher.ppl == pytest.approx(result.ppl, rel=1e-6)
    assert evaluator(model)["teacher_agreement"] == 1.0
    assert teacher_agreement(model, model, tok, text, seq_len=seq_len) == 1.0
    with pytest.raises(ValueError, match="fewer than one window"):
        tokenize_windows(tok, "ab", seq_len=64)


def test_eval_subcommand(qwen_dir, short_text_file, capsys):
    from lightning_slimmoe.cli import dispatch as main

    main(["eval", "--model", qwen_dir, "--ppl-file", short_text_file, "--seq-len", "24", "--teacher", qwen_dir,
          "--json"])
    out = json.loads(capsys.readouterr().out)
    assert out["perplexity"]["teacher_agreement"] == 1.0 and out["perplexity"]["ppl"] > 1


def test_lm_eval_missing_gives_a_clear_message(monkeypatch, qwen_dir):
    from lightning_slimmoe import evaluate

    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(ImportError, match="optional extra"):
        evaluate.run_lm_eval(qwen_dir, ["wikitext"])


def test_our_perplexity_agrees_with_lm_eval(qwen_dir, tmp_path):
    pytest.importorskip("lm_eval")
    from lightning_slimmoe.evaluate import run_lm_eval

    model, tok = _load(qwen_dir)
    text = "def add(a, b):\n    return a + b\n\nclass Point:\n    x = 1\n"
    path = tmp_path / "doc.txt"
    path.write_text(text)
    # lm-eval scores a document as rolling windows after a prefix token (bos = eos here); in one window that
    # is exactly our perplexity of "<prefix> + text", whose predicted tokens are all of the text's tokens.
    ours = perplexity(model, tok, tok.eos_token + text, seq_len=len(tok(tok.eos_token + text)["input_ids"]))
    assert ours.tokens == len(tok(text, add_special_tokens=False)["input_ids"])
    theirs = run_lm_eval(qwen_dir, [], ppl_file=str(path), batch_size=1, max_length=64)["results"]["slimmoe_ppl"]
    byte_ppl = next(v for k, v in theirs.items() if k.startswith("byte_perplexity"))
    assert byte_ppl == pytest.approx(math.exp(ours.nll / len(text.encode())), rel=1e-4)


# ---------------------------------------------------------------------------------------------------
def test_quality_tiny_runs_every_method(tmp_path, corpus_file):
    out = tmp_path / "q"
    results = quality.main(["--train", corpus_file, "--test-fraction", "0.1", "--out", str(out), "--preset", "tiny"])
    methods = results["methods"]
    expected = {"slimmoe", "slimmoe_kd_fisher", "slimmoe_activation", "oneshot", "criterion_kd_taylor",
                "criterion_kd_fisher",
                "criterion_activation", "criterion_magnitude", "criterion_random", "expert_removal", "from_scratch"}
    assert set(methods) == expected
    budget = methods["oneshot"]["tokens"]
    for name, row in methods.items():
        assert row["tokens"] == budget, name  # the same KD token budget for every method
        for key in ("val_ppl", "val_ppl_before_kd", "teacher_agreement", "total_params", "active_params", "wall_s"):
            assert row[key] is not None and math.isfinite(row[key]), (name, key)
    same_shape = {methods[m]["total_params"] for m in expected - {"expert_removal"}}
    assert len(same_shape) == 1 and same_shape.pop() < results["teacher"]["total_params"]
    removal = methods["expert_removal"]
    assert removal["num_experts"] < 8 and removal["slim_total_params"] == methods["oneshot"]["total_params"]
    assert len(methods["slimmoe"]["stages"]) == 2 and len(methods["slimmoe"]["val_ppl_before_kd_stages"]) == 2
    for name in ("criterion_kd_fisher", "slimmoe_kd_fisher"):  # the new criterion, as the pipeline parsed it
        stages = json.loads((out / "runs" / name / "run.json").read_text())["stages"]
        assert [s["criterion"] for s in stages] == ["kd_fisher"] * len(stages), name
    # the random init knows nothing: far worse than a pruned teacher before any KD
    assert methods["from_scratch"]["val_ppl_before_kd"] > methods["oneshot"]["val_ppl_before_kd"]
    assert json.loads((out / "quality.json").read_text())["methods"].keys() == methods.keys()
    assert "| slimmoe |" in (out / "quality.md").read_text()
    if _has("matplotlib"):
        assert (out / "quality.png").stat().st_size > 0
    assert (out / "data" / "train.txt").exists() and (out / "data" / "test.txt").exists()
    assert results["config"]["kd_tail_bucket"] is False and "tail bucket" not in (out / "quality.md").read_text()

    # --student-init: an externally pruned model recovered with the same budget (finished runs are reused)
    again = quality.main(["--train", corpus_file, "--test-fraction", "0.1", "--out", str(out), "--preset", "tiny",
                          "--student-init", str(out / "runs" / "oneshot" / "final"), "--methods", "student_init"])
    row = again["methods"]["student_init"]
    assert row["tokens"] == budget and row["val_ppl_before_kd"] == pytest.approx(methods["oneshot"]["val_ppl"], rel=1e-4)


def test_quality_paper_ratios_seeds_stdlib_split_and_run_schedule(tmp_path):
    """--paper phi-tiny (3 stages to 6.25% width, half the KV groups), --seeds 0,1 (mean ± std, paired
    slimmoe − oneshot per seed), --stdlib-split (the stdlib sources split by file), an early-stopped teacher
    (capped), --lr-schedule run."""
    out = tmp_path / "q"
    results = quality.main(["--stdlib-split", "0.2", "--paper", "phi-tiny", "--seeds", "0,1", "--out", str(out),
                            "--preset", "tiny", "--methods", "slimmoe,oneshot", "--lr-schedule",
                            "run", "--teacher-patience", "1", "--teacher-max-tokens", str(8 * 128)])
    c = results["config"]
    assert c["seeds"] == [0, 1] and c["final_expert_width"] == 0.0625 and c["final_kv_heads"] == 1
    assert [w for w, _ in c["slim_stages"]][-1] == 0.0625 and len(c["slim_stages"]) == 3
    # the split is by file: no test file's text is in the training text
    train, test = (Path(c[k]).read_text() for k in ("train", "test"))
    assert train and test and test[:2000] not in train
    teacher = results["teacher"]
    assert 0 < teacher["top8_mass"] < 1 and teacher["pretrain_tokens_trained"] <= 8 * 128
    for name in ("slimmoe", "oneshot"):
        row = results["methods"][name]
        assert row["seeds"] == [0, 1] and len(row["val_ppl_seeds"]) == 2
        assert row["val_ppl"] == pytest.approx(sum(row["val_ppl_seeds"]) / 2) and row["val_ppl_std"] >= 0
        assert (out / "runs" / name).is_dir() and (out / "runs" / f"{name}-seed1").is_dir()
    assert len(results["methods"]["slimmoe"]["stages"]) == 3
    assert results["methods"]["slimmoe"]["stages"][-1]["num_key_value_heads"] == 1
    paired = results["paired"]["slimmoe - oneshot"]
    per_seed = [results["methods"]["slimmoe"]["val_ppl_seeds"][i] - results["methods"]["oneshot"]["val_ppl_seeds"][i]
                for i in range(2)]
    assert paired["val_ppl_diff_seeds"] == pytest.approx(per_seed)
    # one LR curve over slimmoe's three stages: each stage ends lower on it (a per-stage curve ends every stage at
    # the same min_lr), the last at the curve's end; read from each stage's last checkpoint
    ends = []
    for k, stage in enumerate(results["methods"]["slimmoe"]["stages"]):
        ckpt = torch.load(out / "runs" / "slimmoe" / f"stage_{k}_{stage['name']}" / "checkpoints" / "last.ckpt",
                          map_location="cpu", weights_only=False)
        ends.append(ckpt["lr_schedulers"][0]["_last_lr"][0])
    assert ends[0] > ends[1] > ends[2] == pytest.approx(1e-3 * 0.1), ends
    md = (out / "quality.md").read_text()
    assert "| slimmoe - oneshot |" in md and "±" in md and "top-8 probability mass" in md


def test_quality_groups_stage_moves_the_kv_group_prune_to_one_stage(tmp_path):
    """--groups-stage K: slimmoe's KV groups go in its stage K only (later stages keep the student's); default the
    last stage; out of range is refused before anything is built."""
    p = dict(quality.PRESETS["tiny"], final_width=0.0625, final_groups=0.5,
             slim_stages=quality.stage_schedule(0.0625, 3))
    budget = 30 * p["batch_size"] * p["seq_len"]

    def groups_per_stage(**extra):
        specs = quality.method_specs(dict(p, **extra), None, budget, None, None, 2)
        return [stage.get("attention_groups") for stage in specs["slimmoe_activation"]["stages"]]

    half = quality.final_groups_of(p)
    assert half < p["kv_heads"]
    assert groups_per_stage() == [None, None, half]
    assert groups_per_stage(groups_stage=1) == [None, half, None]
    assert groups_per_stage(groups_stage=0) == [half, None, None]
    with pytest.raises(SystemExit):
        quality.main(["--stdlib-split", "0.2", "--paper", "phi-tiny", "--groups-stage", "3",
                      "--out", str(tmp_path / "q"), "--preset", "tiny"])
    assert not (tmp_path / "q").exists()


def test_quality_tail_bucket_flag_reaches_every_kd_stage(tmp_path, corpus_file):
    out = tmp_path / "q"
    methods = ["slimmoe", "oneshot", "from_scratch"]
    results = quality.main(["--train", corpus_file, "--test-fraction", "0.1", "--out", str(out), "--preset", "tiny",
                            "--tail-bucket", "--methods", ",".join(methods)])
    assert set(results["methods"]) == set(methods)
    assert results["config"]["kd_tail_bucket"] is True and results["config"]["kd_top_k"] == 8
    assert json.loads((out / "quality.json").read_text())["config"]["kd_tail_bucket"] is True
    assert "KD top_k 8 + tail bucket" in (out / "quality.md").read_text()
    for name in methods:
        # what the pipeline itself parsed (StageConfig.kd), not only the YAML we wrote: every stage has it on
        stages = json.loads((out / "runs" / name / "run.json").read_text())["stages"]
        assert stages and all(s["kd"]["tail_bucket"] is True for s in stages), name
        assert all(s["kd"]["top_k"] == 8 for s in stages), name
        assert math.isfinite(results["methods"][name]["val_ppl"]), name
    assert len(json.loads((out / "runs" / "slimmoe" / "run.json").read_text())["stages"]) == 2
    # the teacher's pretrain stage has no KD; its loss settings are left alone
    assert json.loads((out / "runs" / "teacher" / "run.json").read_text())["stages"][0]["kd"]["tail_bucket"] is False

    # --first-scores-from (+ --reuse-teacher, --seed): the first prune reuses that run's scores, so it keeps the same
    # neurons; the seed reaches the run and its data stream
    again = quality.main(["--train", corpus_file, "--test-fraction", "0.1", "--out", str(tmp_path / "q2"), "--preset",
                          "tiny", "--tail-bucket", "--methods", "oneshot,from_scratch", "--reuse-teacher", str(out),
                          "--first-scores-from", str(out), "--seed", "1"])
    assert again["config"]["seed"] == 1 and again["config"]["first_scores_from"] == str(out)
    record = json.loads((tmp_path / "q2" / "runs" / "oneshot" / "run.json").read_text())
    assert record["stages"][0]["scores_file"] == str(out / "runs" / "oneshot" / "stage_0_prune" / "scores.pt")
    assert record["batch"]["data_seed"] == 1
    keeps = [torch.load(d / "runs" / "oneshot" / "stage_0_prune" / "keep.pt", weights_only=True)["keep"]
             for d in (out, tmp_path / "q2")]
    assert all(torch.equal(a, b) for kind in ("experts", "groups") for a, b in
               zip(keeps[0][kind].values(), keeps[1][kind].values()))
    assert again["methods"]["oneshot"]["val_ppl_before_kd"] == pytest.approx(results["methods"]["oneshot"]["val_ppl_before_kd"])
    scratch = json.loads((tmp_path / "q2" / "runs" / "from_scratch" / "run.json").read_text())["stages"][0]
    assert scratch["scores_file"] is None  # no prune, nothing to score


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def test_speed_tiny_every_loss_path_floor_scoring_and_kernels(tmp_path):
    """The fused loss, the checkpointed one and the bare loop all run, beside the floor and scoring; a kernel suffix
    and experts_kernels work (one round each: --repeats is tested below)."""
    out = tmp_path / "s"
    summary = speed.main(["--out", str(out), "--preset", "tiny", "--configs",
                          "ours_topk,ours_topk_ckpt,bare_topk,floor,scoring,ours_topk:eager,experts_kernels"])
    for name in ("ours_topk", "ours_topk_ckpt", "bare_topk", "floor", "scoring", "ours_topk:eager"):
        r = summary["results"][name]
        assert r["tokens_per_s"] > 0 and r["peak_rss_mb"] > 100 and r["peak_rss_over_setup_mb"] >= 0, name
    for key in ("ours_topk/floor_tokens_per_s", "ours_topk/ours_topk_ckpt_tokens_per_s",
                "ours_topk/bare_topk_tokens_per_s", "scoring/ours_topk_s_per_token",
                "ours_topk:eager/ours_topk_tokens_per_s"):
        assert summary["ratios"][key] > 0, key
    assert "scoring/ours_topk_tokens_per_s" in summary["ratios"]
    assert summary["results"]["ours_topk:eager"]["experts_kernels"] == {"student": "eager", "teacher": "eager"}
    assert summary["results"]["ours_topk"]["experts_kernels"] == {"student": "grouped_mm", "teacher": "grouped_mm"}
    kernels = summary["experts_kernels"]
    assert set(kernels["kernels"]) == {"grouped_mm", "batched_mm", "eager"} and kernels["automatic"] == "grouped_mm"
    assert all(k["max_abs_logit_diff_vs_eager"] < 1e-4 for k in kernels["kernels"].values())
    md = (out / "speed.md").read_text()
    assert md.count("| ours_topk |") == 1 and "| ours_topk_ckpt |" in md


def test_speed_tiny_trl_gkd(tmp_path):
    pytest.importorskip("trl")
    summary = speed.main(["--out", str(tmp_path / "s"), "--preset", "tiny", "--configs", "ours_topk,trl_gkd"])
    assert summary["results"]["trl_gkd"]["tokens_per_s"] > 0, summary["skipped"]
    assert summary["results"]["trl_gkd"]["loss_tokens"] > 0
    for key in ("tokens_per_s", "peak_memory", "peak_rss_over_setup"):  # ours / TRL, what docs/results.md reads
        assert summary["ratios"][f"ours_topk/trl_gkd_{key}"] > 0, key
    for name in ("ours_topk", "trl_gkd"):
        r = summary["results"][name]
        assert r["peak_rss_over_setup_mb"] >= 0 and r["load_before"] >= 0 and r["load_after"] >= 0


def test_speed_vocab_override_and_repeats(tmp_path):
    """--vocab changes the models' vocabulary and nothing else; --repeats gives medians and per-round ratios; an unknown
    configuration is skipped with a reason."""
    out = tmp_path / "s"
    summary = speed.main(["--out", str(out), "--preset", "tiny", "--vocab", "1000", "--repeats", "2", "--configs",
                          "ours_topk,ours_topk_ckpt,nonsense"])
    assert summary["vocab_size"] == 1000 and summary["shape"]["vocab"] == 1000 and summary["repeats"] == 2
    setup = json.loads((out / "work" / "setup.json").read_text())
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(setup["teacher"]).vocab_size == 1000 == AutoConfig.from_pretrained(
        setup["student"]).vocab_size
    assert setup["tokenizer_size"] <= 320  # the tokenizer is still the tiny preset's
    for name in ("ours_topk", "ours_topk_ckpt"):
        r = summary["results"][name]
        assert r["tokens_per_s"] > 0 and len(r["runs"]) == 2, name
        assert r["tokens_per_s"] == pytest.approx(sorted(x["tokens_per_s"] for x in r["runs"])[0] / 2
                                                  + sorted(x["tokens_per_s"] for x in r["runs"])[1] / 2)
    key = "ours_topk/ours_topk_ckpt_tokens_per_s"
    assert summary["ratios"][key] > 0 and len(summary["ratio_runs"][key]) == 2
    assert "unknown configuration" in summary["skipped"]["nonsense"]
    # the same --out with another shape rebuilds its models instead of reusing them
    again = speed.main(["--out", str(out), "--preset", "tiny", "--configs", "ours_topk"])
    assert again["vocab_size"] == json.loads((out / "work" / "setup.json").read_text())["vocab_size"] < 1000


def test_speed_cuda_without_a_gpu_fails_fast(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(SystemExit, match="no CUDA device"):
        speed.main(["--out", str(tmp_path / "s"), "--device", "cuda", "--configs", "ours_topk"])
    assert not (tmp_path / "s").exists()  # nothing was built


def test_quality_claims_pairs_seeds_and_gives_verdicts(tmp_path, capsys):
    from bench import quality_claims

    def row(ppl, before):
        return {"seeds": [0, 1, 2], "val_ppl_seeds": ppl, "val_ppl_before_kd_seeds": before, "total_params": 100}

    config = {"final_expert_width": 0.0625, "final_kv_heads": 2, "slim_stages": [[0.25, 0.5], [0.0625, 0.5]],
              "kd_lr": 3e-4, "lr_schedule": "run"}
    methods = {"slimmoe": row([10.0, 12.0, 9.0], [5, 5, 5]), "oneshot": row([11.0, 11.0, 11.0], [20, 20, 20]),
               "criterion_activation": row([12.0, 13.0, 14.0], [30, 31, 32])}
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "quality.json").write_text(json.dumps({"config": config, "methods": methods}))
    text = quality_claims.main([str(tmp_path / "r"), "--out", str(tmp_path / "claims.md")])
    lines = {line.split(" | ")[0].lstrip("| "): line for line in text.splitlines()[2:]}
    assert set(lines) == {"multi-stage > one-shot (kd_taylor)", "kd_taylor > activation (one-shot)"}  # others: not run
    multi = lines["multi-stage > one-shot (kd_taylor)"]
    assert "-1.00, +1.00, -2.00" in multi and "-0.67 ± 1.53" in multi and "mixed (2/3)" in multi
    assert "| - |" in multi  # no before-KD comparison against a multi-stage run's first prune
    one_shot = lines["kd_taylor > activation (one-shot)"]
    assert "holds (3/3)" in one_shot and "| -11.0 | 1.00 |" in one_shot
    assert (tmp_path / "claims.md").read_text() == text
    with pytest.raises(SystemExit):
        quality_claims.main([str(tmp_path / "missing")])
    assert "no quality.json" in capsys.readouterr().err


def test_quality_claims_pairs_a_method_across_two_result_directories(tmp_path, capsys):
    """--pair: the same multi-stage method under two stage splits, paired per seed; refused across teachers/seeds."""
    from bench import quality_claims

    def write(name, split, ppl, teacher_ppl=50.0, seeds=(0, 1, 2)):
        config = {"final_expert_width": 0.0625, "final_kv_heads": 2, "slim_stages": split, "kd_lr": 3e-4,
                  "lr_schedule": "stage", "kd_tokens": 160_000}
        methods = {"slimmoe": {"seeds": list(seeds), "val_ppl_seeds": ppl, "total_params": 100}}
        (tmp_path / name).mkdir()
        (tmp_path / name / "quality.json").write_text(json.dumps(
            {"config": config, "methods": methods, "teacher": {"val_ppl": teacher_ppl}}))

    write("long-first", [[0.4, 0.7], [0.16, 0.2], [0.0625, 0.1]], [10.0, 11.0, 12.0])
    write("long-last", [[0.4, 0.2], [0.16, 0.2], [0.0625, 0.6]], [9.0, 12.0, 11.5])
    text = quality_claims.main(["--pair", f"{tmp_path / 'long-first'}:slimmoe,{tmp_path / 'long-last'}:slimmoe"])
    row = text.splitlines()[2]
    assert "long-first: slimmoe 0.4:0.7/0.16:0.2/0.0625:0.1, 160k tokens" in row
    assert "+1.00, -1.00, +0.50" in row and "+0.17 ± 1.04" in row and "mixed (1/3)" in row
    write("other-teacher", [[0.0625, 1.0]], [1.0, 1.0, 1.0], teacher_ppl=51.0)
    write("two-seeds", [[0.0625, 1.0]], [1.0, 1.0], seeds=(0, 1))
    for other, message in (("other-teacher", "different teachers"), ("two-seeds", "seeds")):
        with pytest.raises(SystemExit):
            quality_claims.main(["--pair", f"{tmp_path / 'long-first'}:slimmoe,{tmp_path / other}:slimmoe"])
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        quality_claims.main(["--pair", f"{tmp_path / 'long-first'}:oneshot,{tmp_path / 'long-last'}:slimmoe"])
    assert "has no method 'oneshot'" in capsys.readouterr().err

