"""Test-only driver for tests/test_reliability.py: ``lightning_slimmoe.cli.main(argv)`` plus a recorder and one fault.

Run as ``python tests/fault_driver.py <cli args>`` from the repository root, with the environment variable
``RELIABILITY_DRIVER`` holding JSON ``{"log": <path of a JSONL file>, "fault": <dict or null>}``. The command
line is forwarded to the CLI unchanged (so ``--trainer.devices 2 --trainer.strategy ...`` makes a multi-rank
run, and every record carries its rank).

What it adds to the product, without changing it on disk:

* a recording callback: one fsync'ed JSONL line per event (``train_start``, ``step`` with the loss and the
  first token ids of the batch, ``scored``, ``sliced``, ``reapplied``, ``exception``, ``exit``, ``done``, ...);
* the fault chosen by ``fault["kind"]``, which (except ``nan_loss`` and ``await_signal``) SIGKILLs the whole
  process group at that point: ``step`` (after a training step, before its checkpoint),
  ``checkpoint_half_written`` (half-way through writing a checkpoint file), ``export_before_rename`` (inside the
  HF export, before the rename), ``scoring`` / ``before_slicing`` / ``train_start`` (at a stage boundary),
  ``sharded_checkpoint_written`` (every shard written, the sharded checkpoint not yet complete);
  ``nan_loss`` turns one step's loss into NaN (and records state hashes before and after), ``await_signal``
  waits at a step until the preemption callback has seen SIGINT or SIGTERM (with ``hold_s``, it then keeps the
  step waiting that long, so that a test can send a second signal while the first is pending).

Importing this module changes nothing; :func:`main` installs the hooks and runs the CLI.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import io
import json
import os
import signal
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import lightning.pytorch.strategies.model_parallel as model_parallel  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch import Callback  # noqa: E402

import callbacks.expert_slimming as expert_slimming  # noqa: E402
import lightning_slimmoe.cli as cli  # noqa: E402
import lightning_slimmoe.storage as storage  # noqa: E402
from callbacks.expert_slimming import ExpertSlimming  # noqa: E402
from callbacks.preemption import CheckpointOnSignal  # noqa: E402
from lightning_slimmoe.module import StageModule  # noqa: E402
from lightning_slimmoe.slimming import widths_of  # noqa: E402

OPTS: dict = {}  # from RELIABILITY_DRIVER: "log" (the JSONL path) and "fault"
FAULT: dict = {}
CURRENT: dict = {"stage": None}


def log(**record) -> None:
    record["pid"] = os.getpid()
    with open(OPTS["log"], "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def die(where: str) -> None:
    # the whole process group: every rank of the job dies at once, as when a node is lost
    log(event="kill", where=where)
    os.killpg(os.getpgid(0), signal.SIGKILL)


def at(kind: str, stage=None, rank=None) -> bool:
    return (FAULT.get("kind") == kind and (stage is None or FAULT.get("stage") == stage)
            and (rank is None or FAULT.get("rank") in (None, rank)))


def stage_of(trainer):
    return next((c.stage.name for c in trainer.callbacks if isinstance(c, ExpertSlimming)), None)


def local_state_hash(pl_module, trainer) -> str:
    """sha256 of this rank's student weights (local shards) and optimizer state, in a fixed order."""
    h = hashlib.sha256()

    def add(name, t):
        t = t.to_local() if hasattr(t, "to_local") else t
        h.update(name.encode())
        h.update(t.detach().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    for name, t in pl_module.student.state_dict().items():
        add(name, t)
    for opt in trainer.optimizers:
        for g, group in enumerate(opt.param_groups):
            for i, p in enumerate(group["params"]):
                for k, v in sorted(opt.state.get(p, {}).items()):
                    if torch.is_tensor(v):
                        add(f"opt{g}.{i}.{k}", v)
    return h.hexdigest()


class Recorder(Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        name = stage_of(trainer)
        if at("nan_loss", name) and trainer.global_step == FAULT["step"]:
            log(event="state", when="before", stage=name, step=trainer.global_step, rank=trainer.global_rank,
                hash=local_state_hash(pl_module, trainer))
        if at("nan_loss", name) and trainer.global_step == FAULT["step"] + 1:  # reached only if the step was skipped
            log(event="state", when="after_skip", stage=name, step=trainer.global_step, rank=trainer.global_rank,
                hash=local_state_hash(pl_module, trainer))

    def on_exception(self, trainer, pl_module, exception):
        log(event="exception", stage=stage_of(trainer), step=trainer.global_step, rank=trainer.global_rank,
            type=type(exception).__name__, message=str(exception))
        if at("nan_loss", stage_of(trainer)):
            log(event="state", when="after", stage=stage_of(trainer), step=trainer.global_step,
                rank=trainer.global_rank, hash=local_state_hash(pl_module, trainer))

    def on_train_start(self, trainer, pl_module):
        name = stage_of(trainer)
        log(event="train_start", stage=name, step=trainer.global_step, rank=trainer.global_rank,
            widths=widths_of(pl_module.student.config))
        if at("train_start", name):
            die(f"{name}: after slicing, before the first KD step")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        name = stage_of(trainer)
        log(event="step", stage=name, step=trainer.global_step, rank=trainer.global_rank,
            loss=outputs["loss"].item(), first_ids=batch["input_ids"][:, :4].tolist())
        if at("step", name, trainer.global_rank) and trainer.global_step == FAULT["step"]:
            die(f"{name}: step {trainer.global_step} on rank {trainer.global_rank}")
        if at("await_signal", name, trainer.global_rank) and trainer.global_step == FAULT["step"]:
            log(event="ready", stage=name, step=trainer.global_step, rank=trainer.global_rank)
            preemption = next(c for c in trainer.callbacks if isinstance(c, CheckpointOnSignal))
            deadline = time.time() + 60
            while not preemption.received and time.time() < deadline:
                time.sleep(0.02)
            log(event="signal_seen", rank=trainer.global_rank, received=preemption.received)
            time.sleep(FAULT.get("hold_s", 0))


class HalfWritingTorch:
    """Stands in for ``torch`` in ``lightning_slimmoe.storage`` (whose ``atomic_torch_save`` writes every checkpoint
    file): the chosen checkpoint is cut off half-way (a kill), or the disk fills up while it is written."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def save(obj, f, *args, **kwargs):
        target = getattr(f, "name", str(f))
        if (at("checkpoint_half_written") and str(target).endswith(FAULT["path_suffix"])
                and isinstance(obj, dict) and obj.get("global_step") == FAULT["step"]):
            buffer = io.BytesIO()
            torch.save(obj, buffer)
            data = buffer.getvalue()
            f.write(data[: len(data) // 2])
            f.flush()
            os.fsync(f.fileno())
            die(f"writing {target}: {len(data) // 2} of {len(data)} bytes")
        if (at("disk_full") and str(target).endswith(FAULT["path_suffix"])
                and isinstance(obj, dict) and obj.get("global_step") == FAULT["step"]):
            f.write(b"\0" * 4096)  # some bytes reach the disk, then it is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return torch.save(obj, f, *args, **kwargs)


def install() -> None:
    """Wrap the product's functions in place (this process only): the recorder and the fault's hooks."""
    _make_trainer = cli.SlimMoECLI.make_trainer

    def make_trainer(self, extra_callbacks=(), **overrides):
        # first, so that its batch-end record (and a test's wait for a signal) comes before the product's callbacks
        return _make_trainer(self, extra_callbacks=[Recorder(), *extra_callbacks], **overrides)

    cli.SlimMoECLI.make_trainer = make_trainer

    storage.torch = HalfWritingTorch()

    _replace_dir = storage.replace_dir  # every directory the product writes is swapped in through it

    def replace_dir(tmp, final):
        if at("export_before_rename") and str(tmp).endswith(FAULT["path_suffix"]):
            die(f"export_hf: {tmp} written, not yet renamed to {final}")
        return _replace_dir(tmp, final)

    storage.replace_dir = replace_dir

    _setup = ExpertSlimming.setup

    def setup(self, trainer, pl_module, stage):
        CURRENT["stage"] = self.stage.name
        return _setup(self, trainer, pl_module, stage)

    ExpertSlimming.setup = setup

    _compute_scores = expert_slimming.compute_scores

    def compute_scores(*args, **kwargs):
        scores = _compute_scores(*args, **kwargs)
        log(event="scored", stage=CURRENT["stage"])
        if at("scoring", CURRENT["stage"]):
            die(f"{CURRENT['stage']}: during scoring (scores computed, not saved)")
        return scores

    expert_slimming.compute_scores = compute_scores

    _slim_model = expert_slimming.slim_model_

    def slim_model_(model, keep):
        if CURRENT.get("reapplying"):
            return _slim_model(model, keep)
        if at("before_slicing", CURRENT["stage"]):
            die(f"{CURRENT['stage']}: between scoring and slicing")
        log(event="sliced", stage=CURRENT["stage"], kept_index_hash=keep.digest())
        return _slim_model(model, keep)

    expert_slimming.slim_model_ = slim_model_

    _reapply = ExpertSlimming._reapply

    def reapply(self, *args, **kwargs):
        log(event="reapplied", stage=self.stage.name)
        CURRENT["reapplying"] = True
        try:
            return _reapply(self, *args, **kwargs)
        finally:
            CURRENT["reapplying"] = False

    ExpertSlimming._reapply = reapply

    _dcp_save = model_parallel._distributed_checkpoint_save

    def dcp_save(state, path):
        # every shard and DCP's .metadata are written; Lightning's meta.pt and the rename not yet
        _dcp_save(state, path)
        if at("sharded_checkpoint_written") and str(path).endswith(FAULT["path_suffix"]):
            CURRENT["saves"] = CURRENT.get("saves", 0) + 1
            if CURRENT["saves"] < FAULT["occurrence"]:
                return
            import torch.distributed as dist
            dist.barrier()  # both ranks' shards are on disk
            if dist.get_rank() == 0:
                die(f"sharded save of {path}: shards and .metadata written, not yet renamed")
            time.sleep(60)

    model_parallel._distributed_checkpoint_save = dcp_save

    _forward_loss = StageModule.forward_loss

    def forward_loss(self, batch):
        out = _forward_loss(self, batch)
        if self.training and at("nan_loss", CURRENT["stage"], self.global_rank) and self.global_step == FAULT["step"]:
            nan = torch.tensor(float("nan"))
            out = dataclasses.replace(out, loss=out.loss * nan, kd_loss=out.kd_loss * nan)
        return out

    StageModule.forward_loss = forward_loss


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    OPTS.update(json.loads(os.environ["RELIABILITY_DRIVER"]))
    FAULT.update(OPTS.get("fault") or {})
    install()
    try:
        cli.run_command(cli.main, argv)  # what `python train.py` runs
    except BaseException as exc:  # SystemExit included: record how each rank ended
        log(event="exit", rank=int(os.environ.get("LOCAL_RANK", 0)), type=type(exc).__name__,
            code=getattr(exc, "code", None))
        raise
    log(event="done", rank=int(os.environ.get("LOCAL_RANK", 0)))


if __name__ == "__main__":
    main()
