"""Quality benchmark: SlimMoE's ablations (arXiv 2506.18349 §6) at small scale, on one machine.

    python bench/quality.py --train $DATA_DIR/wikitext-2-raw/wiki.valid.raw \
        --test $DATA_DIR/wikitext-2-raw/wiki.test.raw --out bench/out/quality-wikitext --preset cpu
    python bench/quality.py --train $DATA_DIR/tinyshakespeare/input.txt --test-fraction 0.1 \
        --out bench/out/quality-shakespeare --preset cpu
    # KD with the teacher's top-k from its full softmax + one rest-mass bucket (kd.tail_bucket) in every stage
    python bench/quality.py ... --tail-bucket

1. Train a Qwen3-MoE-shaped teacher (8 experts, top-2, GQA 8/4) from scratch on ``--train`` with the
   pipeline's own ``pretrain`` stage (BPE tokenizer trained on the same text); it is an HF dir.
2. Compress it to one final shape (default 25% expert width, half the KV groups) with every method below, each
   with the same total KD token budget, each a plain pipeline run (``lightning_slimmoe.cli.main`` on a
   generated YAML; nothing is re-implemented here):
     slimmoe              2-3 slimming stages, the first the longest, kd_taylor
     slimmoe_kd_fisher    the same stages scored with kd_fisher (the estimated KD-loss rise on removal)
     slimmoe_activation   the same stages scored with activation (mean |activation| per neuron / group)
     oneshot              one prune to the final shape (kd_taylor), then KD with the whole budget
     criterion_<c>        as oneshot with criterion c (criterion_kd_taylor *is* the oneshot run)
     expert_removal       drop whole experts (REAP saliency) to the same total parameter count, same KD
     from_scratch         final shape, random init, same tokens, LM + KD (lm_weight 0.5)
     student_init         (with --student-init DIR) KD recovery of an externally pruned HF model
3. Evaluate every model on ``--test`` (perplexity over non-overlapping windows of the raw text, and
   top-1 agreement with the teacher), also right after pruning before any KD (``val_ppl_before_kd``:
   the first prune applied to the teacher, re-applied from the stage's saved ``keep.pt``).

Paper ratios (SlimMoE §4: Phi-mini-MoE keeps 15% of the expert width and all attention, Phi-tiny-MoE 7% and half the
KV groups): ``--paper phi-mini`` = 2 stages to 12.5% width, every KV group; ``--paper phi-tiny`` = 3 stages to
6.25% width, half the groups (``--final-width`` / ``--final-groups`` / ``--stages`` set them one by one).
``--seeds 0,1,2`` repeats every method per seed (the same teacher) and reports mean ± std and the paired
difference slimmoe − oneshot per seed. ``--stdlib-split F`` makes the corpus the Python standard library's
sources split BY FILE (a test file's text is never trained on); ``--teacher-patience N`` trains the teacher until
its held-out loss has not improved for N validations (capped at ``--teacher-max-tokens``).

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
import statistics
import sys
import sysconfig
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import yaml  # noqa: E402

FINAL_WIDTH = 0.25  # of the teacher's expert width (--final-width)
FINAL_GROUPS = 0.5  # of the teacher's KV groups (--final-groups)
# SlimMoE's released shapes (docs/slimmoe-method.md §4) at widths the small teachers can hold: Phi-mini-MoE keeps
# 15% of the expert width and all 8 KV groups (2 stages here), Phi-tiny-MoE 7% and 4 of 8 groups (3 stages).
PAPER = {"phi-mini": dict(final_width=0.125, final_groups=1.0, stages=2),
         "phi-tiny": dict(final_width=0.0625, final_groups=0.5, stages=3)}
STAGE_SHARES = {1: [1.0], 2: [0.6, 0.4], 3: [0.5, 0.3, 0.2]}  # a longer first stage (the paper's ablation)
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
CRITERIA = ["kd_taylor", "kd_fisher", "activation", "magnitude", "random"]


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


def stdlib_split(test_fraction: float, out_dir: Path, train_chars: int | None = None,
                 test_chars: int | None = None) -> tuple[str, str]:
    """The Python standard library's ``.py`` sources (the pipeline's demo corpus, site-packages excluded), split BY
    FILE: a file is a test file when the CRC32 of its relative path falls in the first ``test_fraction`` of the
    range, so the split is a pure function of the file names and never cuts a module in two. Files are taken in
    sorted order up to ``train_chars`` / ``test_chars`` characters per side (None = all)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    sources = sorted(q for q in stdlib.rglob("*.py") if "site-packages" not in q.relative_to(stdlib).parts)
    parts: dict[str, list[str]] = {"train": [], "test": []}
    sizes = {"train": 0, "test": 0}
    caps = {"train": train_chars, "test": test_chars}
    for source in sources:
        rel = source.relative_to(stdlib).as_posix()
        side = "test" if zlib.crc32(rel.encode()) < test_fraction * 2**32 else "train"
        if caps[side] is not None and sizes[side] >= caps[side]:
            continue
        text = source.read_text(encoding="utf-8", errors="replace")  # as the demo corpus reads them
        parts[side].append(text)
        sizes[side] += len(text)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for side in ("train", "test"):
        path = out_dir / f"stdlib-{side}.txt"
        path.write_text("\n\n".join(parts[side]), encoding="utf-8")
        paths.append(str(path))
    return paths[0], paths[1]


@torch.no_grad()
def top_mass(model, windows, k: int = 8, batch_size: int = 8, device="cpu") -> float:
    """Mean probability mass of the model's top-k next-token ids over every predicted position of ``windows``
    (what a top-k KD loss keeps of the teacher; docs/results.md reads KD results against it)."""
    total, count = 0.0, 0
    for start in range(0, windows.shape[0], batch_size):
        ids = windows[start:start + batch_size].to(device)
        probs = model(input_ids=ids).logits[:, :-1].float().softmax(-1)  # (B, T-1, V)
        total += probs.topk(k, dim=-1).values.sum(-1).sum().item()
        count += probs.shape[0] * probs.shape[1]
    return total / max(1, count)


def stage_schedule(final_width: float, stages: int) -> list[tuple[float, float]]:
    """(width, share of the KD budget) per slimmoe stage: widths geometric from the teacher's to ``final_width``
    (each stage removes the same fraction of what is left: 0.5 then 0.25 for 2 stages to 25%), the paper's
    longer first stage (``STAGE_SHARES``)."""
    if stages not in STAGE_SHARES:
        raise ValueError(f"stages={stages}: must be one of {sorted(STAGE_SHARES)}")
    widths = [round(final_width ** ((k + 1) / stages), 4) for k in range(stages)]
    widths[-1] = final_width
    return list(zip(widths, STAGE_SHARES[stages]))


def final_groups_of(p: dict) -> int:
    """KV groups kept per layer at the final shape."""
    return max(1, int(round(p["kv_heads"] * p.get("final_groups", FINAL_GROUPS))))


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


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

    target = resolve_target(teacher_config, expert_width=p.get("final_width", FINAL_WIDTH),
                            attention_groups=final_groups_of(p), reference_config=teacher_config)
    return slim_config(teacher_config, target)


def best_expert_count(teacher_config, p: dict, target_total: int) -> tuple[int, int]:
    """Number of full-width experts per layer (with the same attention pruning) whose total parameter
    count is closest to ``target_total``; returns (experts, total params)."""
    from lightning_slimmoe.params import count_config_params
    from lightning_slimmoe.slimming import resolve_target, slim_config

    best = None
    for n in range(2, p["experts"] + 1):  # >= top_k experts so that routing still works
        config = teacher_config.__class__.from_dict(teacher_config.to_dict())
        config.num_experts = n
        config = slim_config(config, resolve_target(config, attention_groups=final_groups_of(p),
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
        points[event.step] = event.value  # a stage validated every step has two points at its first step: keep the last
    return [(step * tokens_per_step, value) for step, value in sorted(points.items())]


# ---------------------------------------------------------------------------------------------------
def method_specs(p: dict, teacher_config, budget: int, student_init: str | None, random_dir: str | None,
                 removal_experts: int) -> dict:
    groups = final_groups_of(p)
    final_width = p.get("final_width", FINAL_WIDTH)
    tokens_per_step = p["batch_size"] * p["seq_len"]
    total_steps = max(len(p["slim_stages"]), budget // tokens_per_step)
    budget = total_steps * tokens_per_step  # whole steps: every method gets exactly the same tokens
    fisher = {"fisher_draws": p.get("fisher_draws", 1)}
    groups_stage = p.get("groups_stage")
    groups_stage = len(p["slim_stages"]) - 1 if groups_stage is None else groups_stage

    def slim_stages(criterion: str) -> list[dict]:
        stages, used = [], 0
        for k, (width, share) in enumerate(p["slim_stages"]):
            last = k == len(p["slim_stages"]) - 1
            keys = {"expert_width": width, "criterion": criterion, **(fisher if criterion == "kd_fisher" else {})}
            # the KV groups go in one stage (the last unless --groups-stage); later stages keep the student's
            if k == groups_stage and groups != p["kv_heads"]:
                keys["attention_groups"] = groups
            # whole steps per stage, so that the stages add up to exactly the one-shot methods' budget
            steps = total_steps - used if last else max(1, round(total_steps * share))
            used += steps
            stages.append(kd_stage(p, f"slim{int(round(width * 100))}", steps * tokens_per_step, **keys))
        return stages

    specs = {"slimmoe": {"stages": slim_stages("kd_taylor")},
             "slimmoe_kd_fisher": {"stages": slim_stages("kd_fisher")},
             "slimmoe_activation": {"stages": slim_stages("activation")}}
    attention = {"attention_groups": groups} if groups != p["kv_heads"] else {}
    for c in CRITERIA:
        run = "oneshot" if c == "kd_taylor" else f"criterion_{c}"
        specs[run] = {"stages": [kd_stage(p, "prune", budget, expert_width=final_width, criterion=c, **attention,
                                          **(fisher if c == "kd_fisher" else {}))]}
    specs["expert_removal"] = {"stages": [kd_stage(p, "remove", budget, remove_experts_to=removal_experts,
                                                   criterion="kd_taylor", **attention)]}
    scratch = kd_stage(p, "scratch", budget)
    scratch["kd"]["lm_weight"] = 0.5
    scratch["optimizer"]["lr"] = p["pretrain_lr"]  # a random init gets the teacher's pretraining LR
    specs["from_scratch"] = {"stages": [scratch], "student_init": random_dir}
    if student_init:
        specs["student_init"] = {"stages": [kd_stage(p, "recover", budget)], "student_init": student_init}
    return specs


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", help="training text file (or --stdlib-split)")
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
                        help="override slimmoe's stages, e.g. '0.5:0.6,0.25:0.4' (width:share of budget); the last "
                             "width must be the final width")
    parser.add_argument("--final-width", type=float, default=None,
                        help=f"final expert width, a fraction of the teacher's (default {FINAL_WIDTH})")
    parser.add_argument("--final-groups", type=float, default=None,
                        help=f"final KV groups per layer, a fraction of the teacher's (default {FINAL_GROUPS}; 1 = "
                             "attention not pruned)")
    parser.add_argument("--stages", type=int, choices=sorted(STAGE_SHARES), default=None,
                        help="slimmoe's number of stages: widths geometric to the final width, shares "
                             "0.6/0.4 or 0.5/0.3/0.2 (default: the preset's schedule, or --paper's)")
    parser.add_argument("--groups-stage", type=int, default=None, metavar="K",
                        help="slimmoe prunes the KV groups in its stage K (0-based; default the last stage, e.g. 1 "
                             "for the middle of 3 stages as conf/phi_tiny.yaml does)")
    parser.add_argument("--paper", choices=sorted(PAPER), default=None,
                        help="the final shape and stage count of a released model: phi-mini = 2 stages to 12.5%% "
                             "width, all KV groups; phi-tiny = 3 stages to 6.25%% width, half the groups")
    parser.add_argument("--lr-schedule", choices=["stage", "run"], default="stage",
                        help="lr_schedule of every KD run: per-stage warm-up + decay, or one curve over the run")
    parser.add_argument("--fisher-draws", type=int, default=1, help="fisher_draws of the kd_fisher stages")
    parser.add_argument("--seeds", default=None,
                        help="comma-separated seeds (e.g. 0,1,2): every method once per seed, the same teacher; "
                             "quality.json gets per-seed values, mean, std and the paired slimmoe - oneshot "
                             "difference (overrides --seed)")
    parser.add_argument("--stdlib-split", type=float, default=None, metavar="TEST_FRACTION",
                        help="corpus = the Python standard library's sources, split by file: this fraction of the "
                             "files is the test text (instead of --train / --test)")
    parser.add_argument("--teacher-patience", type=int, default=0,
                        help="train the teacher until its held-out LM loss has not improved for this many "
                             "validations (0 = the preset's fixed pretrain tokens)")
    parser.add_argument("--teacher-max-tokens", type=int, default=None,
                        help="cap of the early-stopped teacher's pretrain (default 4x the preset's pretrain tokens)")
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
    if args.stdlib_split is not None:
        if args.train or args.test or args.test_fraction is not None:
            parser.error("--stdlib-split replaces --train / --test / --test-fraction")
        if not 0.0 < args.stdlib_split < 1.0:
            parser.error("--stdlib-split: the test fraction must lie in (0, 1)")
    elif not args.train:
        parser.error("give --train (with --test or --test-fraction) or --stdlib-split")
    elif (args.test is None) == (args.test_fraction is None):
        parser.error("give exactly one of --test and --test-fraction")
    seeds = [int(x) for x in args.seeds.split(",") if x != ""] if args.seeds else [args.seed]
    if not seeds or len(set(seeds)) != len(seeds):
        parser.error(f"--seeds {args.seeds!r}: give distinct integers")

    started = time.time()
    p = dict(PRESETS[args.preset])
    if args.kd_tokens:
        p["kd_tokens"] = args.kd_tokens
    if args.calibration_tokens:
        p["calibration_tokens"] = args.calibration_tokens
    if args.kd_lr:
        p["kd_lr"] = args.kd_lr
    paper = PAPER.get(args.paper, {})
    p["final_width"] = args.final_width or paper.get("final_width", FINAL_WIDTH)
    p["final_groups"] = args.final_groups or paper.get("final_groups", FINAL_GROUPS)
    if not (0.0 < p["final_width"] <= 1.0 and 0.0 < p["final_groups"] <= 1.0):
        parser.error("--final-width and --final-groups are fractions in (0, 1]")
    p["fisher_draws"] = args.fisher_draws
    stages = args.stages or paper.get("stages")
    if args.stage_split:
        p["slim_stages"] = [tuple(float(x) for x in s.split(":")) for s in args.stage_split.split(",")]
        if abs(p["slim_stages"][-1][0] - p["final_width"]) > 1e-9:
            parser.error(f"--stage-split: the last width {p['slim_stages'][-1][0]} is not the final width "
                         f"{p['final_width']}")
    elif stages or p["final_width"] != FINAL_WIDTH:
        p["slim_stages"] = stage_schedule(p["final_width"], stages or len(p["slim_stages"]))
    if args.groups_stage is not None:
        if not 0 <= args.groups_stage < len(p["slim_stages"]):
            parser.error(f"--groups-stage {args.groups_stage}: slimmoe has stages 0..{len(p['slim_stages']) - 1}")
        p["groups_stage"] = args.groups_stage
    p["seed"] = seeds[0]
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.stdlib_split is not None:
        test_chars = p["eval_max_windows"] * p["eval_seq_len"] * 8 if p["eval_max_windows"] else None
        train_file, test_file = stdlib_split(args.stdlib_split, out / "data", p.get("max_chars"), test_chars)
    else:
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
    teacher_p = dict(p, seed=0)  # one teacher for every seed
    teacher_yaml = base_config(teacher_p, train_file, teacher_run, None, [pre])
    if args.teacher_patience:
        # Until the held-out loss stops improving (at most the cap): a teacher that has converged, not one stopped
        # at a fixed budget. Validation every 1/val_points of the preset's budget, as the fixed-budget teacher.
        cap = args.teacher_max_tokens or 4 * p["pretrain_tokens"]
        pre["max_tokens"] = cap
        teacher_yaml["trainer"]["callbacks"] = [{
            "class_path": "lightning.pytorch.callbacks.EarlyStopping",
            "init_args": {"monitor": "val/lm_loss", "mode": "min", "patience": args.teacher_patience,
                          "check_on_train_epoch_end": False}}]
    if args.reuse_teacher and not teacher_run.exists():
        shutil.copytree(Path(args.reuse_teacher) / "runs" / "teacher", teacher_run, symlinks=True)
    teacher_summary, teacher_wall = run_pipeline(teacher_yaml, out / "configs" / "teacher.yaml")
    teacher_curve = val_curve(teacher_run, p["batch_size"] * p["seq_len"])
    teacher_dir = str(teacher_run / "final")
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32)
    teacher_config = teacher.config
    device = "cuda" if p.get("accelerator") == "gpu" and torch.cuda.is_available() else "cpu"
    test_text = Path(test_file).read_text(encoding="utf-8")
    evaluator = HeldOutEval(teacher.to(device), tokenizer, test_text, p["eval_seq_len"], batch_size=8, device=device,
                            max_windows=p["eval_max_windows"])
    teacher_counts = count_params(teacher)
    top8 = top_mass(teacher, evaluator.windows, k=8, device=device)
    results = {"teacher": {"val_ppl": evaluator.teacher.ppl, "top8_mass": top8,
                           "pretrain_tokens_trained": teacher_curve[-1][0] if teacher_curve else None,
                           "early_stopping_patience": args.teacher_patience or None,
                           "total_params": teacher_counts.total,
                           "active_params": teacher_counts.active, "train_val_ppl": teacher_summary["teacher"]["val_ppl"],
                           "pretrain_tokens": teacher_summary["stages"][0]["tokens"], "wall_s": round(teacher_wall, 1),
                           "dir": teacher_dir},
               "methods": {}}
    print(f"teacher: test ppl {evaluator.teacher.ppl:.3f} on {evaluator.teacher.tokens:,} tokens, top-8 mass "
          f"{top8:.3f}", flush=True)

    # 2. methods ------------------------------------------------------------------------------------
    slim_total = count_config_params(final_shape(teacher_config, p)).total
    removal_experts, removal_total = best_expert_count(teacher_config, p, slim_total)
    random_dir = make_random_student(teacher_dir, p, out / "random_init")
    tokens_per_step = p["batch_size"] * p["seq_len"]
    curves = {}
    per_seed: dict[str, dict[int, dict]] = {}  # method -> seed -> row
    for seed in seeds:
        p["seed"] = seed
        specs = method_specs(p, teacher_config, p["kd_tokens"], args.student_init, random_dir, removal_experts)
        wanted = [m for m in args.methods.split(",") if m] or list(specs) + ["criterion_kd_taylor"]
        for name, spec in specs.items():
            if name not in wanted and not (name == "oneshot" and "criterion_kd_taylor" in wanted):
                continue
            # the first seed's runs keep their old place (reused by a later single-seed call); others get a suffix
            run_dir = out / "runs" / (name if seed == seeds[0] else f"{name}-seed{seed}")
            row = run_method(args, p, spec, name, run_dir, train_file, teacher_dir, evaluator, out, parser)
            if name == "expert_removal":
                row["num_experts"] = removal_experts
                row["slim_total_params"] = slim_total
            per_seed.setdefault(name, {})[seed] = row
            if seed == seeds[0]:
                curves[name] = (val_curve(run_dir, tokens_per_step),
                                val_curve(run_dir, tokens_per_step, "val/teacher_agreement"))
            if name == "oneshot" and "criterion_kd_taylor" in wanted:
                per_seed.setdefault("criterion_kd_taylor", {})[seed] = {**row, "same_run_as": "oneshot"}
                if seed == seeds[0]:
                    curves["criterion_kd_taylor"] = curves[name]
            print(f"=== {name} (seed {seed}): test ppl {row['val_ppl']:.3f} (before KD {row['val_ppl_before_kd']}), "
                  f"agreement {row['teacher_agreement']:.3f}, {row['wall_s']:.0f}s", flush=True)
    results["methods"] = {name: aggregate(rows, seeds) for name, rows in per_seed.items()}
    results["paired"] = paired_differences(per_seed, seeds)

    results["config"] = {"preset": args.preset, "train": train_file, "test": test_file, "kd_tokens": p["kd_tokens"],
                         "calibration_tokens": p["calibration_tokens"], "slim_stages": p["slim_stages"],
                         "kd_lr": p["kd_lr"], "temperature": args.temperature or 1.0,
                         "kd_top_k": args.top_k or 8, "kd_tail_bucket": bool(args.tail_bucket), "seed": seeds[0],
                         "seeds": seeds, "lr_schedule": args.lr_schedule, "fisher_draws": args.fisher_draws,
                         "paper": args.paper, "stdlib_split": args.stdlib_split,
                         "first_scores_from": args.first_scores_from,
                         "eval_seq_len": p["eval_seq_len"], "eval_tokens": evaluator.teacher.tokens,
                         "final_expert_width": p["final_width"], "final_kv_heads": final_groups_of(p),
                         "groups_stage": p.get("groups_stage", len(p["slim_stages"]) - 1),
                         "expert_removal": {"num_experts": removal_experts, "total_params": removal_total,
                                            "slim_total_params": slim_total},
                         "torch_threads": torch.get_num_threads()}
    results["wall_s"] = round(time.time() - started, 1)
    (out / "quality.json").write_text(json.dumps(results, indent=2))
    (out / "quality.md").write_text(markdown(results))
    plot(curves, results, out / "quality.png")
    print(markdown(results))
    return results


def run_method(args, p: dict, spec: dict, name: str, run_dir: Path, train_file: str, teacher_dir: str, evaluator,
               out: Path, parser) -> dict:
    """One method's pipeline run (reused when finished) and its held-out evaluation: the row of quality.json."""
    from transformers import AutoModelForCausalLM

    from lightning_slimmoe.params import count_params

    config = base_config(p, train_file, run_dir, teacher_dir, spec["stages"], lr_schedule=args.lr_schedule,
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
    print(f"=== {name} (seed {p['seed']})", flush=True)
    summary, wall = run_pipeline(config, out / "configs" / f"{run_dir.name}.yaml")
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
    return row


SEED_KEYS = ("val_ppl", "val_ppl_before_kd", "teacher_agreement")


def aggregate(rows: dict[int, dict], seeds: list[int]) -> dict:
    """One method's row over its seeds: the first seed's row, with ``val_ppl`` / ``val_ppl_before_kd`` /
    ``teacher_agreement`` replaced by their mean over the seeds and, beside each, ``<key>_seeds`` (per seed, in
    ``seeds`` order) and ``<key>_std`` (sample std; 0 for one seed)."""
    ran = [s for s in seeds if s in rows]
    row = dict(rows[ran[0]])
    row["seeds"] = ran
    for key in SEED_KEYS:
        values = [rows[s][key] for s in ran]
        if any(v is None for v in values):
            continue
        row[key], row[f"{key}_std"] = mean_std(values)
        row[f"{key}_seeds"] = values
    if len(ran) > 1:
        row["wall_s"] = round(sum(rows[s]["wall_s"] for s in ran), 1)
    return row


def paired_differences(per_seed: dict[str, dict[int, dict]], seeds: list[int]) -> dict:
    """Per seed, slimmoe − oneshot (and slimmoe_kd_fisher − oneshot, criterion_kd_fisher − oneshot) test ppl: the
    same seed's data stream and calibration, so the seed-to-seed spread cancels from the difference."""
    out = {}
    for name in ("slimmoe", "slimmoe_kd_fisher", "criterion_kd_fisher"):
        both = [s for s in seeds if s in per_seed.get(name, {}) and s in per_seed.get("oneshot", {})]
        if not both:
            continue
        diffs = [per_seed[name][s]["val_ppl"] - per_seed["oneshot"][s]["val_ppl"] for s in both]
        mean, std = mean_std(diffs)
        out[f"{name} - oneshot"] = {"seeds": both, "val_ppl_diff_seeds": diffs, "val_ppl_diff": mean,
                                    "val_ppl_diff_std": std}
    return out


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


def stage_text(c: dict) -> str:
    """slimmoe's stages as run: ``0.3969:0.2 / 0.1575:0.2 / 0.0625:0.6``, and where the KV groups went if not last."""
    stages = c["slim_stages"]
    text = " / ".join(f"{width:g}:{share:g}" for width, share in stages)
    groups_stage = c.get("groups_stage", len(stages) - 1)
    return text + (f", KV groups in stage {groups_stage}" if groups_stage != len(stages) - 1 else "")


def markdown(results: dict) -> str:
    t = results["teacher"]
    c = results.get("config", {})
    lines = [f"Held-out perplexity on `{Path(c.get('test', '?')).name}` ({c.get('eval_tokens', 0):,} predicted tokens, "
             f"non-overlapping windows of {c.get('eval_seq_len')}); KD budget {c.get('kd_tokens', 0):,} tokens per method, KD top_k {c.get('kd_top_k', 8)}"
             f"{' + tail bucket' if c.get('kd_tail_bucket') else ''}, T {c.get('temperature', 1.0)}"
             f"{', seed ' + str(c['seed']) if c.get('seed') and len(c.get('seeds', [0])) == 1 else ''}"
             f"{', seeds ' + ','.join(map(str, c['seeds'])) + ' (mean ± std)' if len(c.get('seeds', [0])) > 1 else ''}"
             f"{', lr_schedule ' + c['lr_schedule'] if c.get('lr_schedule', 'stage') != 'stage' else ''}"
             f"; final shape {c.get('final_expert_width', FINAL_WIDTH):g} of the expert width, "
             f"{c.get('final_kv_heads', '?')} KV groups{' (' + c['paper'] + ' ratios)' if c.get('paper') else ''}"
             f"{'; slimmoe stages (width:share of the budget) ' + stage_text(c) if c.get('slim_stages') else ''}.",
             *([f"Teacher's top-8 probability mass on the test text: {t['top8_mass']:.3f}."] if t.get("top8_mass")
               is not None else []),
             "",
             "| method | total params | active params | KD tokens | test ppl before KD | test ppl | top-1 agreement | wall s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|",
             f"| teacher | {t['total_params']:,} | {t['active_params']:,} | - | - | {t['val_ppl']:.2f} | 1.000 | "
             f"{t.get('wall_s', 0):.0f} |"]
    def pm(r, key, fmt):  # "mean ± std" over seeds, the bare value for one seed
        std = r.get(f"{key}_std")
        return f"{r[key]:{fmt}}" + (f" ± {std:{fmt}}" if len(r.get("seeds", [])) > 1 and std is not None else "")

    for name, r in results["methods"].items():
        label = name + (f" ({r['num_experts']} experts)" if "num_experts" in r else "")
        label += f" (= {r['same_run_as']})" if r.get("same_run_as") else ""
        before = "-" if r["val_ppl_before_kd"] is None else pm(r, "val_ppl_before_kd", ".1f")
        lines.append(f"| {label} | {r['total_params']:,} | {r['active_params']:,} | {r['tokens']:,} | {before} | "
                     f"{pm(r, 'val_ppl', '.2f')} | {pm(r, 'teacher_agreement', '.3f')} | {r['wall_s']:.0f} |")
    if results.get("paired"):
        lines += ["", "Paired differences in test ppl, per seed (same data stream and calibration):", "",
                  "| difference | per seed | mean ± std |", "|---|---|---:|"]
        for label, d in results["paired"].items():
            per = ", ".join(f"{s}: {v:+.2f}" for s, v in zip(d["seeds"], d["val_ppl_diff_seeds"]))
            lines.append(f"| {label} | {per} | {d['val_ppl_diff']:+.2f} ± {d['val_ppl_diff_std']:.2f} |")
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
