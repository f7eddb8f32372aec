"""Kills, faults and bad resumes lose nothing and resume exactly (CPU, real processes).

The kill scenarios run ``train.py``'s own entry point (``lightning_slimmoe.cli.main``) in a child process
through a small *test-only* driver, ``tests/fault_driver.py`` (nothing test-specific lives in the
product). The driver adds a recording callback (per-step loss and the first token ids of every
batch, one fsync'ed JSONL line each) and kills its own process with SIGKILL at the chosen point: at a
training step, half-way through writing a checkpoint file, inside ``export_hf`` before the rename, or
at a stage boundary (during scoring, between scoring and slicing, between slicing and the first KD
step). The test then resumes with ``--resume true`` and compares against an uninterrupted run.

The driver forwards its argv to the CLI unchanged, so a multi-rank variant can add
``--trainer.devices 2 --trainer.strategy ...`` (every record carries its rank).

The child-process scenarios are marked ``slow`` (real processes, ~10 s each incl. imports); they run in the
default ``python -m pytest -q``. The rest run in-process in seconds.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import pickle
import random
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback

from helpers import FSDP1, MODEL_PARALLEL, read_summary, tiny_model, tiny_recipe

ROOT = Path(__file__).resolve().parents[1]
WATCHDOG_S = 120  # no child may take longer than this (a hang fails the test instead of the CI job)

# Stage 2 of the kill recipe: 6 steps, a checkpoint every 2 steps.
STAGES = [
    {"name": "slim1", "expert_width": 16, "calibration_tokens": 256, "max_tokens": 4 * 4 * 32,
     "checkpoint_every_n_steps": 2, "val_every_n_steps": 100, "optimizer": {"lr": 1e-3}},
    {"name": "slim2", "expert_width": 8, "attention_groups": 1, "calibration_tokens": 256,
     "max_tokens": 6 * 4 * 32, "checkpoint_every_n_steps": 2, "val_every_n_steps": 100, "optimizer": {"lr": 1e-3}},
]
STEPS = {"slim1": 4, "slim2": 6}

DRIVER = Path(__file__).resolve().parent / "fault_driver.py"  # the child-process driver (see its docstring)


# ---------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------
class Run:
    """One child process of the driver; ``records`` are its JSONL lines."""

    def __init__(self, proc: subprocess.Popen, log_path: Path, out: str):
        self.proc, self.log_path, self.out = proc, log_path, out

    @property
    def records(self) -> list[dict]:
        if not self.log_path.exists():
            return []
        return [json.loads(line) for line in self.log_path.read_text().splitlines() if line.strip()]

    def events(self, event: str, **match) -> list[dict]:
        return [r for r in self.records if r["event"] == event and all(r.get(k) == v for k, v in match.items())]

    def wait(self, timeout: float = WATCHDOG_S) -> int:
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)  # every rank (the driver leads its own process group)
            self.proc.wait()
            pytest.fail(f"watchdog: the run did not finish within {timeout}s\n{self.output()}")
        return self.proc.returncode

    def output(self) -> str:
        return Path(self.out).read_text(errors="replace")[-6000:] if Path(self.out).exists() else ""


def start(workdir: Path, recipe: str, *args: str, fault: dict | None = None, tag: str = "run",
          torchrun: int = 0, command: list[str] | None = None) -> Run:
    """The driver in a child process (its own session: a fault kills the whole group); with ``torchrun`` ranks,
    under torchrun, which starts the ranks side by side (Lightning's launcher starts rank 1 after rank 0 set up).
    ``command`` replaces the whole command line (e.g. the resume command a run printed)."""
    n = len(list(workdir.glob(f"{tag}*.jsonl")))
    log_path = workdir / f"{tag}{n}.jsonl"
    out = workdir / f"{tag}{n}.out"
    env = {**os.environ, "RELIABILITY_DRIVER": json.dumps({"log": str(log_path), "fault": fault}),
           "PYTHONUNBUFFERED": "1"}
    with open(out, "w") as sink:
        launcher = (["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(torchrun)]
                    if torchrun else [])
        proc = subprocess.Popen(command or [sys.executable, *launcher, str(DRIVER), "--config", recipe, *args], cwd=ROOT,
                                env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    return Run(proc, log_path, str(out))


def run(workdir: Path, recipe: str, *args: str, fault: dict | None = None, expect_rc: int | None = 0,
        torchrun: int = 0) -> Run:
    r = start(workdir, recipe, *args, fault=fault, torchrun=torchrun)
    rc = r.wait()
    if expect_rc is not None:
        assert rc == expect_rc, f"exit status {rc}, expected {expect_rc}\n{r.output()}"
    return r


def killed(workdir: Path, recipe: str, fault: dict, *args: str) -> Run:
    r = run(workdir, recipe, *args, fault=fault, expect_rc=-signal.SIGKILL)
    assert r.events("kill"), r.output()
    return r


def steps(*runs: Run) -> dict[tuple[str, int], dict]:
    """(stage, step) -> record, later runs overriding earlier ones."""
    table = {}
    for r in runs:
        for rec in r.events("step"):
            table[(rec["stage"], rec["step"])] = rec
    return table


def committed(killed_run, resumed: Run) -> list[dict]:
    """The steps that made the final weights: the killed run's steps up to the checkpoint each resumed stage
    restarted from, then the resumed run's steps (``killed_run``: a Run or a list of step records)."""
    earlier = killed_run.events("step") if isinstance(killed_run, Run) else killed_run
    starts = {rec["stage"]: rec["step"] for rec in resumed.events("train_start")}
    out = [rec for rec in earlier if rec["stage"] not in starts or rec["step"] <= starts[rec["stage"]]]
    out += resumed.events("step")
    return sorted(out, key=lambda rec: (list(STEPS).index(rec["stage"]), rec["step"]))


def weights_hash(hf_dir: Path) -> str:
    from safetensors.torch import load_file

    tensors = {}
    for f in sorted(hf_dir.glob("*.safetensors")):
        tensors.update(load_file(f))
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def checkpoint_files(run_dir: Path) -> dict[str, str]:
    """name -> sha256 of every file under every stage's checkpoints/ dir."""
    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run_dir.glob("stage_*/checkpoints/*")) if p.is_file()}


def assert_no_loadable_half_file(run_dir: Path) -> None:
    """Every file under a final ``*.ckpt`` name loads with weights_only=True and holds finite tensors; any
    ``hf/`` dir is complete (config + weights + tokenizer)."""
    for path in run_dir.glob("stage_*/checkpoints/*.ckpt"):
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values()), path
    for hf in run_dir.glob("stage_*/hf"):
        assert (hf / "config.json").is_file() and list(hf.glob("*.safetensors")) and (hf / "tokenizer.json").is_file()
        from transformers import AutoModelForCausalLM

        AutoModelForCausalLM.from_pretrained(hf)


def strip(rec: dict) -> tuple:
    return rec["stage"], rec["step"], rec["loss"], rec["first_ids"]


def recipe_in(path: Path, teacher: str, corpus: str, stages=STAGES) -> str:
    path.mkdir(parents=True, exist_ok=True)
    return tiny_recipe(path, teacher, corpus, stages=copy.deepcopy(stages))


# ---------------------------------------------------------------------------------------------------
# The uninterrupted reference run (one per module) and the expected sample stream
# ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def baseline(tmp_path_factory, phimoe_teacher, corpus_file):
    work = tmp_path_factory.mktemp("baseline")
    recipe = recipe_in(work, phimoe_teacher, corpus_file)
    r = run(work, recipe)
    records = r.events("step")
    assert [(x["stage"], x["step"]) for x in records] == [(s, k) for s, n in STEPS.items() for k in range(1, n + 1)]
    run_dir = work / "run"
    return {"run": r, "records": records, "dir": run_dir, "hash": weights_hash(run_dir / "final"),
            "summary": read_summary(run_dir),
            "meta": {s: json.loads((run_dir / f"stage_{k}_{s}" / "meta.json").read_text())
                     for k, s in enumerate(STEPS)}}


@pytest.fixture(scope="module")
def expected_stream(phimoe_teacher, corpus_file):
    """First 4 token ids of every sample of every step, straight from the data stream (no trainer)."""
    from transformers import AutoTokenizer

    from lightning_slimmoe.data import TextDataModule

    dm = TextDataModule(files=[corpus_file], seq_len=32, batch_size=4, val_fraction=0.05)
    dm.set_tokenizer(AutoTokenizer.from_pretrained(phimoe_teacher))
    dm.setup("fit")
    stream = iter(dm.train_stream(0))
    total = sum(STEPS.values())
    return [[next(stream)["input_ids"][:4].tolist() for _ in range(4)] for _ in range(total)]


def assert_matches_baseline(baseline, expected_stream, run_dir: Path, sequence: list[dict]) -> None:
    assert [strip(r) for r in sequence] == [strip(r) for r in baseline["records"]]
    # no sample repeated or skipped: the batches that made the weights are exactly the stream, in order
    assert [r["first_ids"] for r in sequence] == expected_stream
    assert weights_hash(run_dir / "final") == baseline["hash"]
    for k, s in enumerate(STEPS):
        meta = json.loads((run_dir / f"stage_{k}_{s}" / "meta.json").read_text())
        assert meta["status"] == "complete"
        assert meta["kept_index_hash"] == baseline["meta"][s]["kept_index_hash"]
        assert meta["widths"] == baseline["meta"][s]["widths"]
    summary = read_summary(run_dir)
    assert [s["val_loss"] for s in summary["stages"]] == [s["val_loss"] for s in baseline["summary"]["stages"]]
    assert not list(run_dir.rglob("*.tmp")), "a finished resume leaves no temp files behind"


@pytest.mark.slow
def test_baseline_stream_is_the_data_stream(baseline, expected_stream):
    assert [r["first_ids"] for r in baseline["records"]] == expected_stream


# ---------------------------------------------------------------------------------------------------
# kill -9 at a random step of stage 2
# ---------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_sigkill_at_random_step_resumes_exactly(tmp_path, baseline, expected_stream, phimoe_teacher, corpus_file):
    kill_step = random.Random(7).randint(1, STEPS["slim2"] - 1)
    recipe = recipe_in(tmp_path, phimoe_teacher, corpus_file)
    first = killed(tmp_path, recipe, {"kind": "step", "stage": "slim2", "step": kill_step})
    assert max(r["step"] for r in first.events("step", stage="slim2")) == kill_step
    resumed = run(tmp_path, recipe, "--resume", "true")
    # the killed step was not checkpointed (the kill came before ModelCheckpoint ran): the resume starts from
    # the last checkpoint before it, and never re-runs the finished stage 1
    restart = (kill_step - 1) // 2 * 2
    assert [(r["stage"], r["step"]) for r in resumed.events("train_start")] == [("slim2", restart)]
    assert not resumed.events("scored") and not resumed.events("sliced") and resumed.events("reapplied")
    assert_matches_baseline(baseline, expected_stream, tmp_path / "run", committed(first, resumed))


@pytest.mark.slow
def test_resumed_runs_show_every_step_once_in_tensorboard(tmp_path, baseline, phimoe_teacher, corpus_file):
    """Killed after slicing stage 2 (before its first step; its first validation logged), resumed and killed at its
    step 5 (after the step-4 checkpoint; steps 4-5 logged), resumed again: TensorBoard shows the uninterrupted run's
    curves, every step once with the same values, its score histograms and its hparams once. Each resume continues
    the axis where its stage restarts, and TensorBoard hides what the killed run wrote from there on."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    from helpers import tensorboard_view

    recipe = recipe_in(tmp_path, phimoe_teacher, corpus_file)
    killed(tmp_path, recipe, {"kind": "train_start", "stage": "slim2"})
    second = killed(tmp_path, recipe, {"kind": "step", "stage": "slim2", "step": 5}, "--resume", "true")
    assert second.events("train_start", stage="slim2")[0]["step"] == 0  # no checkpoint yet: from the stage's start
    third = run(tmp_path, recipe, "--resume", "true")
    assert third.events("train_start", stage="slim2")[0]["step"] == 4
    got, want = tensorboard_view(tmp_path / "run" / "tb"), tensorboard_view(baseline["dir"] / "tb")
    assert got.Tags()["scalars"] and sorted(got.Tags()["scalars"]) == sorted(want.Tags()["scalars"])
    for tag in want.Tags()["scalars"]:
        points = [(e.step, e.value) for e in got.Scalars(tag)]
        expected = [(e.step, e.value) for e in want.Scalars(tag)]
        if tag != "epoch":  # Lightning adds `epoch` to every logging call, training's and validation's at one step
            assert len({step for step, _ in points}) == len(points), (tag, points)  # no step twice
        if tag.startswith("perf/"):  # timings
            assert [step for step, _ in points] == [step for step, _ in expected], tag
        else:
            assert points == expected, tag
    assert sorted(got.Tags()["histograms"]) == sorted(want.Tags()["histograms"])
    assert "scores/slim2/experts" in want.Tags()["histograms"]
    for tag in want.Tags()["histograms"]:
        assert [(e.step, e.histogram_value) for e in got.Histograms(tag)] == \
            [(e.step, e.histogram_value) for e in want.Histograms(tag)], tag
    hparams = [e for f in sorted((tmp_path / "run" / "tb").glob("events.out.tfevents*"))
               for e in EventFileLoader(str(f)).Load()
               if e.HasField("summary") and any(v.tag == "_hparams_/session_start_info" for v in e.summary.value)]
    assert len(hparams) == 1


# ---------------------------------------------------------------------------------------------------
# kill while a checkpoint is half written / while an HF export is not yet renamed
# ---------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_kill_mid_checkpoint_write_keeps_previous_checkpoint(tmp_path, baseline, expected_stream, phimoe_teacher,
                                                             corpus_file):
    """Killed half-way through writing a new step checkpoint, then (after resuming) half-way through
    overwriting last.ckpt: each time the previous complete checkpoint is still there and is what resumes."""
    recipe = recipe_in(tmp_path, phimoe_teacher, corpus_file)
    run_dir = tmp_path / "run"
    ckpts = run_dir / "stage_1_slim2" / "checkpoints"
    history = []
    for name, step, previous in (("step0000004.ckpt", 4, 2), ("last.ckpt", 6, 4)):
        fault = {"kind": "checkpoint_half_written", "path_suffix": f"stage_1_slim2/checkpoints/{name}.tmp",
                 "step": step}
        r = killed(tmp_path, recipe, fault, *(["--resume", "true"] if history else []))
        history.append(r)
        half = ckpts / f"{name}.tmp"
        assert half.is_file() and half.stat().st_size > 0
        with pytest.raises(Exception):  # the half file is no checkpoint, and it is not under a final name
            torch.load(half, map_location="cpu", weights_only=True)
        assert_no_loadable_half_file(run_dir)
        last = torch.load(ckpts / "last.ckpt", map_location="cpu", weights_only=True)
        assert last["global_step"] == previous  # the previous complete checkpoint still exists
    final = run(tmp_path, recipe, "--resume", "true")
    assert [(r["stage"], r["step"]) for r in history[1].events("train_start")] == [("slim2", 2)]
    assert [(r["stage"], r["step"]) for r in final.events("train_start")] == [("slim2", 4)]
    sequence = committed(committed(history[0], history[1]), final)
    assert_matches_baseline(baseline, expected_stream, run_dir, sequence)
    assert_no_loadable_half_file(run_dir)


@pytest.mark.slow
def test_disk_full_mid_checkpoint_ends_with_one_line_and_resumes_exactly(tmp_path, baseline, expected_stream,
                                                                       phimoe_teacher, corpus_file):
    """The disk fills up while last.ckpt is rewritten at step 4 of slim2: the run ends with one line naming what was
    written, where, and the space left (exit status 1, no traceback); the previous complete checkpoint stays; the
    resume after "freeing space" (no fault) reproduces the uninterrupted run."""
    recipe = recipe_in(tmp_path, phimoe_teacher, corpus_file)
    run_dir = tmp_path / "run"
    ckpts = run_dir / "stage_1_slim2" / "checkpoints"
    fault = {"kind": "disk_full", "path_suffix": "stage_1_slim2/checkpoints/last.ckpt.tmp", "step": 4}
    full = run(tmp_path, recipe, fault=fault, expect_rc=1)
    errors = [line for line in full.output().splitlines() if line.startswith("error:")]
    assert len(errors) == 1, full.output()
    assert "no space left" in errors[0] and "checkpoint" in errors[0] and str(ckpts / "last.ckpt") in errors[0]
    assert "MiB free on" in errors[0] and "Traceback" not in full.output()
    assert not (ckpts / "last.ckpt.tmp").exists()  # the partial file is removed, not left under any name
    last = torch.load(ckpts / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == 2  # the previous complete checkpoint is intact
    assert_no_loadable_half_file(run_dir)
    resumed = run(tmp_path, recipe, "--resume", "true")
    assert [(r["stage"], r["step"]) for r in resumed.events("train_start")] == [("slim2", 2)]
    assert_matches_baseline(baseline, expected_stream, run_dir, committed(full, resumed))


@pytest.mark.slow
def test_kill_mid_hf_export_leaves_no_partial_dir(tmp_path, baseline, expected_stream, phimoe_teacher, corpus_file):
    recipe = recipe_in(tmp_path, phimoe_teacher, corpus_file)
    first = killed(tmp_path, recipe, {"kind": "export_before_rename", "path_suffix": "stage_1_slim2/hf.tmp"})
    run_dir = tmp_path / "run"
    stage = run_dir / "stage_1_slim2"
    assert not (stage / "hf").exists() and (stage / "hf.tmp").is_dir()  # hf/ is absent, never partial
    assert json.loads((stage / "meta.json").read_text())["status"] != "complete"
    assert not (run_dir / "final").exists() and not (run_dir / "summary.json").exists()
    assert_no_loadable_half_file(run_dir)
    resumed = run(tmp_path, recipe, "--resume", "true")
    # training had finished: the resume restores the final checkpoint, trains no step, and exports
    assert [(r["stage"], r["step"]) for r in resumed.events("train_start")] in ([("slim2", 6)], [])
    assert not resumed.events("step")
    assert_matches_baseline(baseline, expected_stream, run_dir, committed(first, resumed))


# ---------------------------------------------------------------------------------------------------
# crashes at a stage boundary (repeatedly): same widths, kept indices and losses; nothing pruned twice
# ---------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_crashes_at_stage_boundary_resume_identically(tmp_path, baseline, expected_stream, phimoe_teacher,
                                                      corpus_file):
    recipe = recipe_in(tmp_path, phimoe_teacher, corpus_file)
    stage = tmp_path / "run" / "stage_1_slim2"
    # a. during scoring: scores computed, nothing of stage 2 saved yet
    a = killed(tmp_path, recipe, {"kind": "scoring", "stage": "slim2"})
    assert not (stage / "keep.pt").exists() and not (stage / "checkpoints").exists()
    # b. (resumed) between scoring and slicing: scores.pt saved, keep.pt not
    b = killed(tmp_path, recipe, {"kind": "before_slicing", "stage": "slim2"}, "--resume", "true")
    assert b.events("scored", stage="slim2") and (stage / "scores.pt").is_file() and not (stage / "keep.pt").exists()
    base_scores = torch.load(baseline["dir"] / "stage_1_slim2" / "scores.pt", weights_only=True)
    scores = torch.load(stage / "scores.pt", weights_only=True)
    assert all(torch.equal(scores["experts"][k], v) for k, v in base_scores["experts"].items())
    # c. (resumed) after slicing, before the first KD step: keep.pt saved, no checkpoint yet
    c = killed(tmp_path, recipe, {"kind": "train_start", "stage": "slim2"}, "--resume", "true")
    assert (stage / "keep.pt").is_file() and not list(stage.glob("checkpoints/*.ckpt"))
    assert [r["kept_index_hash"] for r in c.events("sliced", stage="slim2")] == \
        [baseline["meta"]["slim2"]["kept_index_hash"]]
    # d. the final resume re-applies the saved slice to the stage-1 export: no re-scoring, sliced once
    d = run(tmp_path, recipe, "--resume", "true")
    assert d.events("reapplied", stage="slim2") and not d.events("scored") and not d.events("sliced")
    base_start = baseline["run"].events("train_start", stage="slim2")[0]
    assert [(r["step"], r["widths"]) for r in d.events("train_start")] == [(0, base_start["widths"])]
    for r in (b, c, d):  # the finished stage 1 is never redone
        assert all(x.get("stage") != "slim1" for x in r.records), r.records
    assert_matches_baseline(baseline, expected_stream, tmp_path / "run", committed(a, d))


# ---------------------------------------------------------------------------------------------------
# Ctrl-C (SIGINT) or SIGTERM mid-stage: one checkpoint, prompt exit 130 / 143, the resume command, exact resume
# ---------------------------------------------------------------------------------------------------
def wait_for(r: Run, event: str, count: int = 1) -> list[dict]:
    """The run's ``event`` records once there are ``count`` of them (the run must still be going)."""
    deadline = time.time() + WATCHDOG_S
    while len(r.events(event)) < count and r.proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert len(r.events(event)) >= count, r.output()
    return r.events(event)


def printed_resume_command(r: Run, signum: int) -> list[str]:
    """The command the stopped run printed to continue it."""
    lines = [line for line in r.output().splitlines() if line.startswith(f"{signal.Signals(signum).name}: saved ")]
    assert len(lines) == 1, r.output()  # rank 0 only
    return shlex.split(lines[0].split("resume with: ", 1)[1])


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_saves_one_checkpoint_and_resumes(tmp_path, baseline, expected_stream, phimoe_teacher, corpus_file,
                                                 signum):
    """Ctrl-C (SIGINT) or SIGTERM mid stage 2: the step finishes, exactly one new checkpoint (last.ckpt at that
    step), exit 130 / 143 within the grace period, and the exact command to continue printed: the run's own command
    line with --resume true. Running that command continues exactly and finishes."""
    recipe = recipe_in(tmp_path, phimoe_teacher, corpus_file)
    run_dir = tmp_path / "run"
    r = start(tmp_path, recipe, fault={"kind": "await_signal", "stage": "slim2", "step": 3})
    wait_for(r, "ready")
    before = checkpoint_files(run_dir)
    signalled = time.time()
    r.proc.send_signal(signum)
    rc = r.wait(timeout=30)  # the grace period: the current step finishes, one checkpoint, exit
    assert time.time() - signalled < 30
    assert rc == 128 + signum, r.output()
    after = checkpoint_files(run_dir)
    changed = {k for k in after if before.get(k) != after[k]}
    assert changed == {"stage_1_slim2/checkpoints/last.ckpt"} and set(before) <= set(after), (before, after)
    last = torch.load(run_dir / "stage_1_slim2/checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == 3
    assert_no_loadable_half_file(run_dir)
    command = printed_resume_command(r, signum)
    assert command == [sys.executable, str(DRIVER), "--config", recipe, "--resume", "true"]
    resumed = start(tmp_path, recipe, command=command)
    assert resumed.wait() == 0, resumed.output()
    assert [(x["stage"], x["step"]) for x in resumed.events("train_start")] == [("slim2", 3)]
    assert_matches_baseline(baseline, expected_stream, run_dir, committed(r, resumed))


@pytest.mark.slow
def test_second_sigint_exits_at_once(tmp_path, phimoe_teacher, corpus_file):
    """A second Ctrl-C while the first is pending (here: the step it waits for is held for 60 s) ends the process at
    once, by SIGINT's default action, without the pending checkpoint: no checkpoint changes, none is half-written,
    and the resume has the previous complete one."""
    from lightning_slimmoe.strategies import latest_complete_checkpoint

    recipe = recipe_in(tmp_path, phimoe_teacher, corpus_file)
    run_dir = tmp_path / "run"
    r = start(tmp_path, recipe, fault={"kind": "await_signal", "stage": "slim2", "step": 3, "hold_s": 60})
    wait_for(r, "ready")
    before = checkpoint_files(run_dir)
    r.proc.send_signal(signal.SIGINT)
    (seen,) = wait_for(r, "signal_seen")
    assert seen["received"] == signal.SIGINT
    signalled = time.time()
    r.proc.send_signal(signal.SIGINT)
    rc = r.wait(timeout=10)
    assert time.time() - signalled < 5, "the second Ctrl-C did not end the process at once"
    assert rc == -signal.SIGINT, r.output()  # ended by the signal (a shell reports 130)
    assert checkpoint_files(run_dir) == before
    assert_no_loadable_half_file(run_dir)
    assert latest_complete_checkpoint(run_dir / "stage_1_slim2/checkpoints").name == "last.ckpt"
    assert torch.load(run_dir / "stage_1_slim2/checkpoints/last.ckpt", weights_only=True)["global_step"] == 2


class _SignalAtTrainEnd(Callback):
    def __init__(self, signum: int):
        self.signum = signum

    def on_train_end(self, trainer, pl_module):
        signal.raise_signal(self.signum)  # after the last batch end, before the stop callback's on_train_end


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_after_the_last_batch_still_stops_the_run(tmp_path, caplog, signum):
    """A signal that arrives once the last batch has ended (during the final validation, say) is not dropped: the fit
    saves last.ckpt at its last step, prints the resume command and exits with 128 + the signal."""
    import logging

    from lightning.pytorch import Trainer
    from lightning.pytorch.demos.boring_classes import BoringModel

    from callbacks.preemption import CheckpointOnSignal

    ckpt = tmp_path / "last.ckpt"
    trainer = Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                      callbacks=[_SignalAtTrainEnd(signum), CheckpointOnSignal(str(ckpt), "python train.py --resume true")])
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with caplog.at_level(logging.INFO), pytest.raises(SystemExit) as stopped:
            trainer.fit(BoringModel())
        after = {s: signal.getsignal(s) for s in handlers}
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
    assert after == handlers  # Lightning put the handlers back
    assert stopped.value.code == 128 + signum
    assert torch.load(ckpt, weights_only=True)["global_step"] == 2
    assert any(f"{signal.Signals(signum).name}: saved {ckpt} at global step 2; resume with: python train.py --resume true"
               in m for m in caplog.messages), caplog.messages


# ---------------------------------------------------------------------------------------------------
# kill -9 at a random step, a kill mid checkpoint, SIGTERM and NaN with 2 ranks: FSDP2 (ModelParallelStrategy)
# over gloo, 2 samples per rank, so that a global batch holds the same 4 samples as the 1-process runs above.
# Checkpoints are sharded (DCP dirs).
# ---------------------------------------------------------------------------------------------------
TWO_RANKS = ("--trainer.devices", "2", "--trainer.strategy", MODEL_PARALLEL, "--data.init_args.batch_size", "2")
TWO_RANKS_FSDP1 = ("--trainer.devices", "2", "--trainer.strategy", FSDP1, "--data.init_args.batch_size", "2")


def by_rank(records: list[dict]) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = {}
    for r in records:
        out.setdefault(r["rank"], []).append(r)
    return out


def committed_ranks(earlier: list[dict], resumed: Run) -> dict[int, list[dict]]:
    """Per rank: the earlier steps up to the checkpoint each resumed stage restarted from, then the resumed ones."""
    starts = {}
    for rec in resumed.events("train_start"):
        assert starts.setdefault(rec["stage"], rec["step"]) == rec["step"], "ranks resumed from different steps"
    out = {}
    for rank in (0, 1):
        kept = [r for r in earlier if r["rank"] == rank and (r["stage"] not in starts or r["step"] <= starts[r["stage"]])]
        kept += [r for r in resumed.events("step") if r["rank"] == rank]
        out[rank] = sorted(kept, key=lambda r: (list(STEPS).index(r["stage"]), r["step"]))
    return out


def sharded_checkpoint_files(run_dir: Path) -> dict[str, str]:
    """name -> sha256 of every file below every stage's checkpoints/ (sharded checkpoints are directories)."""
    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run_dir.glob("stage_*/checkpoints/**/*")) if p.is_file()}


def load_sharded(path: Path, scratch: Path) -> dict:
    """A sharded (DCP) checkpoint as one plain dict (DCP's own converter, no process group needed)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = scratch / f"{path.parent.parent.name}-{path.name}.pt"
    dcp_to_torch_save(str(path), str(out))
    return torch.load(out, map_location="cpu", weights_only=True)


def assert_sharded_checkpoints_complete(run_dir: Path, scratch: Path) -> None:
    """Every checkpoint under a final name is a complete, finite sharded checkpoint; nothing half-written
    or set aside is left behind."""
    from lightning_slimmoe.strategies import is_complete_checkpoint

    for path in run_dir.glob("stage_*/checkpoints/*"):
        assert path.name.endswith(".ckpt"), f"left behind: {path}"
        assert path.is_dir() and is_complete_checkpoint(path), path
        state = load_sharded(path, scratch)
        tensors = [v for v in state["state_dict"].values() if torch.is_tensor(v)]
        assert tensors and all(torch.isfinite(t).all() for t in tensors if t.is_floating_point()), path


def assert_two_ranks_match(baseline2, expected_stream, run_dir: Path, sequences: dict[int, list[dict]]) -> None:
    for rank in (0, 1):
        assert [strip(r) for r in sequences[rank]] == [strip(r) for r in baseline2["records"][rank]], rank
    # no sample repeated or skipped: rank 0's and rank 1's halves of every step are the 1-process batch
    assert [a["first_ids"] + b["first_ids"] for a, b in zip(sequences[0], sequences[1])] == expected_stream
    assert weights_hash(run_dir / "final") == baseline2["hash"]
    for k, s in enumerate(STEPS):
        meta = json.loads((run_dir / f"stage_{k}_{s}" / "meta.json").read_text())
        assert meta["status"] == "complete" and meta["kept_index_hash"] == baseline2["meta"][s]["kept_index_hash"]
    assert not list(run_dir.rglob("*.tmp")) and not list(run_dir.rglob("*.old"))


def two_rank_baseline(work: Path, teacher: str, corpus: str, ranks: tuple) -> dict:
    """An uninterrupted 2-rank run: its per-rank step records, final weights and stage metadata (Lightning's own
    launcher, as the faulted and resumed runs it is compared with)."""
    recipe = recipe_in(work, teacher, corpus)
    r = run(work, recipe, *ranks)
    records = by_rank(r.events("step"))
    for rank in (0, 1):
        assert [(x["stage"], x["step"]) for x in records[rank]] == [(s, k) for s, n in STEPS.items()
                                                                     for k in range(1, n + 1)]
    run_dir = work / "run"
    return {"records": records, "hash": weights_hash(run_dir / "final"),
            "meta": {s: json.loads((run_dir / f"stage_{k}_{s}" / "meta.json").read_text())
                     for k, s in enumerate(STEPS)}}


@pytest.fixture(scope="module")
def baseline2(tmp_path_factory, phimoe_teacher, corpus_file):
    """The uninterrupted 2-rank run (FSDP2)."""
    return two_rank_baseline(tmp_path_factory.mktemp("baseline2"), phimoe_teacher, corpus_file, TWO_RANKS)


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_match_one_process_exactly_enough(baseline, baseline2):
    """Sanity link between the two references: same kept indices, same losses (to float noise)."""
    for s in STEPS:
        assert baseline2["meta"][s]["kept_index_hash"] == baseline["meta"][s]["kept_index_hash"]
    for one, a, b in zip(baseline["records"], baseline2["records"][0], baseline2["records"][1]):
        assert abs(one["loss"] - (a["loss"] + b["loss"]) / 2) < 1e-5


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_sigkill_at_random_step_resumes_exactly(tmp_path, baseline2, expected_stream, phimoe_teacher,
                                                          corpus_file):
    """With 2 ranks: the whole job is killed (-9) at a random step of stage 2 (after that step,
    before its checkpoint); the 2-rank resume reproduces every per-rank loss, the sample stream and the
    final weights of the uninterrupted 2-rank run bit for bit."""
    kill_step = random.Random(11).randint(1, STEPS["slim2"] - 1)
    recipe = recipe_in(tmp_path, phimoe_teacher, corpus_file)
    first = killed(tmp_path, recipe, {"kind": "step", "stage": "slim2", "step": kill_step, "rank": 0}, *TWO_RANKS)
    run_dir = tmp_path / "run"
    assert_sharded_checkpoints_complete(run_dir, tmp_path)
    resumed = run(tmp_path, recipe, "--resume", "true", *TWO_RANKS)
    restart = (kill_step - 1) // 2 * 2
    assert sorted((r["stage"], r["step"], r["rank"]) for r in resumed.events("train_start")) == \
        [("slim2", restart, 0), ("slim2", restart, 1)]
    assert not resumed.events("scored") and not resumed.events("sliced")
    assert_two_ranks_match(baseline2, expected_stream, run_dir, committed_ranks(first.events("step"), resumed))
    assert_sharded_checkpoints_complete(run_dir, tmp_path)


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_fsdp1_sigkill_at_random_step_resumes_exactly(tmp_path_factory, tmp_path, expected_stream,
                                                                phimoe_teacher, corpus_file):
    """Under FSDP1 (FSDPStrategy): the whole 2-rank job is killed (-9) at a random step of stage 2;
    the resume (full student checkpoint written by rank 0, loaded into every rank's shards, optimizer state
    included) reproduces every per-rank loss, the sample stream and the final weights of the uninterrupted
    FSDP1 run bit for bit. Every checkpoint under a final name is a complete, finite, student-only file."""
    baseline = two_rank_baseline(tmp_path_factory.mktemp("baseline_fsdp1"), phimoe_teacher, corpus_file,
                                 TWO_RANKS_FSDP1)
    kill_step = random.Random(12).randint(1, STEPS["slim2"] - 1)
    recipe = recipe_in(tmp_path, phimoe_teacher, corpus_file)
    first = killed(tmp_path, recipe, {"kind": "step", "stage": "slim2", "step": kill_step, "rank": 0},
                   *TWO_RANKS_FSDP1)
    run_dir = tmp_path / "run"
    assert_no_loadable_half_file(run_dir)
    resumed = run(tmp_path, recipe, "--resume", "true", *TWO_RANKS_FSDP1)
    restart = (kill_step - 1) // 2 * 2
    assert sorted((r["stage"], r["step"], r["rank"]) for r in resumed.events("train_start")) == \
        [("slim2", restart, 0), ("slim2", restart, 1)]
    assert_two_ranks_match(baseline, expected_stream, run_dir, committed_ranks(first.events("step"), resumed))
    assert_no_loadable_half_file(run_dir)
    for path in run_dir.glob("stage_*/checkpoints/*.ckpt"):
        assert all(k.startswith("student.") for k in torch.load(path, weights_only=True)["state_dict"]), path


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_kill_mid_sharded_checkpoint_keeps_previous(tmp_path, baseline2, expected_stream, phimoe_teacher,
                                                              corpus_file):
    """Sharded checkpoints: killed after every shard of the new last.ckpt is written but before
    it is complete: the previous last.ckpt is still there, complete, and is what resumes; the half-made
    directory is never under a final name."""
    recipe = recipe_in(tmp_path, phimoe_teacher, corpus_file)
    run_dir = tmp_path / "run"
    ckpts = run_dir / "stage_1_slim2" / "checkpoints"
    first = killed(tmp_path, recipe, {"kind": "sharded_checkpoint_written", "path_suffix": "stage_1_slim2/checkpoints/"
                                      "last.ckpt.tmp", "occurrence": 2}, *TWO_RANKS)  # step 4's
    assert first.events("kill")[0]["where"].startswith("sharded save of")
    assert (ckpts / "last.ckpt.tmp").is_dir()  # the new one: shards + .metadata, no meta.pt
    assert torch.load(ckpts / "last.ckpt/meta.pt", weights_only=True)["global_step"] == 2  # the previous one
    resumed = run(tmp_path, recipe, "--resume", "true", *TWO_RANKS)
    assert sorted((x["stage"], x["step"]) for x in resumed.events("train_start")) == [("slim2", 2)] * 2
    assert_two_ranks_match(baseline2, expected_stream, run_dir, committed_ranks(first.events("step"), resumed))
    assert_sharded_checkpoints_complete(run_dir, tmp_path)


def assert_signal_stopped_both_ranks(r, run_dir, tmp_path, signum, send) -> None:
    """``send()`` the signal to a 2-rank run paused mid stage 2 (step 3): both ranks stop within the grace period (a
    deadlock fails here; the watchdog kills the whole group) with 128 + ``signum``, having written exactly one new
    complete sharded checkpoint, last.ckpt at step 3, beside the step-2 one, and changed nothing else."""
    before = sharded_checkpoint_files(run_dir)
    signalled = time.time()
    send()
    rc = r.wait(timeout=30)
    assert time.time() - signalled < 30
    assert rc == 128 + signum, r.output()
    exits = {e["rank"]: e for e in r.events("exit")}
    assert set(exits) == {0, 1} and all(e["code"] == 128 + signum for e in exits.values()), r.records
    after = sharded_checkpoint_files(run_dir)
    changed = {k for k in after if before.get(k) != after[k]}
    assert changed and all(k.startswith("stage_1_slim2/checkpoints/last.ckpt/") for k in changed), changed
    assert set(before) - set(after) <= {k for k in before if k.startswith("stage_1_slim2/checkpoints/last.ckpt/")}
    assert sorted(p.name for p in (run_dir / "stage_1_slim2/checkpoints").iterdir()) == \
        ["last.ckpt", "step0000002.ckpt"]
    assert_sharded_checkpoints_complete(run_dir, tmp_path)
    assert torch.load(run_dir / "stage_1_slim2/checkpoints/last.ckpt/meta.pt", weights_only=True)["global_step"] == 3


@pytest.mark.slow
@pytest.mark.distributed
def test_sigterm_to_one_rank_stops_all_ranks(tmp_path, baseline2, expected_stream, phimoe_teacher, corpus_file):
    """SIGTERM with 2 ranks, to rank 1 only, mid stage 2. Both ranks stop within the grace period
    with status 143, exactly one new complete checkpoint (last.ckpt) is written, nothing deadlocks (the
    watchdog), and the resume continues exactly."""
    recipe = recipe_in(tmp_path, phimoe_teacher, corpus_file)
    run_dir = tmp_path / "run"
    r = start(tmp_path, recipe, *TWO_RANKS, fault={"kind": "await_signal", "stage": "slim2", "step": 3, "rank": 1})
    deadline = time.time() + WATCHDOG_S
    while not r.events("ready") and r.proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert r.events("ready"), r.output()
    (ready,) = r.events("ready")
    assert ready["rank"] == 1 and ready["pid"] != r.proc.pid  # the signal goes to the child rank only
    assert_signal_stopped_both_ranks(r, run_dir, tmp_path, signal.SIGTERM, lambda: os.kill(ready["pid"], signal.SIGTERM))
    resumed = run(tmp_path, recipe, "--resume", "true", *TWO_RANKS)
    assert sorted((x["stage"], x["step"]) for x in resumed.events("train_start")) == [("slim2", 3)] * 2
    assert_two_ranks_match(baseline2, expected_stream, run_dir, committed_ranks(r.events("step"), resumed))


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_ctrl_c_stops_all_ranks_and_resumes(tmp_path, baseline2, expected_stream, phimoe_teacher,
                                                      corpus_file):
    """Ctrl-C with 2 ranks: SIGINT to the whole process group, as a terminal sends it, mid stage 2. Both ranks
    finish the step, write exactly one new complete sharded checkpoint (last.ckpt) together and exit with 130; rank 0
    prints the exact resume command, and running it continues exactly."""
    recipe = recipe_in(tmp_path, phimoe_teacher, corpus_file)
    run_dir = tmp_path / "run"
    r = start(tmp_path, recipe, *TWO_RANKS, fault={"kind": "await_signal", "stage": "slim2", "step": 3})
    assert sorted(e["rank"] for e in wait_for(r, "ready", 2)) == [0, 1]
    # every rank (the driver leads its own process group)
    assert_signal_stopped_both_ranks(r, run_dir, tmp_path, signal.SIGINT, lambda: os.killpg(r.proc.pid, signal.SIGINT))
    command = printed_resume_command(r, signal.SIGINT)
    assert command == [sys.executable, str(DRIVER), "--config", recipe, *TWO_RANKS, "--resume", "true"]
    resumed = start(tmp_path, recipe, command=command)
    assert resumed.wait() == 0, resumed.output()
    assert sorted((x["stage"], x["step"]) for x in resumed.events("train_start")) == [("slim2", 3)] * 2
    assert_two_ranks_match(baseline2, expected_stream, run_dir, committed_ranks(r.events("step"), resumed))


@pytest.mark.slow
@pytest.mark.distributed
def test_nan_on_one_rank_stops_all_ranks_before_the_step(tmp_path, phimoe_teacher, corpus_file):
    """A NaN loss with 2 ranks, at stage-2 step 3 on rank 1 only. Both ranks stop before
    optimizer.step (their weight and optimizer-state shards are bit-identical before and after), both errors
    name the step, the rank and the tensor, and the last finite checkpoint is kept."""
    recipe = recipe_in(tmp_path, phimoe_teacher, corpus_file)
    r = run(tmp_path, recipe, *TWO_RANKS, fault={"kind": "nan_loss", "stage": "slim2", "step": 3, "rank": 1},
            expect_rc=None)
    assert r.proc.returncode not in (0, None), r.output()
    errors = {e["rank"]: e for e in r.events("exception")}
    assert set(errors) == {0, 1}, r.records
    for e in errors.values():
        assert e["type"] == "FloatingPointError" and e["step"] == 3, e
        assert "global step 3" in e["message"] and "rank 1: loss=nan" in e["message"], e["message"]
        assert "rank 0: loss" not in e["message"]  # rank 0's loss was finite
    states = {(s["rank"], s["when"]): s["hash"] for s in r.events("state")}
    assert set(states) == {(0, "before"), (1, "before"), (0, "after"), (1, "after")}, states
    for rank in (0, 1):
        assert states[(rank, "before")] == states[(rank, "after")], f"rank {rank} changed its shards"
    run_dir = tmp_path / "run"
    assert_sharded_checkpoints_complete(run_dir, tmp_path)
    ckpts = run_dir / "stage_1_slim2/checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.ckpt", "step0000002.ckpt"]
    assert torch.load(ckpts / "last.ckpt/meta.pt", weights_only=True)["global_step"] == 2


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("ranks", [TWO_RANKS, TWO_RANKS_FSDP1], ids=["fsdp2", "fsdp1"])
def test_two_ranks_nan_skip_policy_skips_on_every_rank(tmp_path, phimoe_teacher, corpus_file, ranks):
    """The opt-in skip with 2 ranks, the NaN on rank 1 only: both ranks skip the same step (their weight and
    optimizer-state shards are bit-identical before and after it), every step still counts on both, and the
    run finishes. (Lightning refuses a None training_step with several ranks: the skipped step backpropagates
    a zero loss on every rank and drops the gradients before optimizer.step.)"""
    recipe = recipe_in(tmp_path, phimoe_teacher, corpus_file, stages=skipping(1))
    r = run(tmp_path, recipe, *ranks, fault={"kind": "nan_loss", "stage": "slim2", "step": 3, "rank": 1})
    states = {(s["rank"], s["when"]): s["hash"] for s in r.events("state")}
    assert set(states) == {(rank, when) for rank in (0, 1) for when in ("before", "after_skip")}, states
    for rank in (0, 1):
        assert states[(rank, "before")] == states[(rank, "after_skip")], f"rank {rank} changed its shards"
    records = by_rank(r.events("step"))
    for rank in (0, 1):
        assert [x["step"] for x in records[rank] if x["stage"] == "slim2"] == list(range(1, STEPS["slim2"] + 1))
    assert "skipped global step 3 (no update)" in r.output()
    assert (tmp_path / "run" / "final").is_dir()


# ---------------------------------------------------------------------------------------------------
# In-process scenarios (no kill needed): NaN, teacher identity, changed resumes, unsafe files
# ---------------------------------------------------------------------------------------------------
class Stop(RuntimeError):
    """A crash injected in-process (after the stage-2 step-2 checkpoint)."""


@pytest.fixture
def with_callbacks(monkeypatch):
    """``with_callbacks(cb, ...)`` adds callbacks to every Trainer the pipeline builds (as test_pipeline does)."""
    import lightning_slimmoe.cli as cli

    original = cli.SlimMoECLI.make_trainer

    def install(*extra):
        def make_trainer(self, extra_callbacks=(), **kw):
            return original(self, extra_callbacks=[*extra_callbacks, *extra], **kw)
        monkeypatch.setattr(cli.SlimMoECLI, "make_trainer", make_trainer)
    return install


def slim2(pl_module) -> bool:
    return pl_module.student.config.intermediate_size == 8


class CrashAt(Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if slim2(pl_module) and trainer.global_step == self.step:
            raise Stop(f"crash at step {self.step}")


def main_(*args):
    from lightning_slimmoe.cli import main

    return main(list(args))


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory, phimoe_teacher, corpus_file):
    """A run stopped in stage 2 at step 3 (stage 1 complete; stage 2 has keep.pt and a step-2 checkpoint),
    made in-process; tests copy it before changing anything. Its teacher is a private copy."""
    import lightning_slimmoe.cli as cli

    work = tmp_path_factory.mktemp("interrupted")
    teacher = work / "teacher"
    shutil.copytree(phimoe_teacher, teacher)
    recipe = recipe_in(work, str(teacher), corpus_file)
    original = cli.SlimMoECLI.make_trainer
    with pytest.MonkeyPatch.context() as mp:  # module scope: the function-scoped `monkeypatch` is not available
        mp.setattr(cli.SlimMoECLI, "make_trainer", lambda self, extra_callbacks=(), **kw: original(
            self, extra_callbacks=[*extra_callbacks, CrashAt(3)], **kw))
        with pytest.raises(Stop):
            main_("--config", recipe)
    last = torch.load(work / "run/stage_1_slim2/checkpoints/last.ckpt", weights_only=True)
    assert last["global_step"] == 2 and (work / "run/stage_1_slim2/keep.pt").is_file()
    return {"dir": work, "recipe": recipe, "teacher": teacher, "corpus": corpus_file}


def clone(interrupted, dest: Path, stages=STAGES) -> str:
    """A copy of the interrupted run under ``dest``; returns its recipe (same teacher, same stages)."""
    shutil.copytree(interrupted["dir"] / "run", dest / "run")
    return recipe_in(dest, str(interrupted["teacher"]), interrupted["corpus"], stages=stages)


# NaN ----------------------------------------------------------------------------------------------
class Snapshot(Callback):
    """Student weights and optimizer state just before the step that goes wrong."""

    def __init__(self, step: int):
        self.step, self.module, self.weights, self.optim = step, None, None, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if slim2(pl_module) and trainer.global_step == self.step:
            self.module, self.optimizer = pl_module, trainer.optimizers[0]
            self.weights = {k: v.detach().clone() for k, v in pl_module.student.state_dict().items()}
            self.optim = copy.deepcopy(trainer.optimizers[0].state_dict())


def assert_finite_checkpoints(ckpts: Path, expect_last_step: int) -> None:
    files = sorted(ckpts.glob("*.ckpt"))
    assert files and not list(ckpts.glob("*.tmp"))
    for path in files:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values()), path
        for state in ckpt["optimizer_states"][0]["state"].values():
            assert all(torch.isfinite(v).all() for v in state.values() if torch.is_tensor(v)), path
    assert torch.load(ckpts / "last.ckpt", weights_only=True)["global_step"] == expect_last_step
    assert (ckpts / f"step{expect_last_step:07d}.ckpt").is_file()  # retention kept the last finite one


def test_nan_loss_stops_before_optimizer_step(tmp_path, interrupted, with_callbacks, monkeypatch):
    import dataclasses

    from lightning_slimmoe.module import StageModule

    recipe = clone(interrupted, tmp_path)
    original = StageModule.forward_loss

    def forward_loss(self, batch):
        out = original(self, batch)
        if self.training and slim2(self) and self.global_step == 3:
            nan = torch.tensor(float("nan"))
            out = dataclasses.replace(out, loss=out.loss * nan, kd_loss=out.kd_loss * nan)
        return out
    monkeypatch.setattr(StageModule, "forward_loss", forward_loss)
    snap = Snapshot(3)
    with_callbacks(snap)
    with pytest.raises(FloatingPointError) as info:
        main_("--config", recipe, "--resume", "true")
    message = str(info.value)
    assert "global step 3" in message and "rank 0" in message and "loss" in message and "nan" in message
    after = snap.module.student.state_dict()
    assert all(torch.equal(after[k], v) for k, v in snap.weights.items())  # no optimizer.step happened
    optim = snap.optimizer.state_dict()
    assert optim["state"].keys() == snap.optim["state"].keys()
    for k, state in snap.optim["state"].items():
        assert all(torch.equal(optim["state"][k][n], v) if torch.is_tensor(v) else optim["state"][k][n] == v
                   for n, v in state.items())
    assert_finite_checkpoints(tmp_path / "run/stage_1_slim2/checkpoints", expect_last_step=2)


def _inject_nan_loss(monkeypatch, steps: set[int]) -> None:
    import dataclasses

    from lightning_slimmoe.module import StageModule

    original = StageModule.forward_loss

    def forward_loss(self, batch):
        out = original(self, batch)
        if self.training and slim2(self) and self.global_step in steps:
            nan = torch.tensor(float("nan"))
            out = dataclasses.replace(out, loss=out.loss * nan, kd_loss=out.kd_loss * nan)
        return out
    monkeypatch.setattr(StageModule, "forward_loss", forward_loss)


def skipping(limit: int) -> list[dict]:
    stages = copy.deepcopy(STAGES)
    stages[1]["max_nonfinite_skips"] = limit
    return stages


def test_nan_skip_policy_skips_the_step_and_continues(tmp_path, interrupted, with_callbacks, monkeypatch):
    """Opt-in policy (``max_nonfinite_skips: 1``, allowed to change on --resume): the NaN step leaves weights and
    optimizer state as they were, the step still counts (data stream unchanged), and the stage finishes."""
    recipe = clone(interrupted, tmp_path, stages=skipping(1))
    _inject_nan_loss(monkeypatch, {3})
    before, after = Snapshot(3), Snapshot(4)
    with_callbacks(before, after)
    summary = main_("--config", recipe, "--resume", "true")
    assert summary["final_dir"] and (tmp_path / "run/final").is_dir()
    assert all(torch.equal(after.weights[k], v) for k, v in before.weights.items())  # step 3 changed nothing
    for k, state in before.optim["state"].items():
        assert all(torch.equal(after.optim["state"][k][n], v) if torch.is_tensor(v) else after.optim["state"][k][n] == v
                   for n, v in state.items())
    last = torch.load(tmp_path / "run/stage_1_slim2/checkpoints/last.ckpt", weights_only=True)
    assert last["global_step"] == STEPS["slim2"] and last["nonfinite_skips"] == 1
    # the run dir was copied elsewhere before resuming: last.ckpt is still the one updated (never a last-v1.ckpt)
    assert not list((tmp_path / "run/stage_1_slim2/checkpoints").glob("last-v*"))


def test_nan_skip_policy_stops_past_its_limit(tmp_path, interrupted, with_callbacks, monkeypatch):
    recipe = clone(interrupted, tmp_path, stages=skipping(1))
    _inject_nan_loss(monkeypatch, {3, 4})
    with pytest.raises(FloatingPointError) as info:
        main_("--config", recipe, "--resume", "true")
    message = str(info.value)
    assert "global step 4" in message and "1 of max_nonfinite_skips=1 skips already used" in message
    assert_finite_checkpoints(tmp_path / "run/stage_1_slim2/checkpoints", expect_last_step=4)


def test_nan_weights_never_reach_a_checkpoint(tmp_path, interrupted, with_callbacks):
    """Finite loss but a NaN gradient at step 4: the step-4 checkpoint is refused (naming the tensor), and
    retention never deletes the last finite checkpoint."""
    class PoisonGrad(Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            if slim2(pl_module) and trainer.global_step == 3:
                next(p for p in pl_module.student.parameters() if p.grad is not None).grad.fill_(float("nan"))

    recipe = clone(interrupted, tmp_path)
    with_callbacks(PoisonGrad())
    with pytest.raises(FloatingPointError) as info:
        main_("--config", recipe, "--resume", "true")
    message = str(info.value)
    assert "refusing to write checkpoint" in message and "global step 4" in message and "rank 0" in message
    assert "state_dict['student." in message or "optimizer_states" in message
    assert_finite_checkpoints(tmp_path / "run/stage_1_slim2/checkpoints", expect_last_step=2)


# the teacher --------------------------------------------------------------------------------------
def _nbytes(obj) -> int:
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    return 0


def test_checkpoint_holds_student_and_optimizer_only(tmp_path, phimoe_teacher, corpus_file):
    """Checkpoint size <= 1.05 x (student + optimizer state), on a teacher big enough (~1.7M params) that the
    container's fixed per-tensor overhead is well under 1%; the teacher would add far more than 5%."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from helpers import tiny_config

    teacher = tmp_path / "teacher"
    tokenizer = AutoTokenizer.from_pretrained(phimoe_teacher)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("phimoe", vocab_size=len(tokenizer), hidden_size=128,
                                                         head_dim=32, intermediate_size=256))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    model.save_pretrained(teacher)
    tokenizer.save_pretrained(teacher)
    stages = [{"name": "s", "expert_width": 128, "calibration_tokens": 128, "max_tokens": 2 * 4 * 32}]
    main_("--config", tiny_recipe(tmp_path, str(teacher), corpus_file, stages=stages))
    path = tmp_path / "run/stage_0_s/checkpoints/last.ckpt"
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    assert ckpt["state_dict"] and all(k.startswith("student.") for k in ckpt["state_dict"])
    student, optimizer = _nbytes(ckpt["state_dict"]), _nbytes(ckpt["optimizer_states"])
    assert path.stat().st_size <= 1.05 * (student + optimizer), (path.stat().st_size, student, optimizer)
    teacher_bytes = sum(_nbytes(load_file(f)) for f in teacher.glob("*.safetensors"))
    assert teacher_bytes > 0.05 * (student + optimizer)  # so the bound would catch a checkpointed teacher


def test_resume_with_a_different_teacher_is_an_error(tmp_path, interrupted):
    from transformers import AutoModelForCausalLM

    recipe = clone(interrupted, tmp_path)
    teacher_dir = interrupted["teacher"]
    weights = teacher_dir / "model.safetensors"
    saved = weights.read_bytes()
    try:
        other = AutoModelForCausalLM.from_pretrained(teacher_dir)
        with torch.no_grad():
            for p in other.parameters():
                p.add_(0.01 * torch.randn_like(p))  # same shapes, other weights
        other.save_pretrained(teacher_dir)
        with pytest.raises(ValueError, match="different teacher"):
            main_("--config", recipe, "--resume", "true")
    finally:
        weights.write_bytes(saved)


# resuming with another configuration --------------------------------------------------------------
@pytest.mark.parametrize("change", ["width", "stage_list", "accumulate", "world_size", "batch_size"])
def test_resume_with_changed_config_prints_the_difference(tmp_path, interrupted, no_weights, change):
    from lightning_slimmoe.pipeline import ConfigError

    stages = copy.deepcopy(STAGES)
    args = []
    if change == "width":
        stages[1]["expert_width"] = 16
        needle = "stages[1].expert_width: 8 -> 16"
    elif change == "stage_list":
        stages.append({**stages[1], "name": "slim3", "attention_groups": None})
        needle = "stages[2]: (none) -> stage 'slim3' (added)"
    elif change == "accumulate":
        args, needle = ["--trainer.accumulate_grad_batches", "2"], "batch.accumulate_grad_batches: 1 -> 2"
    elif change == "world_size":  # the error comes before any process is launched
        args, needle = ["--trainer.devices", "2", "--trainer.strategy", "ddp"], "batch.world_size: 1 -> 2"
    else:
        args, needle = ["--data.init_args.batch_size", "8"], "batch.batch_size: 4 -> 8"
    recipe = clone(interrupted, tmp_path, stages=stages)
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "run").rglob("*")}
    with pytest.raises(ConfigError, match="configuration differs") as info:
        main_("--config", recipe, "--resume", "true", *args)
    assert needle in str(info.value), str(info.value)
    assert not no_weights
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "run").rglob("*")} == before


# security -----------------------------------------------------------------------------------------
class Evil:
    """Unpickling this runs code (here: it writes a marker file)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('pwned')",)


def plant(path: Path, payload, marker: Path) -> None:
    torch.save(payload, path)
    probe = path.with_name("probe.pt")  # prove the planted file really runs code when unpickled
    shutil.copy(path, probe)
    torch.load(probe, weights_only=False)
    assert marker.exists()
    marker.unlink()
    probe.unlink()


@pytest.mark.parametrize("target", ["keep.pt", "last.ckpt", "scores_file"])
def test_malicious_pickle_is_refused(tmp_path, interrupted, target):
    marker = tmp_path / "PWNED"
    stages = copy.deepcopy(STAGES)
    if target == "scores_file":
        stages[1].update(scores_file=str(tmp_path / "scores.pt"), criterion="magnitude")
        recipe = recipe_in(tmp_path, str(interrupted["teacher"]), interrupted["corpus"], stages=stages)
        plant(tmp_path / "scores.pt", {"format": "lightning_slimmoe.scores/1", "x": Evil(marker)}, marker)
        args = []
    else:
        recipe = clone(interrupted, tmp_path)
        stage = tmp_path / "run/stage_1_slim2"
        path = stage / "keep.pt" if target == "keep.pt" else stage / "checkpoints/last.ckpt"
        plant(path, {"format": "lightning_slimmoe.keep/1", "state_dict": {}, "evil": Evil(marker)}, marker)
        args = ["--resume", "true"]
    with pytest.raises(Exception) as info:
        main_("--config", recipe, *args)
    assert "Weights only load failed" in str(info.value) or "weights_only" in str(info.value), str(info.value)
    assert not marker.exists()


# Every file the project reads with torch.load, planted with a pickle that runs code when unpickled and read
# through the public function that loads it: the load fails and the code never runs.
def evil_checkpoint(marker: Path) -> dict:
    """Looks like a Lightning checkpoint; unpickling it writes ``marker``."""
    return {"state_dict": {}, "optimizer_states": [], "global_step": 2, "evil": Evil(marker)}


def test_scores_with_code_are_refused_by_importance_scores_load(tmp_path):
    """``ImportanceScores.load``: how a stage's ``scores.pt`` and a recipe's ``scores_file`` are read."""
    from lightning_slimmoe.importance import SCORES_FORMAT, ImportanceScores

    marker, path = tmp_path / "PWNED", tmp_path / "scores.pt"
    plant(path, {"format": SCORES_FORMAT, "criterion": "magnitude", "experts": {"0": Evil(marker)}}, marker)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        ImportanceScores.load(str(path))
    assert not marker.exists()


def test_recipe_scores_file_with_code_is_a_config_error(tmp_path, phimoe_teacher, corpus_file, no_weights):
    """A recipe's ``scores_file`` is read while the run is planned: the error names the stage and the file, and
    comes before any weight is loaded or anything is written."""
    from lightning_slimmoe.importance import SCORES_FORMAT
    from lightning_slimmoe.pipeline import ConfigError

    marker, scores = tmp_path / "PWNED", tmp_path / "scores.pt"
    plant(scores, {"format": SCORES_FORMAT, "criterion": "magnitude", "experts": {"0": Evil(marker)}}, marker)
    stages = [{"name": "s", "expert_width": 16, "criterion": "magnitude", "scores_file": str(scores),
               "calibration_tokens": 128, "max_tokens": 256}]
    with pytest.raises(ConfigError) as info:
        main_("--config", tiny_recipe(tmp_path, phimoe_teacher, corpus_file, stages=stages))
    message = str(info.value)
    assert "scores_file" in message and str(scores) in message and "Weights only load failed" in message, message
    assert not marker.exists() and not no_weights and not (tmp_path / "run").exists()


def test_keep_file_with_code_is_refused_on_resume(tmp_path):
    """A resumed stage re-applies its ``keep.pt`` (``StageDir.load_keep``) in ``ExpertSlimming.setup`` instead of
    re-scoring."""
    from lightning.pytorch import Trainer

    from callbacks.expert_slimming import ExpertSlimming
    from lightning_slimmoe.config import StageConfig
    from lightning_slimmoe.module import StageModule
    from lightning_slimmoe.run_dir import KEEP_FORMAT, StageDir

    marker, stage_dir = tmp_path / "PWNED", StageDir(tmp_path / "stage_1_slim2", "slim2")
    stage_dir.path.mkdir()
    plant(stage_dir.keep_file, {"format": KEEP_FORMAT, "keep": {}, "kept_experts": {}, "evil": Evil(marker)}, marker)
    module = StageModule(tiny_model("phimoe"))
    callback = ExpertSlimming(StageConfig(name="slim2", expert_width=8), stage_dir,
                              reference_config=module.student.config)
    trainer = Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        callback.setup(trainer, module, "fit")
    assert not marker.exists()
    assert module.student.config.intermediate_size == 24  # nothing was sliced


@pytest.mark.parametrize("weights_only", [None, False])
def test_checkpoint_with_code_is_refused_by_checkpoint_io(tmp_path, weights_only):
    """``AtomicCheckpointIO.load_checkpoint``: how Lightning resumes a single-process run from ``last.ckpt``;
    code is never unpickled, even when the caller asks for ``weights_only=False``."""
    from lightning_slimmoe.checkpoint_io import AtomicCheckpointIO

    marker, path = tmp_path / "PWNED", tmp_path / "last.ckpt"
    plant(path, evil_checkpoint(marker), marker)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        AtomicCheckpointIO().load_checkpoint(path, weights_only=weights_only)
    assert not marker.exists()


def test_fsdp1_checkpoint_with_code_is_refused(tmp_path):
    """``SlimFSDPStrategy.load_checkpoint``: every FSDP1 rank reads the whole student checkpoint itself."""
    from lightning_slimmoe.module import StageModule
    from lightning_slimmoe.strategies import SlimFSDPStrategy

    marker, path = tmp_path / "PWNED", tmp_path / "last.ckpt"
    plant(path, evil_checkpoint(marker), marker)
    strategy = SlimFSDPStrategy()
    strategy.connect(StageModule(tiny_model("phimoe")))
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        strategy.load_checkpoint(path)
    assert not marker.exists()


def test_sharded_checkpoint_meta_with_code_is_refused(tmp_path):
    """``AtomicModelParallelStrategy.load_checkpoint``: a sharded (DCP) checkpoint whose shards are fine but whose
    ``meta.pt`` (Lightning's loop and callback state) would run code."""
    import torch.distributed.checkpoint as dcp

    from lightning_slimmoe.module import STUDENT_PREFIX, StageModule
    from lightning_slimmoe.strategies import LIGHTNING_META, AtomicModelParallelStrategy

    marker, path = tmp_path / "PWNED", tmp_path / "last.ckpt"
    module = StageModule(tiny_model("phimoe"))
    dcp.save({"state_dict": {STUDENT_PREFIX + k: v for k, v in module.student.state_dict().items()}},
             checkpoint_id=path)
    plant(path / LIGHTNING_META, {"global_step": 2, "evil": Evil(marker)}, marker)
    strategy = AtomicModelParallelStrategy()
    strategy.connect(module)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        strategy.load_checkpoint(path)
    assert not marker.exists()


def test_custom_code_needs_trust_remote_code(tmp_path, corpus_file, no_weights):
    from lightning_slimmoe.pipeline import ConfigError

    marker = tmp_path / "PWNED"
    model = tmp_path / "custom"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({
        "model_type": "evil_moe", "architectures": ["EvilForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_evil.EvilConfig",
                     "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}}))
    code = f"open({str(marker)!r}, 'w').write('pwned')\nfrom transformers import PretrainedConfig\n" \
           "class EvilConfig(PretrainedConfig):\n    model_type = 'evil_moe'\n"
    (model / "configuration_evil.py").write_text(code)
    (model / "modeling_evil.py").write_text(code)
    recipe = tiny_recipe(tmp_path, str(model), corpus_file,
                         stages=[{"name": "s", "expert_width": 16, "calibration_tokens": 128, "max_tokens": 256}])
    with pytest.raises(ConfigError, match="trust_remote_code") as info:
        main_("--config", recipe)
    assert "custom" in str(info.value) and not marker.exists() and not (tmp_path / "run").exists()


def test_pickled_weights_are_refused(tmp_path, phimoe_teacher, corpus_file, no_weights):
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from lightning_slimmoe.pipeline import ConfigError

    teacher = tmp_path / "bin_teacher"
    teacher.mkdir()
    # transformers 5 only writes safetensors: write the legacy .bin by hand (the same tensors, pickled), without
    # building a model (no_weights forbids it)
    shutil.copy(Path(phimoe_teacher) / "config.json", teacher / "config.json")
    torch.save(load_file(Path(phimoe_teacher) / "model.safetensors"), teacher / "pytorch_model.bin")
    AutoTokenizer.from_pretrained(phimoe_teacher).save_pretrained(teacher)
    assert (teacher / "pytorch_model.bin").is_file() and not list(teacher.glob("*.safetensors"))
    recipe = tiny_recipe(tmp_path, str(teacher), corpus_file,
                         stages=[{"name": "s", "expert_width": 16, "calibration_tokens": 128, "max_tokens": 256}])
    with pytest.raises(ConfigError) as info:
        main_("--config", recipe)
    message = str(info.value)
    assert "teacher=" in message and "pytorch_model.bin" in message and "safetensors" in message
    assert not (tmp_path / "run").exists()
