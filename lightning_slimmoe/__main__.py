"""``python -m lightning_slimmoe {train,plan,eval} ...``

* ``train --config X [overrides]`` — the same as ``python train.py``.
* ``plan --config X [--json] [overrides]`` — shapes and parameter counts of every stage, computed on the
  meta device from configs alone (no weights, seconds on a CPU).
* ``eval --model DIR [--ppl-file FILE] [--tasks T1,T2] [--teacher DIR] [--seq-len N] [--json]`` — held-out
  perplexity of an HF dir over non-overlapping windows of a text file (and top-1 agreement with a
  teacher), plus lm-evaluation-harness tasks (optional extra: ``pip install -r bench/requirements.txt``).
* ``export --checkpoint DIR --out DIR [--tokenizer PATH] [--config PATH]`` — consolidate a sharded
  (ModelParallelStrategy / DCP) stage checkpoint into a stock HF dir, in one process, one tensor at a time.
"""

from __future__ import annotations

import json
import sys
import warnings


def plan(args: list[str]) -> dict:
    from lightning_slimmoe.cli import SlimMoECLI, with_default_config
    from lightning_slimmoe.pipeline import Pipeline, plan_summary

    import argparse

    front = argparse.ArgumentParser(prog="python -m lightning_slimmoe plan", add_help=False)
    front.add_argument("--json", action="store_true")
    front.add_argument("--memory", action="store_true", help="add a per-GPU memory plan of every stage")
    front.add_argument("--gpus", type=int, default=64)
    front.add_argument("--gpu-memory-gib", type=float, default=80.0)
    opts, args = front.parse_known_args(args)
    as_json = opts.json
    cli = SlimMoECLI(args=with_default_config(args))
    pipeline = Pipeline(cli.spec, cli.datamodule, cli.make_trainer)
    teacher_config, configs = pipeline.plan()
    result = plan_summary(teacher_config, configs, cli.spec.stages)
    if opts.memory:
        from lightning_slimmoe.memory import MemoryPlanInputs, memory_plan

        for stage, config, row in zip(cli.spec.stages, configs, result["stages"]):
            inputs = MemoryPlanInputs(
                gpus=opts.gpus, gpu_memory_gib=opts.gpu_memory_gib, micro_batch=cli.datamodule.hparams.batch_size,
                seq_len=cli.datamodule.hparams.seq_len, activation_checkpointing=cli.spec.parallel.activation_checkpointing,
                optimizer=stage.optimizer.name, chunk_tokens=stage.kd.chunk_tokens)
            row["memory_gib_per_gpu"] = memory_plan(config, teacher_config, inputs)
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        rows = [("stage", "expert_width", "heads q/kv", "head_dim", "total", "active")]
        for name, d in [("teacher", result["teacher"])] + [(s["name"], s) for s in result["stages"]]:
            rows.append((name, str(d["expert_width"]), f"{d['num_attention_heads']}/{d['num_key_value_heads']}",
                         str(d["head_dim"]), f"{d['total_params']:,}", f"{d['active_params']:,}"))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        print("\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows))
        if opts.memory:
            print(f"\nper-GPU memory plan (GiB, {opts.gpus} GPUs x {opts.gpu_memory_gib:g} GiB, FSDP2 full shard):")
            for row in result["stages"]:
                m = row["memory_gib_per_gpu"]
                print(f"  {row['name']}: " + ", ".join(f"{k} {v}" for k, v in m.items()))
    return result


def evaluate(args: list[str]) -> dict:
    import argparse

    from lightning_slimmoe.evaluate import LM_EVAL_MISSING, evaluate_dir, run_lm_eval

    parser = argparse.ArgumentParser(prog="python -m lightning_slimmoe eval")
    parser.add_argument("--model", required=True, help="local HF model dir (weights + tokenizer)")
    parser.add_argument("--ppl-file", help="text file: perplexity over non-overlapping windows of its raw text")
    parser.add_argument("--tasks", default="", help="comma-separated lm-eval task names or task YAML paths")
    parser.add_argument("--teacher", help="HF dir of a teacher: also report top-1 agreement on --ppl-file")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-windows", type=int, default=None)
    parser.add_argument("--lm-eval-ppl", action="store_true", help="also score --ppl-file with lm-eval")
    parser.add_argument("--limit", type=float, default=None, help="lm-eval: examples per task")
    parser.add_argument("--json", action="store_true")
    opts = parser.parse_args(args)
    tasks = [t for t in opts.tasks.split(",") if t]
    if not opts.ppl_file and not tasks:
        parser.error("give --ppl-file and/or --tasks")
    result = {"model": opts.model}
    if opts.ppl_file:
        result["perplexity"] = evaluate_dir(opts.model, opts.ppl_file, opts.seq_len, opts.batch_size, opts.device,
                                            opts.max_windows, opts.teacher)
    if tasks or opts.lm_eval_ppl:
        try:
            result["lm_eval"] = run_lm_eval(opts.model, tasks, ppl_file=opts.ppl_file if opts.lm_eval_ppl else None,
                                            batch_size=opts.batch_size, device=opts.device, max_length=opts.seq_len,
                                            limit=int(opts.limit) if opts.limit and opts.limit >= 1 else opts.limit)
        except ImportError:
            print(LM_EVAL_MISSING, file=sys.stderr)
            sys.exit(3)
    if opts.json:
        print(json.dumps(result, indent=2))
    else:
        if "perplexity" in result:
            r = result["perplexity"]
            line = f"perplexity {r['ppl']:.4f} over {r['tokens']:,} predicted tokens ({r['windows']} windows of {r['seq_len']})"
            if "teacher_agreement" in r:
                line += f", teacher top-1 agreement {r['teacher_agreement']:.4f}"
            print(line)
        for task, metrics in result.get("lm_eval", {}).get("results", {}).items():
            print(task, "  ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    return result


def main(argv: list[str]) -> None:
    commands = {"plan": plan, "eval": evaluate,
                "export": lambda a: __import__("lightning_slimmoe.consolidate", fromlist=["main"]).main(a),
                "train": lambda a: __import__("lightning_slimmoe.cli", fromlist=["main"]).main(a)}
    if not argv or argv[0] not in commands:
        print(__doc__)
        sys.exit(0 if argv and argv[0] in ("-h", "--help") else 2)
    # sys.argv stays as it is (Lightning's script launcher re-runs it to start the other ranks).
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    commands[argv[0]](argv[1:])


if __name__ == "__main__":
    main(sys.argv[1:])
