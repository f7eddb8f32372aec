"""The command line: ``train``, ``plan``, ``eval`` and ``export``, every one parsed by jsonargparse (LightningCLI).

``train`` and ``plan`` read a recipe: LightningCLI's own ``trainer`` and ``data`` sections plus the top-level keys of
:class:`~lightning_slimmoe.config.RunConfig` (declared once there, typed, so a typo fails naming the key) and
``--stages.<i>.<key> value`` overrides. One ``Trainer`` is built per stage from the ``trainer`` section; the model of
each stage is made by the pipeline, so there is no ``model`` section. ``eval`` and ``export`` take their own options.
``--help`` of each subcommand lists every option.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import sys
import warnings
from pathlib import Path
from typing import Literal, Optional

import yaml
from jsonargparse import ArgumentParser, set_docstring_parse_options
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelSummary, ProgressBar, TQDMProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_only

from lightning_slimmoe.checkpoint_io import AtomicCheckpointIO
from lightning_slimmoe.config import RunConfig, ServingConfig
from lightning_slimmoe.data import TextDataModule
from lightning_slimmoe.errors import ConfigError, UserError
from lightning_slimmoe.quiet import quiet_lightning
from lightning_slimmoe.run_dir import RunDir
from lightning_slimmoe.sources import resolve_path, shipped_conf_dir
from lightning_slimmoe.storage import StorageError
from lightning_slimmoe.strategies import resolve_strategy, with_atomic_checkpoints

set_docstring_parse_options(attribute_docstrings=True)  # RunConfig's attribute docstrings are its --help

USAGE = """usage: slimmoe {train,plan,eval,export,check-serving} [--help] ...   (or: python -m lightning_slimmoe ...)

  train --config X [overrides]    the stage pipeline (the same as `python train.py`)
  plan --config X [--json] [--memory] [--serve vllm|sglang|llamacpp] [--serve-tp N] [--serve-dtype fp8] [--strict]
                                  shapes, parameter counts, FLOPs and GPU-hours of every stage (--memory: GiB per
                                  rank of every phase), from configs alone (no weights)
  eval --model DIR --ppl-file F   held-out perplexity (+ teacher agreement, lm-evaluation-harness tasks)
  export --checkpoint C --out D   a stage checkpoint (sharded DCP dir or single file) -> a stock HF dir
  check-serving --model DIR --engine vllm|llamacpp [--python PY] [--llama-cpp BUILD]
                                  run the real engine on an export; greedy tokens vs transformers, one verdict line

  --debug (or SLIMMOE_DEBUG=1) with any command: an error shows its traceback, not only its one `error:` line
"""


class SlimMoECLI(LightningCLI):
    def __init__(self, args=None, **kwargs):
        super().__init__(
            model_class=None, datamodule_class=TextDataModule, subclass_mode_data=True, run=False,
            save_config_callback=None, auto_configure_optimizers=False, load_from_checkpoint_support=False,
            seed_everything_default=0, trainer_defaults={"num_sanity_val_steps": 0}, args=args, **kwargs)

    def add_core_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(self.trainer_class, "trainer")
        parser.set_defaults({"trainer." + k: v for k, v in self.trainer_defaults.items()})
        parser.add_lightning_class_args(self._datamodule_class, "data", subclass_mode=self.subclass_mode_data)

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_class_arguments(RunConfig, nested_key=None)

    def parse_arguments(self, parser, args) -> None:
        """Adds ``--stages.<i>.<key>[.<sub>] VALUE`` overrides (jsonargparse has no index syntax for lists of
        dataclasses): parse once, apply them to the merged stage list, re-parse so every value is type-checked."""
        rest, overrides = split_stage_overrides(list(args or []))
        if overrides:
            first_pass = [a for a in rest if not a.startswith("--print_config")]
            stages = yaml.safe_load(parser.dump(parser.parse_args(first_pass), skip_check=True))["stages"]
            for index, path, value in overrides:
                if not 0 <= index < len(stages):
                    parser.error(f"--stages.{index}.{'.'.join(path)}: there are {len(stages)} stages (0..{len(stages) - 1})")
                node = stages[index]
                for key in path[:-1]:
                    node = node.setdefault(key, {}) if isinstance(node.get(key), dict) or node.get(key) is None else parser.error(
                        f"--stages.{index}.{'.'.join(path)}: {key!r} is not a section")
                node[path[-1]] = value
            rest = rest + ["--stages", json.dumps(stages)]
        super().parse_arguments(parser, rest)

    def instantiate_classes(self) -> None:
        try:
            self.config_init = self.parser.instantiate_classes(self.config)
        except ValueError as err:
            # jsonargparse wraps what a class raised while it was built from the recipe (the data module is one of
            # a union of subclasses) in a ValueError of its own, listing every subtype: raise the user error inside.
            cause = err
            while cause is not None and not isinstance(cause, UserError):
                cause = cause.__cause__
            if cause is None:
                raise
            raise cause from err
        trainer = self.config_init["trainer"]  # a strategy named by its class becomes that class, once, for every use
        trainer["strategy"] = resolve_strategy(trainer.get("strategy", "auto"))
        self.datamodule = self.config_init["data"]
        self.run_config = RunConfig.from_parsed(self.config_init)
        self.seed = int(self.config_init["seed_everything"])

    def run_hparams(self) -> dict:
        """The run's configuration as parsed (what ``--print_config`` prints): TensorBoard's hparams of the run."""
        return yaml.safe_load(self.parser.dump(self.config))

    def make_trainer(self, extra_callbacks=(), progress_bar: ProgressBar | None = None, **overrides) -> Trainer:
        """A fresh Trainer from the ``trainer`` section (user callbacks copied), with per-stage overrides and,
        unless the section turns them off or brings its own, the stage's ``progress_bar`` (else a plain tqdm bar:
        Lightning's default is a rich bar, a second style beside the stages' tqdm ones) and the module summary
        without its always-zero FLOPs (:class:`~callbacks.monitoring.StageModelSummary`)."""
        from callbacks.monitoring import StageModelSummary

        config = copy.deepcopy(dict(self.config_init["trainer"]))
        callbacks = config.pop("callbacks", None) or []
        plugins = config.pop("plugins", None) or []
        plugins = plugins if isinstance(plugins, list) else [plugins]
        config.update(overrides)
        config["strategy"] = with_atomic_checkpoints(config.get("strategy", "auto"))
        if config.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in callbacks):
            callbacks = [*callbacks, progress_bar or TQDMProgressBar()]
        if config.get("enable_model_summary") is not False and not any(isinstance(c, ModelSummary) for c in callbacks):
            callbacks = [*callbacks, StageModelSummary()]
        return Trainer(**config, callbacks=[*callbacks, *extra_callbacks], plugins=[*plugins, AtomicCheckpointIO()])


class PlanCLI(SlimMoECLI):
    """``plan``: the recipe's options plus what to print. Its ``--help`` shows the plan's own options first and the
    recipe's (every Trainer, data and run key, some 500 lines) after them, under their own heading."""

    USAGE = ("slimmoe plan --config RECIPE [--json] [--memory [--gpus N] [--gpu-memory-gib G]]\n"
             "                    [--serve-tp N [--serve-dtype {bf16,fp8}] [--strict]] [--debug] [recipe keys ...]")
    DESCRIPTION = ("Shapes and parameter counts of every stage of RECIPE, from configs alone (no weights). Any key of "
                   "the recipe can be set or overridden as for `train` (recipe options below). --debug (or "
                   "SLIMMOE_DEBUG=1): an error shows its traceback.")

    def init_parser(self, **kwargs):
        return super().init_parser(**{**kwargs, "usage": self.USAGE, "description": self.DESCRIPTION})

    def add_arguments_to_parser(self, parser) -> None:
        super().add_arguments_to_parser(parser)
        group = parser.add_argument_group("plan options")
        group.add_argument("--json", action="store_true", help="print the plan as JSON")
        group.add_argument("--memory", action="store_true",
                           help="add the memory plan: GiB per rank of every phase of every stage (docs/scaling.md)")
        group.add_argument("--gpus", type=Optional[int], default=None,
                           help="devices of the memory plan in all (default: trainer.devices x trainer.num_nodes); "
                                "a multiple of trainer.devices sets trainer.num_nodes")
        group.add_argument("--gpu-memory-gib", type=Optional[float], default=None,
                           help="memory of one device in GiB (default: memory_plan.device_memory_gib)")
        group.add_argument("--mfu", type=float, default=0.4,
                           help="model FLOPs utilisation the GPU-hours assume")
        group.add_argument("--peak-tflops", type=float, default=989.0,
                           help="dense bf16 TFLOP/s of one GPU the GPU-hours assume (H100 SXM: 989)")
        group.add_argument("--serve", type=Optional[Literal["vllm", "sglang", "llamacpp"]], default=None,
                           help="check every stage against this engine's support table (family x what was pruned x "
                                "dtype, lightning_slimmoe/engines.py); overrides serving.engine")
        group.add_argument("--serve-tp", type=Optional[int], default=None,
                           help="check every stage serves at this tensor-parallel size (vLLM / SGLang); "
                                "overrides serving.tp")
        group.add_argument("--serve-dtype", type=Optional[Literal["bf16", "fp16", "fp32", "fp8", "q8_0"]], default=None,
                           help="served weights: bf16, fp16, fp32, fp8 (block-quantized 128x128) or q8_0 (llama.cpp); "
                                "overrides serving.dtype")
        group.add_argument("--strict", action="store_true",
                           help="exit with status 2 when the final stage does not serve (also serving.strict)")
        # argparse prints its groups in order: the plan's first, then the recipe's under one heading
        parser._action_groups.remove(group)
        parser._action_groups.insert(0, group)
        parser._optionals.title = "recipe options (as for `train`: the recipe, then any key of it)"


_STAGE_OVERRIDE = re.compile(r"^--stages\.(\d+)\.([A-Za-z_][\w.]*)(?:=(.*))?$")


def _coerce(text: str):
    """YAML value, with '1e9' style numbers accepted as ints when integral."""
    value = yaml.safe_load(text)
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return value
        return int(number) if number.is_integer() else number
    return value


def split_stage_overrides(args: list[str]) -> tuple[list[str], list[tuple[int, list[str], object]]]:
    rest, overrides, i = [], [], 0
    while i < len(args):
        match = _STAGE_OVERRIDE.match(args[i])
        if match:
            value = match.group(3)
            if value is None:
                i += 1
                value = args[i] if i < len(args) else ""
            overrides.append((int(match.group(1)), match.group(2).split("."), _coerce(value)))
        else:
            rest.append(args[i])
        i += 1
    return rest, overrides


def with_default_config(args: list[str]) -> list[str]:
    """``python train.py`` alone runs the embedded demo; any run without --config starts from it. A ``--config``
    under ``conf/`` that is not there (an installed ``slimmoe`` run elsewhere) is the shipped recipe."""
    args = list(args)
    for i, arg in enumerate(args):
        if arg in ("--config", "-c") and i + 1 < len(args):
            args[i + 1] = resolve_path(args[i + 1])
        elif arg.startswith("--config="):
            args[i] = "--config=" + resolve_path(arg.split("=", 1)[1])
    if not any(a in ("--config", "-c") or a.startswith("--config=") for a in args):
        if any(a in ("-h", "--help") for a in args):
            return args
        return ["--config", str(shipped_conf_dir() / "demo.yaml"), *args]
    return args


def resume_command(args: list[str]) -> str:
    """The exact command that continues this run, printed when a signal stops it: how the user started this process
    (``sys.orig_argv``: the interpreter as typed, its options, the script or ``-m`` module, the arguments) with
    ``--resume true`` in place of any ``--resume`` given. Under torchrun the command is torchrun's own (its process
    is this rank's parent), as the ranks must be started again together. When ``args`` are not this process's
    command-line arguments (``main`` called from Python), ``python train.py`` with them."""
    kept, i = [], 0
    while i < len(args):
        if args[i] == "--resume":
            i += 2  # the flag and its value
            continue
        if not args[i].startswith("--resume="):
            kept.append(args[i])
        i += 1
    own = list(sys.argv[1:])
    launch = list(getattr(sys, "orig_argv", sys.argv))
    if os.environ.get("TORCHELASTIC_RUN_ID") is not None:  # started by torchrun: resume by starting torchrun again
        parent = _parent_command()
        launch = parent if parent and parent[len(parent) - len(own):] == own else launch
    if own not in (list(args), ["train", *args]) or launch[len(launch) - len(own):] != own:
        prefix = ["python", "train.py"]  # not this process's own arguments
    else:
        prefix = launch[:len(launch) - len(args)]
    return shlex.join([*prefix, *kept, "--resume", "true"])


def _parent_command() -> list[str] | None:
    """The parent process's command line (Linux ``/proc``), or None where it cannot be read."""
    try:
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as f:
            return [a.decode(errors="surrogateescape") for a in f.read().split(b"\0")[:-1]] or None
    except OSError:
        return None


def format_summary(summary: dict) -> str:
    rows = [("stage", "width", "heads", "total", "active", "tokens", "val ppl", "agree", "tok/s")]
    t = summary["teacher"]
    rows.append(("teacher", str(t["expert_width"]), f"{t['num_attention_heads']}/{t['num_key_value_heads']}",
                 f"{t['total_params']:,}", f"{t['active_params']:,}", "-", f"{t['val_ppl']:.3f}", "-", "-"))
    for s in summary["stages"]:
        agree = s.get("teacher_top1_agreement")
        rows.append((s["name"], str(s["expert_width"]), f"{s['num_attention_heads']}/{s['num_key_value_heads']}",
                     f"{s['total_params']:,}", f"{s['active_params']:,}", f"{s['tokens']:,}", f"{s['val_ppl']:.3f}",
                     "-" if agree is None else f"{agree:.3f}",
                     "-" if s.get("tokens_per_s") is None else f"{s['tokens_per_s']:,.0f}"))
    # where to look next: the run's files (run_dir.py names them) and its TensorBoard run
    run_dir = RunDir(Path(summary["final_dir"]).parent)
    return _table(rows, rule=True) + (f"\nfinal model: {summary['final_dir']}"
                                      f"\nsummary:     {run_dir.summary_file}"
                                      f"\nmonitor:     tensorboard --logdir {run_dir.tb_dir}")


def _table(rows: list[tuple[str, ...]], rule: bool = False) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join([lines[0], *(["-" * len(lines[0])] if rule else []), *lines[1:]])


# ---------------------------------------------------------------------------------------------------
# The subcommands
# ---------------------------------------------------------------------------------------------------
def main(args: list[str] | None = None) -> dict:
    """``train``: the stage pipeline (``python train.py`` calls this)."""
    from lightning_slimmoe.pipeline import Pipeline

    args = list(sys.argv[1:] if args is None else args)
    # sys.argv must stay as it is: Lightning's script launcher starts the other ranks by re-running it.
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    quiet_lightning()
    cli = SlimMoECLI(args=with_default_config(args))
    summary = Pipeline(cli.run_config, cli.datamodule, cli.make_trainer, seed=cli.seed,
                       resume_command=resume_command(args), hparams=cli.run_hparams()).run()
    if rank_zero_only.rank == 0:
        print(format_summary(summary))
    return summary


def plan(args: list[str]) -> dict:
    """``plan``: shapes and parameter counts of every stage, on the meta device from configs alone."""
    from lightning_slimmoe.flops import compute_json, format_compute, stage_compute
    from lightning_slimmoe.memory import format_memory, recipe_memory_plan
    from lightning_slimmoe.planning import plan_shapes, plan_summary
    from lightning_slimmoe.serving import format_serving, stage_check

    cli = PlanCLI(args=with_default_config(args))
    opts, config = cli.config_init, cli.run_config
    try:  # --serve-* given override the recipe's serving section
        serving = ServingConfig(engine=opts["serve"] or config.serving.engine,
                                tp=config.serving.tp if opts["serve_tp"] is None else opts["serve_tp"],
                                dtype=opts["serve_dtype"] or config.serving.dtype,
                                strict=opts["strict"] or config.serving.strict)
    except ValueError as err:
        cli.parser.error(str(err))
    shapes = plan_shapes(config, seq_len=cli.datamodule.hparams.seq_len)
    result = plan_summary(shapes, config.stages)
    checks = []
    if serving.tp is not None or serving.engine is not None:
        checks = [stage_check(serving, c, shapes.teacher_config) for c in shapes.configs]
        result["serving"] = {**({"engine": serving.engine} if serving.engine else {}), "tp": serving.tp,
                             "dtype": serving.dtype}
        for row, check in zip(result["stages"], checks):
            row["serving"] = check.to_json()
    setup = planned_setup(opts, config)
    recompute = config.parallel.activation_checkpointing and setup.strategy in ("fsdp1", "fsdp2")
    compute = stage_compute(config, shapes, cli.datamodule.hparams.seq_len, recompute)
    result["compute"] = compute_json(compute, opts["mfu"], opts["peak_tflops"], recompute)
    memory = None
    if opts["memory"]:
        memory = recipe_memory_plan(config, shapes, setup, cli.datamodule.hparams)
        result["memory"] = memory.to_json()
    if opts["json"]:
        print(json.dumps(result, indent=2))
        _refuse_unservable(serving, config.stages[-1].name, checks)
        return result
    rows = [("stage", "expert_width", "heads q/kv", "head_dim", "total", "active", *[c.label for c in checks[:1]])]
    serves = ["-"] + ["yes" if c.ok else "no" for c in checks]
    mla = "qk_head_dim" in result["teacher"]
    for k, (name, d) in enumerate([("teacher", result["teacher"])] + [(s["name"], s) for s in result["stages"]]):
        # MLA: a head's q/k width (nope + rope) and v width; its config's head_dim is the rope part only
        dim = f"{d['qk_head_dim']}/{d['v_head_dim']}" if "qk_head_dim" in d else str(d["head_dim"])
        rows.append((name, str(d["expert_width"]), f"{d['num_attention_heads']}/{d['num_key_value_heads']}",
                     dim, f"{d['total_params']:,}", f"{d['active_params']:,}",
                     *([serves[k]] if checks else [])))
    print(_table(rows))
    if mla:
        print("head_dim of MLA attention: q/k (nope + rope) / v per head")
    if checks:
        lines = [line for stage, check in zip(config.stages, checks) for line in format_serving(stage.name, check)]
        print(f"\nserving at {checks[-1].where}:"
              + (" every stage serves" if not lines else "\n" + "\n".join(lines)))
    print("\n" + format_compute(compute, opts["mfu"], opts["peak_tflops"], recompute))
    if memory is not None:
        print("\n" + format_memory(memory))
    _refuse_unservable(serving, config.stages[-1].name, checks)
    return result


def planned_setup(opts, config: RunConfig):
    """The hardware and strategy ``plan`` plans for: the recipe's ``trainer`` section, ``--gpus`` and
    ``--gpu-memory-gib`` applied."""
    import dataclasses

    from lightning_slimmoe.memory import setup_from_section

    setup = setup_from_section(opts["trainer"])
    if opts["gpus"] is not None:
        gpus = opts["gpus"]
        if gpus < 1:
            raise ConfigError(f"--gpus={gpus}: must be >= 1")
        nodes = gpus // setup.devices if gpus % setup.devices == 0 else None
        setup = dataclasses.replace(setup, **({"num_nodes": nodes} if nodes else {"devices": gpus, "num_nodes": 1}))
    if opts["gpu_memory_gib"] is not None:
        try:
            config.memory_plan = dataclasses.replace(config.memory_plan, device_memory_gib=opts["gpu_memory_gib"])
        except ValueError as err:
            raise ConfigError(f"--gpu-memory-gib: {err}") from err
    return setup


def _refuse_unservable(serving, final_name: str, checks: list) -> None:
    """``plan --strict`` (or ``serving.strict``): a final stage that does not serve exits 2, its problems on stderr."""
    from lightning_slimmoe.serving import final_stage_message

    if serving.strict and checks and not checks[-1].ok:
        print("error: " + final_stage_message(final_name, checks[-1]), file=sys.stderr)
        sys.exit(2)


def evaluate(args: list[str]) -> dict:
    """``eval``: perplexity of an HF dir over non-overlapping windows of a text file (and top-1 agreement with a
    teacher), plus lm-evaluation-harness tasks (optional extra: ``pip install -r bench/requirements.txt``)."""
    from lightning_slimmoe.evaluate import LM_EVAL_MISSING, default_seq_len, evaluate_dir, run_lm_eval

    parser = ArgumentParser(prog="slimmoe eval", description=evaluate.__doc__)
    parser.add_argument("--model", required=True, help="local HF model dir (weights + tokenizer)")
    parser.add_argument("--ppl-file", default=None, help="text file: perplexity over non-overlapping windows of it")
    parser.add_argument("--tasks", default="", help="comma-separated lm-eval task names or task YAML paths")
    parser.add_argument("--teacher", default=None, help="HF dir of a teacher: also report top-1 agreement")
    parser.add_argument("--seq-len", type=Optional[int], default=None,
                        help="tokens per window (default: the seq_len the model was trained at, from its slimmoe.json "
                             "or its run's run.json; else min(512, max_position_embeddings))")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per forward")
    parser.add_argument("--device", default="cpu", help="torch device")
    parser.add_argument("--max-windows", type=int, default=None, help="score at most this many windows")
    parser.add_argument("--lm-eval-ppl", action="store_true", help="also score --ppl-file with lm-eval")
    parser.add_argument("--limit", type=float, default=None, help="lm-eval: examples per task (or a fraction)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    opts = parser.parse_args(args)
    tasks = [t for t in opts.tasks.split(",") if t]
    if not opts.ppl_file and not tasks:
        parser.error("give --ppl-file and/or --tasks")
    if opts.seq_len is None:  # said on stderr, so that --json output stays JSON
        opts.seq_len, why = default_seq_len(opts.model)
        print(f"seq_len {opts.seq_len}: {why}", file=sys.stderr)
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
        return result
    if "perplexity" in result:
        r = result["perplexity"]
        line = f"perplexity {r['ppl']:.4f} over {r['tokens']:,} predicted tokens ({r['windows']} windows of {r['seq_len']})"
        if "teacher_agreement" in r:
            line += f", teacher top-1 agreement {r['teacher_agreement']:.4f}"
        print(line)
    for task, metrics in result.get("lm_eval", {}).get("results", {}).items():
        print(task, "  ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    return result


def export(args: list[str]):
    """``export``: a stage checkpoint as a stock HF dir, in one process: a sharded one (ModelParallelStrategy / DCP
    directory) one tensor at a time, a single-file one (one process, or FSDPStrategy) memory-mapped."""
    from lightning_slimmoe.consolidate import ConsolidateError, consolidate_checkpoint

    parser = ArgumentParser(prog="slimmoe export", description=export.__doc__)
    parser.add_argument("--checkpoint", required=True,
                        help="<run>/stage_<k>_<name>/checkpoints/<name>.ckpt (a sharded dir or a single file)")
    parser.add_argument("--out", required=True, help="HF model dir to write (replaced atomically)")
    parser.add_argument("--config", default=None, help="student config.json or HF dir (default: <stage_dir>/config.json)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer dir / hub id (default: the run's, from run.json)")
    parser.add_argument("--no-tokenizer", action="store_true", help="write weights and config only")
    parser.add_argument("--max-shard-gib", type=float, default=2.0, help="size of one output safetensors shard")
    parser.add_argument("--no-verify", action="store_true", help="skip reading the result back (a second pass)")
    opts = parser.parse_args(args)
    try:
        out = consolidate_checkpoint(opts.checkpoint, opts.out, config_path=opts.config,
                                     tokenizer_path=opts.tokenizer, with_tokenizer=not opts.no_tokenizer,
                                     max_shard_bytes=int(opts.max_shard_gib * 2**30), verify=not opts.no_verify)
    except ConsolidateError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {out}")
    return out


def check_serving(args: list[str]):
    """``check-serving``: the real engine on an export, compared with transformers (engine_check.py)."""
    from lightning_slimmoe.engine_check import command

    return command(args)


COMMANDS = {"train": main, "plan": plan, "eval": evaluate, "export": export, "check-serving": check_serving}


def dispatch(argv: list[str] | None = None):
    """``slimmoe <command> ...`` / ``python -m lightning_slimmoe <command> ...``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print(USAGE)
        sys.exit(0 if argv and argv[0] in ("-h", "--help") else 2)
    # sys.argv stays as it is (Lightning's script launcher re-runs it to start the other ranks).
    quiet_lightning()  # eval and export load and save whole models too: no per-load progress bars there either
    return COMMANDS[argv[0]](argv[1:])


DEBUG_FLAG, DEBUG_ENV = "--debug", "SLIMMOE_DEBUG"


def run_command(command, argv: list[str]) -> None:
    """Run ``command(argv)`` as a user's command: an anticipated error in what the user gave (:class:`UserError`: a
    recipe value, a corpus, a model dir; raised before any compute, naming the key to change) or a failed write
    (:class:`StorageError`: disk full, quota, read-only disk) ends the process with one ``error:`` line, not a
    traceback. Exit status 2 and 1. ``--debug`` (taken out of ``argv`` here, before any parser sees it) or
    ``SLIMMOE_DEBUG=1`` re-raises them with their traceback."""
    debug = DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    argv = [a for a in argv if a != DEBUG_FLAG]
    try:
        command(argv)
    except UserError as err:
        if debug:
            raise
        # Every rank checks the same recipe, corpus and model dirs and raises the same error: rank 0 says it.
        if rank_zero_only.rank == 0:
            print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except StorageError as err:
        if debug:
            raise
        # A write fails on the rank that writes (its own disk, its own shards): each says its own.
        print(f"error: {err.strerror or err}", file=sys.stderr)
        sys.exit(1)


def console() -> None:
    """The installed ``slimmoe`` command (and ``python -m lightning_slimmoe``)."""
    run_command(dispatch, sys.argv[1:])
