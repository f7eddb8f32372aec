"""Quality benchmark: SlimMoE's ablations (arXiv 2506.18349 §6) at small scale, on one machine.

    python bench/quality.py --train $DATA_DIR/wikitext-2-raw/wiki.valid.raw \
        --test $DATA_DIR/wikitext-2-raw/wiki.test.raw --out bench/out/quality-wikitext --preset cpu
    python bench/quality.py --train $DATA_DIR/tinyshakespeare/input.txt --test-fraction 0.1 \
        --out bench/out/quality-shakespeare --preset cpu
    # KD with the teacher's top-k from its full softmax + one rest-mass bucket (kd.tail_bucket) in every stage
    python bench/quality.py ... --tail-bucket

1. Train a Qwen3-MoE-shaped teacher (8 experts, top-2, GQA 8/4) from scratch on ``--train`` with the
   pipeline's own ``pretrain`` stage (BPE tokenizer trained on the same text); it is an HF dir.
2. Compress it to one final shape (25% expert width, half the KV groups) with every method below, each
   with the same total KD token budget, each a plain pipeline run (``lightning_slimmoe.cli.main`` on a
   generated YAML; nothing is re-implemented here):
     slimmoe              2-3 slimming stages, the first the longest, kd_taylor
     oneshot              one prune to the final shape (kd_taylor), then KD with the whole budget
     criterion_<c>        as oneshot with criterion c (criterion_kd_taylor *is* the oneshot run)
     expert_removal       drop whole experts (REAP saliency) to the same total parameter count, same KD
     from_scratch         final shape, random init, same tokens, LM + KD (lm_weight 0.5)
     student_init         (with --student-init DIR) KD recovery of an externally pruned HF model
3. Evaluate every model on ``--test`` (perplexity over non-overlapping windows of the raw text, and
   top-1 agreement with the teacher), also right after pruning before any KD (``val_ppl_before_kd``:
   the first prune applied to the teacher, re-applied from the stage's saved ``keep.pt``).

Writes ``quality.json``, ``quality.md`` and ``quality.png`` (validation loss on the train file's held-out
blocks vs KD tokens, read from each run's TensorBoard events) under ``--out``. Runs already finished in
``--out`` are reused (delete a run's folder to redo it).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import yaml  # noqa: E402

FINAL_WIDTH = 0.25  # of the teacher's expert width
PRESETS = {
    # seconds on a CI runner: every code path, nothing meaningful
    "tiny": dict(hidden=32, layers=2, heads=4, kv_heads=2, expert_width=32, experts=8, vocab=320, seq_len=32,
                 batch_size=4, pretrain_tokens=24 * 128, pretrain_lr=3e-3, kd_tokens=8 * 128, kd_lr=1e-3,
                 calibration_tokens=256, slim_stages=[(0.5, 0.6), (FINAL_WIDTH, 0.4)], limit_val_batches=2,
                 val_points=2, eval_seq_len=32, eval_max_windows=16, max_chars=60_000),
    # the 2-core CPU machine, <= 30 minutes for everything (teacher included)
    # (sized on a shared, contended 2-core box: ~1-2 s per 2,048-token step)
    "cpu": dict(hidden=128, layers=4, heads=8, kv_heads=4, expert_width=256, experts=8, vocab=4096, seq_len=256,
                batch_size=8, pretrain_tokens=500_000, pretrain_lr=3e-3, kd_tokens=160_000, kd_lr=1e-3,
                calibration_tokens=16_384, slim_stages=[(0.5, 0.6), (FINAL_WIDTH, 0.4)], limit_val_batches=4,
                val_points=6, eval_seq_len=256, eval_max_windows=256, max_chars=None),
    # one GPU: a bigger teacher, 3 slimming stages, 10x the tokens
    "gpu": dict(hidden=512, layers=8, heads=16, kv_heads=8, expert_width=1024, experts=16, vocab=16384,
                seq_len=512, batch_size=32, pretrain_tokens=60_000_000, pretrain_lr=1e-3, kd_tokens=8_000_000,
                kd_lr=3e-4, calibration_tokens=262_144, slim_stages=[(0.5, 0.5), (0.35, 0.3), (FINAL_WIDTH, 0.2)],
                limit_val_batches=16, val_points=16, eval_seq_len=512, eval_max_windows=None, max_chars=None,
                accelerator="gpu", precision="bf16-mixed"),
}
CRITERIA = ["kd_taylor", "activation", "magnitude", "random"]


# ---------------------------------------------------------------------------------------------------
def split_file(path: str, test_fraction: float, out_dir: Path) -> tuple[str, str]:
    """First (1 - f) of the text -> train.txt, the rest -> test.txt, cut at a line boundary."""
    text = Path(path).read_text(encoding="utf-8")
    cut = text.rfind("\n", 0, int(len(text) * (1 - test_fraction))) + 1 or int(len(text) * (1 - test_fraction))
    out_dir.mkdir(parents=True, exist_ok=True)
    train, test = out_dir / "train.txt", out_dir / "test.txt"
    train.write_text(text[:cut], encoding="utf-8")
    test.write_text(text[cut:], encoding="utf-8")
    return str(train), str(test)


def teacher_model_config(p: dict) -> dict:
    return {
        "model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"], "hidden_size": p["hidden"],
        "num_hidden_layers": p["layers"], "num_attention_heads": p["heads"], "num_key_value_heads": p["kv_heads"],
        "head_dim": p["hidden"] // p["heads"], "moe_intermediate_size": p["expert_width"],
        "intermediate_size": 4 * p["hidden"], "num_experts": p["experts"], "num_experts_per_tok": 2,
        "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [], "hidden_act": "silu",
        "max_position_embeddings": 4 * p["seq_len"], "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        "router_aux_loss_coef": 0.0, "initializer_range": 0.02, "tie_word_embeddings": False,
        "vocab_size": p["vocab"],
    }


def base_config(p: dict, train_file: str, output_dir: Path, teacher: str | None, stages: list, **top) -> dict:
    trainer = {"accelerator": p.get("accelerator", "cpu"), "devices": 1, "precision": p.get("precision", "32-true"),
               "log_every_n_steps": 5, "limit_val_batches": p["limit_val_batches"], "enable_progress_bar": False,
               "enable_model_summary": False}
    data = {"files": [train_file], "seq_len": p["seq_len"], "batch_size": p["batch_size"], "val_fraction": 0.02}
    seed = p.get("seed", 0)
    if seed:  # the data seed too: train/val split, training-stream order, calibration batches
        data["seed"] = seed
    if p.get("max_chars"):
        data["max_chars"] = p["max_chars"]
    return {"seed_everything": seed, "output_dir": str(output_dir), "teacher": teacher, "trainer": trainer,
            "data": {"class_path": "lightning_slimmoe.data.TextDataModule", "init_args": data},
            "stages": stages, **top}


def kd_stage(p: dict, name: str, tokens: int, **keys) -> dict:
    steps = max(1, tokens // (p["batch_size"] * p["seq_len"]))
    stage = {"name": name, "max_tokens": int(tokens), "calibration_tokens": p["calibration_tokens"],
             "kd": {"top_k": 8, "temperature": 1.0, "lm_weight": 0.0}, "optimizer": {"lr": p["kd_lr"]},
             "val_every_n_steps": max(1, steps // p["val_points"])}
    stage.update(keys)
    return stage


def run_pipeline(config: dict, yaml_path: Path) -> tuple[dict, float]:
    """One pipeline run (``cli.main``); a finished run in the same dir is reused."""
    from lightning_slimmoe import cli

    out = Path(config["output_dir"])
    if (out / "summary.json").exists():
        meta = json.loads((out / "bench_wall.json").read_text()) if (out / "bench_wall.json").exists() else {}
        return json.loads((out / "summary.json").read_text()), meta.get("wall_s", float("nan"))
    if out.exists():
        shutil.rmtree(out)  # an unfinished run: start it again
    yaml_path.parent.mkdir(parents=True, exist_ok=True)
    yaml_path.write_text(yaml.safe_dump(config, sort_keys=False))
    started = time.time()
    argv, sys.argv = sys.argv, sys.argv[:1]  # LightningCLI reads sys.argv when given args too: hide ours
    try:
        summary = cli.main(["--config", str(yaml_path)])
    finally:
        sys.argv = argv
    wall = time.time() - started
    (out / "bench_wall.json").write_text(json.dumps({"wall_s": wall}))
    return summary, wall


# ---------------------------------------------------------------------------------------------------
def final_shape(teacher_config, p: dict):
    from lightning_slimmoe.slimming import resolve_target, slim_config

    target = resolve_target(teacher_config, expert_width=FINAL_WIDTH, attention_groups=p["kv_heads"] // 2,
                            reference_config=teacher_config)
    return slim_config(teacher_config, target)


def best_expert_count(teacher_config, p: dict, target_total: int) -> tuple[int, int]:
    """Number of full-width experts per layer (with the same halved attention) whose total parameter
    count is closest to ``target_total``; returns (experts, total params)."""
    from lightning_slimmoe.params import count_config_params
    from lightning_slimmoe.slimming import resolve_target, slim_config

    best = None
    for n in range(2, p["experts"] + 1):  # >= top_k experts so that routing still works
        config = teacher_config.__class__.from_dict(teacher_config.to_dict())
        config.num_experts = n
        config = slim_config(config, resolve_target(config, attention_groups=p["kv_heads"] // 2,
                                                    reference_config=teacher_config))
        total = count_config_params(config).total
        if best is None or abs(total - target_total) < abs(best[1] - target_total):
            best = (n, total)
    return best


def make_random_student(teacher_dir: str, p: dict, out_dir: Path, seed: int = 1) -> str:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if (out_dir / "config.json").exists():
        return str(out_dir)
    config = final_shape(AutoConfig.from_pretrained(teacher_dir), p)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(teacher_dir).save_pretrained(out_dir)
    return str(out_dir)


def pruned_before_kd(run_dir: Path, stages: list[dict], first_source: str) -> list[tuple[str, object]]:
    """The model right after each prune of a run, before that stage's KD: the stage's incoming model
    (teacher / student_init / previous stage's export) with the stage's saved ``keep.pt`` applied."""
    from transformers import AutoModelForCausalLM

    from lightning_slimmoe.run_dir import RunDir
    from lightning_slimmoe.slimming import remove_experts_, slim_model_

    models, source = [], first_source
    for stage, stage_dir in zip(stages, RunDir(run_dir, [s["name"] for s in stages]).stages):
        if stage_dir.has_keep():
            model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
            keep, kept_experts = stage_dir.load_keep()
            if kept_experts:
                remove_experts_(model, kept_experts)
            slim_model_(model, keep)
            models.append((stage["name"], model))
        source = str(stage_dir.hf)
    return models


def val_curve(run_dir: Path, tokens_per_step: int, tag: str = "val/lm_loss") -> list[tuple[int, float]]:
    """(KD tokens, validation LM loss) points from the run's TensorBoard events."""
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        return []
    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    if tag not in acc.Tags().get("scalars", []):
        return []
    points = {}
    for event in acc.Scalars(tag):
        points[event.step] = event.value  # the stage-end re-validation repeats the last step: keep the last
    return [(step * tokens_per_step, value) for step, value in sorted(points.items())]


# ---------------------------------------------------------------------------------------------------
def method_specs(p: dict, teacher_config, budget: int, student_init: str | None, random_dir: str | None,
                 removal_experts: int) -> dict:
    groups = p["kv_heads"] // 2
    slim = []
    tokens_per_step = p["batch_size"] * p["seq_len"]
    total_steps, used = max(len(p["slim_stages"]), budget // tokens_per_step), 0
    budget = total_steps * tokens_per_step  # whole steps: every method gets exactly the same tokens
    for k, (width, share) in enumerate(p["slim_stages"]):
        last = k == len(p["slim_stages"]) - 1
        keys = {"expert_width": width, "criterion": "kd_taylor"}
        if last:
            keys["attention_groups"] = groups
        # whole steps per stage, so that the stages add up to exactly the one-shot methods' budget
        steps = total_steps - used if last else max(1, round(total_steps * share))
        used += steps
        slim.append(kd_stage(p, f"slim{int(round(width * 100))}", steps * tokens_per_step, **keys))
    specs = {"slimmoe": {"stages": slim}}
    for c in CRITERIA:
        run = "oneshot" if c == "kd_taylor" else f"criterion_{c}"
        specs[run] = {"stages": [kd_stage(p, "prune", budget, expert_width=FINAL_WIDTH, attention_groups=groups,
                                          criterion=c)]}
    specs["expert_removal"] = {"stages": [kd_stage(p, "remove", budget, remove_experts_to=removal_experts,
                                                   attention_groups=groups, criterion="kd_taylor")]}
    scratch = kd_stage(p, "scratch", budget)
    scratch["kd"]["lm_weight"] = 0.5
    scratch["optimizer"]["lr"] = p["pretrain_lr"]  # a random init gets the teacher's pretraining LR
    specs["from_scratch"] = {"stages": [scratch], "student_init": random_dir}
    if student_init:
        specs["student_init"] = {"stages": [kd_stage(p, "recover", budget)], "student_init": student_init}
    return specs


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", required=True, help="training text file")
    parser.add_argument("--test", help="held-out text file (or use --test-fraction)")
    parser.add_argument("--test-fraction", type=float, default=None,
                        help="split --train: first 1-f train, last f test (files written under --out/data)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--student-init", help="HF dir of an externally pruned model: add its KD recovery row")
    parser.add_argument("--methods", default="", help="comma-separated subset of methods (default: all)")
    parser.add_argument("--kd-tokens", type=int, default=None, help="override the preset's KD token budget")
    parser.add_argument("--calibration-tokens", type=int, default=None, help="override the preset's")
    parser.add_argument("--stage-split", default=None,
                        help="override slimmoe's stages, e.g. '0.5:0.6,0.25:0.4' (width:share of budget)")
    parser.add_argument("--kd-lr", type=float, default=None, help="override the preset's KD learning rate")
    parser.add_argument("--temperature", type=float, default=None, help="override the KD temperature")
    parser.add_argument("--top-k", type=int, default=None,
                        help="override the KD top_k (default 8 as in the paper; the vocabulary size = full KL)")
    parser.add_argument("--tail-bucket", action="store_true",
                        help="kd.tail_bucket: true in every KD stage of every method (teacher top-k from its full "
                             "softmax + one rest-of-the-mass bucket, instead of renormalising over the top-k)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the runs and of their data stream (split, order, calibration batches); "
                             "for a noise estimate, with --reuse-teacher so that the teacher stays the same")
    parser.add_argument("--first-scores-from", default=None,
                        help="another --out dir with the same teacher: every method's first prune reuses that run's "
                             "stage-0 scores.pt (scores_file) instead of calibrating")
    parser.add_argument("--reuse-teacher", default=None,
                        help="another --out dir of the same preset and data: reuse its trained teacher")
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite quality.md / quality.png from an existing --out (no training, no evaluation)")
    args = parser.parse_args(argv)
    if args.report_only:
        return report_only(Path(args.out).resolve(), PRESETS[args.preset])
    if (args.test is None) == (args.test_fraction is None):
        parser.error("give exactly one of --test and --test-fraction")

    started = time.time()
    p = dict(PRESETS[args.preset])
    if args.kd_tokens:
        p["kd_tokens"] = args.kd_tokens
    if args.calibration_tokens:
        p["calibration_tokens"] = args.calibration_tokens
    if args.kd_lr:
        p["kd_lr"] = args.kd_lr
    p["seed"] = args.seed
    if args.stage_split:
        p["slim_stages"] = [tuple(float(x) for x in s.split(":")) for s in args.stage_split.split(",")]
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    train_file, test_file = ((args.train, args.test) if args.test else
                             split_file(args.train, args.test_fraction, out / "data"))
    train_file, test_file = str(Path(train_file).resolve()), str(Path(test_file).resolve())
    if Path(train_file).suffix.lower() not in (".txt", ".json", ".jsonl", ".parquet"):  # e.g. wiki.valid.raw
        link = out / "data" / (Path(train_file).name + ".txt")  # a plain-text view; the corpus is not copied
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists():
            link.symlink_to(train_file)
        train_file = str(link)

    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from lightning_slimmoe.evaluate import HeldOutEval
    from lightning_slimmoe.params import count_config_params, count_params

    # 1. teacher ------------------------------------------------------------------------------------
    model_json = out / "teacher_model_config.json"
    model_json.write_text(json.dumps(teacher_model_config(p), indent=2))
    pre = {"name": "pretrain", "pretrain": {"model_config": str(model_json), "tokenizer_vocab_size": p["vocab"]},
           "max_tokens": p["pretrain_tokens"], "optimizer": {"lr": p["pretrain_lr"], "warmup_ratio": 0.05},
           "val_every_n_steps": max(1, p["pretrain_tokens"] // (p["batch_size"] * p["seq_len"]) // p["val_points"])}
    teacher_run = out / "runs" / "teacher"
    if args.reuse_teacher and not teacher_run.exists():
        shutil.copytree(Path(args.reuse_teacher) / "runs" / "teacher", teacher_run, symlinks=True)
    teacher_summary, teacher_wall = run_pipeline(base_config(p, train_file, teacher_run, None, [pre]),
                                                 out / "configs" / "teacher.yaml")
    teacher_dir = str(teacher_run / "final")
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32)
    teacher_config = teacher.config
    device = "cuda" if p.get("accelerator") == "gpu" and torch.cuda.is_available() else "cpu"
    test_text = Path(test_file).read_text(encoding="utf-8")
    evaluator = HeldOutEval(teacher.to(device), tokenizer, test_text, p["eval_seq_len"], batch_size=8, device=device,
                            max_windows=p["eval_max_windows"])
    teacher_counts = count_params(teacher)
    results = {"teacher": {"val_ppl": evaluator.teacher.ppl, "total_params": teacher_counts.total,
                           "active_params": teacher_counts.active, "train_val_ppl": teacher_summary["teacher"]["val_ppl"],
                           "pretrain_tokens": teacher_summary["stages"][0]["tokens"], "wall_s": round(teacher_wall, 1),
                           "dir": teacher_dir},
               "methods": {}}
    print(f"teacher: test ppl {evaluator.teacher.ppl:.3f} on {evaluator.teacher.tokens:,} tokens", flush=True)

    # 2. methods ------------------------------------------------------------------------------------
    slim_total = count_config_params(final_shape(teacher_config, p)).total
    removal_experts, removal_total = best_expert_count(teacher_config, p, slim_total)
    random_dir = make_random_student(teacher_dir, p, out / "random_init")
    specs = method_specs(p, teacher_config, p["kd_tokens"], args.student_init, random_dir, removal_experts)
    wanted = [m for m in args.methods.split(",") if m] or list(specs) + ["criterion_kd_taylor"]
    tokens_per_step = p["batch_size"] * p["seq_len"]
    curves = {}
    for name, spec in specs.items():
        if name not in wanted and not (name == "oneshot" and "criterion_kd_taylor" in wanted):
            continue
        run_dir = out / "runs" / name
        config = base_config(p, train_file, run_dir, teacher_dir, spec["stages"],
                             **({"student_init": spec["student_init"]} if spec.get("student_init") else {}))
        for stage in config["stages"]:
            if args.temperature:
                stage["kd"]["temperature"] = args.temperature
            if args.top_k:
                stage["kd"]["top_k"] = args.top_k
            if args.tail_bucket:
                stage["kd"]["tail_bucket"] = True
        first = config["stages"][0]
        if args.first_scores_from and ("expert_width" in first or "remove_experts_to" in first):
            # the first prune's scores from another --out dir (same teacher, same method): e.g. kd_taylor scored
            # with the top-k KD loss, recovered with another loss
            src = Path(args.first_scores_from).resolve() / "runs" / name / f"stage_0_{first['name']}" / "scores.pt"
            if not src.exists():
                parser.error(f"--first-scores-from: {src} does not exist")
            first["scores_file"] = str(src)
        print(f"=== {name}", flush=True)
        summary, wall = run_pipeline(config, out / "configs" / f"{name}.yaml")
        final = AutoModelForCausalLM.from_pretrained(summary["final_dir"], dtype=torch.float32)
        after = evaluator(final)
        counts = count_params(final)
        if spec.get("student_init"):
            before = [evaluator(AutoModelForCausalLM.from_pretrained(spec["student_init"], dtype=torch.float32))["ppl"]]
        else:
            before = [evaluator(m)["ppl"] for _, m in pruned_before_kd(run_dir, spec["stages"], teacher_dir)]
        row = {"val_ppl": after["ppl"], "val_ppl_before_kd": before[0] if before else None,
               "teacher_agreement": after["teacher_agreement"], "total_params": counts.total,
               "active_params": counts.active, "tokens": sum(s["tokens"] for s in summary["stages"]),
               "wall_s": round(wall, 1), "train_val_ppl": summary["stages"][-1]["val_ppl"],
               "stages": [{k: s[k] for k in ("name", "expert_width", "num_experts", "num_key_value_heads", "tokens",
                                             "val_ppl", "wall_s")} for s in summary["stages"]]}
        if len(before) > 1:
            row["val_ppl_before_kd_stages"] = before
        if name == "expert_removal":
            row["num_experts"] = removal_experts
            row["slim_total_params"] = slim_total
        results["methods"][name] = row
        curves[name] = (val_curve(run_dir, tokens_per_step), val_curve(run_dir, tokens_per_step, "val/teacher_agreement"))
        if name == "oneshot" and "criterion_kd_taylor" in wanted:
            results["methods"]["criterion_kd_taylor"] = {**row, "same_run_as": "oneshot"}
            curves["criterion_kd_taylor"] = curves[name]
        print(f"=== {name}: test ppl {after['ppl']:.3f} (before KD {row['val_ppl_before_kd']}), agreement "
              f"{after['teacher_agreement']:.3f}, {wall:.0f}s", flush=True)

    results["config"] = {"preset": args.preset, "train": train_file, "test": test_file, "kd_tokens": p["kd_tokens"],
                         "calibration_tokens": p["calibration_tokens"], "slim_stages": p["slim_stages"],
                         "kd_lr": p["kd_lr"], "temperature": args.temperature or 1.0,
                         "kd_top_k": args.top_k or 8, "kd_tail_bucket": bool(args.tail_bucket), "seed": args.seed,
                         "first_scores_from": args.first_scores_from,
                         "eval_seq_len": p["eval_seq_len"], "eval_tokens": evaluator.teacher.tokens,
                         "final_expert_width": FINAL_WIDTH, "final_kv_heads": p["kv_heads"] // 2,
                         "expert_removal": {"num_experts": removal_experts, "total_params": removal_total,
                                            "slim_total_params": slim_total},
                         "torch_threads": torch.get_num_threads()}
    results["wall_s"] = round(time.time() - started, 1)
    (out / "quality.json").write_text(json.dumps(results, indent=2))
    (out / "quality.md").write_text(markdown(results))
    plot(curves, results, out / "quality.png")
    print(markdown(results))
    return results


def report_only(out: Path, p: dict) -> dict:
    results = json.loads((out / "quality.json").read_text())
    tokens_per_step = p["batch_size"] * p["seq_len"]
    curves = {name: (val_curve(out / "runs" / name, tokens_per_step),
                     val_curve(out / "runs" / name, tokens_per_step, "val/teacher_agreement"))
              for name in results["methods"] if (out / "runs" / name).exists()}
    (out / "quality.md").write_text(markdown(results))
    plot(curves, results, out / "quality.png")
    print(markdown(results))
    return results


def markdown(results: dict) -> str:
    t = results["teacher"]
    c = results.get("config", {})
    lines = [f"Held-out perplexity on `{Path(c.get('test', '?')).name}` ({c.get('eval_tokens', 0):,} predicted tokens, "
             f"non-overlapping windows of {c.get('eval_seq_len')}); KD budget {c.get('kd_tokens', 0):,} tokens per method, KD top_k {c.get('kd_top_k', 8)}"
             f"{' + tail bucket' if c.get('kd_tail_bucket') else ''}, T {c.get('temperature', 1.0)}"
             f"{', seed ' + str(c['seed']) if c.get('seed') else ''}.",
             "",
             "| method | total params | active params | KD tokens | test ppl before KD | test ppl | top-1 agreement | wall s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|",
             f"| teacher | {t['total_params']:,} | {t['active_params']:,} | - | - | {t['val_ppl']:.2f} | 1.000 | "
             f"{t.get('wall_s', 0):.0f} |"]
    for name, r in results["methods"].items():
        label = name + (f" ({r['num_experts']} experts)" if "num_experts" in r else "")
        label += f" (= {r['same_run_as']})" if r.get("same_run_as") else ""
        before = "-" if r["val_ppl_before_kd"] is None else f"{r['val_ppl_before_kd']:.1f}"
        lines.append(f"| {label} | {r['total_params']:,} | {r['active_params']:,} | {r['tokens']:,} | {before} | "
                     f"{r['val_ppl']:.2f} | {r['teacher_agreement']:.3f} | {r['wall_s']:.0f} |")
    if "slimmoe" in results["methods"]:
        lines += ["", "slimmoe's *before KD* is its first prune (to the first stage's width) applied to the teacher; "
                  "later stages prune an already distilled student (`val_ppl_before_kd_stages` in quality.json)."]
    return "\n".join(lines) + "\n"


def plot(curves: dict, results: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed (pip install -r bench/requirements.txt): no quality.png", file=sys.stderr)
        return
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    for name, (points, agreement) in curves.items():
        if name == "criterion_kd_taylor":
            continue
        if points:
            ax.plot([x for x, _ in points], [y for _, y in points], marker="o", ms=3, label=name)
        if agreement:
            ax2.plot([x for x, _ in agreement], [y for _, y in agreement], marker="o", ms=3, label=name)
    ppl = results["teacher"].get("train_val_ppl")
    if ppl:
        ax.axhline(math.log(ppl), color="k", ls="--", lw=1, label="teacher")
    ax.set_xlabel("KD tokens")
    ax.set_ylabel("validation LM loss (held-out blocks of --train)")
    ax2.set_xlabel("KD tokens")
    ax2.set_ylabel("validation top-1 agreement with the teacher")
    for a in (ax, ax2):
        a.legend(fontsize=8)
        a.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
