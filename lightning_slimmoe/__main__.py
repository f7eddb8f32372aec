"""``python -m lightning_slimmoe {train,plan} ...``

* ``train --config X [overrides]`` — the same as ``python train.py``.
* ``plan --config X [--json] [overrides]`` — shapes and parameter counts of every stage, computed on the
  meta device from configs alone (no weights, seconds on a CPU).
"""

from __future__ import annotations

import json
import sys


def plan(args: list[str]) -> dict:
    from lightning_slimmoe.cli import SlimMoECLI, with_default_config
    from lightning_slimmoe.pipeline import Pipeline, plan_summary

    as_json = "--json" in args
    args = [a for a in args if a != "--json"]
    cli = SlimMoECLI(args=with_default_config(args))
    pipeline = Pipeline(cli.spec, cli.datamodule, cli.make_trainer)
    teacher_config, configs = pipeline.plan()
    result = plan_summary(teacher_config, configs, cli.spec.stages)
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        rows = [("stage", "expert_width", "heads q/kv", "head_dim", "total", "active")]
        for name, d in [("teacher", result["teacher"])] + [(s["name"], s) for s in result["stages"]]:
            rows.append((name, str(d["expert_width"]), f"{d['num_attention_heads']}/{d['num_key_value_heads']}",
                         str(d["head_dim"]), f"{d['total_params']:,}", f"{d['active_params']:,}"))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        print("\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows))
    return result


def main(argv: list[str]) -> None:
    commands = {"plan": plan, "train": lambda a: __import__("lightning_slimmoe.cli", fromlist=["main"]).main(a)}
    if not argv or argv[0] not in commands:
        print(__doc__)
        sys.exit(0 if argv and argv[0] in ("-h", "--help") else 2)
    commands[argv[0]](argv[1:])


if __name__ == "__main__":
    main(sys.argv[1:])
