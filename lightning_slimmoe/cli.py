"""LightningCLI for the stage pipeline: the one config system (YAML + ``--key.sub value`` overrides).

Besides LightningCLI's own ``trainer`` and ``data`` sections it takes ``output_dir``, ``teacher``,
``stages`` (typed :class:`StageConfig` entries, so a typo fails naming the key) and ``resume``. One
``Trainer`` is built per stage from the ``trainer`` section; the model of each stage is made by the
pipeline, so there is no ``model`` section.
"""

from __future__ import annotations

import copy
import json
import os
import re
import sys
import warnings
from typing import Literal, Optional

import yaml

from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_only

from lightning_slimmoe.checkpoint_io import AtomicCheckpointIO
from lightning_slimmoe.config import StageConfig
from lightning_slimmoe.data import TextDataModule
from lightning_slimmoe.distributed import ParallelConfig
from lightning_slimmoe.pipeline import Pipeline, RunSpec
from lightning_slimmoe.strategies import (LIGHTNING_ACTIVATION_CHECKPOINTING, AtomicModelParallelStrategy,
                                          SlimFSDPStrategy)

DEMO_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf", "demo.yaml")


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
        parser.add_argument("--output_dir", type=str, default="runs/slimmoe", help="everything a run writes goes here")
        parser.add_argument("--teacher", type=Optional[str], default=None,
                            help="hub id or local HF dir of the MoE teacher; null = trained by a pretrain stage")
        parser.add_argument("--teacher_config", type=Optional[str], default=None,
                            help="config-only JSON of the teacher, used by `plan` (no weights needed)")
        parser.add_argument("--student_init", type=Optional[str], default=None,
                            help="start the first slimming stage from this HF dir (e.g. another tool's output)")
        parser.add_argument("--stages", type=list[StageConfig], default=[], help="stages, run in order")
        parser.add_argument("--resume", type=bool, default=False, help="continue the run in output_dir")
        parser.add_argument("--trust_remote_code", type=bool, default=False,
                            help="allow models that ship their own modelling code (off: it runs that code)")
        parser.add_argument("--teacher_8bit", type=bool, default=False,
                            help="load the frozen teacher's nn.Linear layers as bitsandbytes 8-bit (LLM.int8) to "
                                 "save memory; fused MoE experts stay in the run's dtype (see docs/scaling.md)")
        parser.add_argument("--parallel", type=ParallelConfig, default=ParallelConfig(),
                            help="FSDP2 settings, used with trainer.strategy=ModelParallelStrategy")
        parser.add_argument("--teacher_cache", type=Optional[str], default=None,
                            help="directory of the teacher's top-k for the training blocks, computed once and read "
                                 "by every KD stage instead of the teacher forward; null = live teacher")
        parser.add_argument("--teacher_cache_dtype", type=Literal["float32", "bfloat16"], default="float32",
                            help="dtype of the cached teacher values (bfloat16 halves them; float32 = live losses)")

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
        self.config_init = self.parser.instantiate_classes(self.config)
        self.datamodule = self.config_init["data"]
        self.spec = RunSpec(
            output_dir=self.config_init["output_dir"], stages=list(self.config_init["stages"]),
            teacher=self.config_init["teacher"], teacher_config=self.config_init["teacher_config"],
            student_init=self.config_init["student_init"], resume=self.config_init["resume"],
            trust_remote_code=self.config_init["trust_remote_code"], teacher_8bit=self.config_init["teacher_8bit"],
            seed=int(self.config_init["seed_everything"]),
            parallel=self.config_init["parallel"], teacher_cache=self.config_init["teacher_cache"],
            teacher_cache_dtype=self.config_init["teacher_cache_dtype"])

    def make_trainer(self, extra_callbacks=(), **overrides) -> Trainer:
        """A fresh Trainer from the ``trainer`` section (user callbacks copied), with per-stage overrides."""
        config = copy.deepcopy(dict(self.config_init["trainer"]))
        callbacks = config.pop("callbacks", None) or []
        plugins = config.pop("plugins", None) or []
        plugins = plugins if isinstance(plugins, list) else [plugins]
        config.update(overrides)
        config["strategy"] = with_atomic_checkpoints(config.get("strategy", "auto"))
        return Trainer(**config, callbacks=[*callbacks, *extra_callbacks], plugins=[*plugins, AtomicCheckpointIO()])


def with_atomic_checkpoints(strategy):
    """Lightning's stock ``ModelParallelStrategy`` rewrites a sharded checkpoint in place (a kill mid-save
    leaves a directory that looks complete); the same strategy with atomic, finite-checked saves replaces it,
    with the same arguments. ``FSDPStrategy`` (FSDP1, also as "fsdp" / "fsdp_cpu_offload") becomes
    :class:`SlimFSDPStrategy` (per-layer units for teacher and student, student-only checkpoints).
    Every other strategy is returned as given."""
    if strategy in ("fsdp", "fsdp_cpu_offload"):
        return SlimFSDPStrategy(cpu_offload=strategy == "fsdp_cpu_offload")
    if type(strategy) is FSDPStrategy:
        if strategy._activation_checkpointing_kwargs:  # not passed on below: refused here, as the class does
            raise ValueError(LIGHTNING_ACTIVATION_CHECKPOINTING)
        return SlimFSDPStrategy(
            process_group_backend=strategy._process_group_backend, timeout=strategy._timeout,
            cpu_offload=strategy.cpu_offload, mixed_precision=strategy.mixed_precision,
            sharding_strategy=strategy.sharding_strategy, state_dict_type=strategy._state_dict_type,
            **strategy.kwargs)
    if type(strategy) is not ModelParallelStrategy:
        return strategy
    return AtomicModelParallelStrategy(
        data_parallel_size=strategy._data_parallel_size, tensor_parallel_size=strategy._tensor_parallel_size,
        save_distributed_checkpoint=strategy._save_distributed_checkpoint,
        process_group_backend=strategy._process_group_backend, timeout=strategy._timeout)


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
    """``python train.py`` alone runs the embedded demo; any run without --config starts from it."""
    if not any(a in ("--config", "-c") or a.startswith("--config=") for a in args):
        return ["--config", DEMO_CONFIG, *args]
    return args


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
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:], f"final model: {summary['final_dir']}"])


def main(args: list[str] | None = None) -> dict:
    args = list(sys.argv[1:] if args is None else args)
    # sys.argv must stay as it is: Lightning's script launcher starts the other ranks by re-running it.
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    cli = SlimMoECLI(args=with_default_config(args))
    summary = Pipeline(cli.spec, cli.datamodule, cli.make_trainer).run()
    if rank_zero_only.rank == 0:
        print(format_summary(summary))
    return summary
