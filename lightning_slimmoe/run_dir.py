"""The run directory: every path and file name a run leaves (docs/design.md §3), and the only writer of each file.

    <output_dir>/
      run.json                      RunDir.start (checked by RunDir.check on --resume)
      tokenizer/                    a pretrain run's trained tokenizer (RunDir.start)
      stage_<k>_<name>/             StageDir
        checkpoints/                Lightning checkpoints (written by Lightning through strategies.py); once the
                                    stage is complete only last.ckpt (StageDir.remove_step_checkpoints)
        scores.pt                   StageDir.save_scores
        keep.pt                     StageDir.save_keep (re-applied on resume: StageDir.load_keep)
        meta.json                   StageDir.record_slimmed, then StageDir.record_complete
        config.json                 StageDir.write_student_config (what makes a sharded checkpoint readable alone)
        hf/                         the stage's export (export.py writes it here)
      tb/                           TensorBoard events
      final/                        RunDir.write_final
      summary.json                  RunDir.write_summary

Everything is written atomically (storage.py); rank 0 writes, the other ranks only read.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from lightning_slimmoe.config import ConfigError
from lightning_slimmoe.slimming import KeepIndices
from lightning_slimmoe.storage import atomic_dir, atomic_torch_save, write_json_atomic, write_text_atomic

KEEP_FORMAT = "lightning_slimmoe.keep/1"


class StageDir:
    """``<output_dir>/stage_<k>_<name>/``."""

    def __init__(self, path: str | Path, name: str):
        self.path = Path(path)
        self.name = name
        self.checkpoints = self.path / "checkpoints"
        self.last_checkpoint = self.checkpoints / "last.ckpt"
        self.hf = self.path / "hf"
        self.meta_file = self.path / "meta.json"
        self.keep_file = self.path / "keep.pt"
        self.scores_file = self.path / "scores.pt"
        self.config_file = self.path / "config.json"

    @classmethod
    def of_checkpoint(cls, checkpoint: str | Path) -> "StageDir":
        """The stage dir a checkpoint (``<stage_dir>/checkpoints/<name>.ckpt``) lies in."""
        path = Path(checkpoint).resolve().parent.parent
        return cls(path, path.name.split("_", 2)[-1])

    # --- meta.json ---------------------------------------------------------------------------------
    def read_meta(self) -> dict:
        return json.loads(self.meta_file.read_text()) if self.meta_file.exists() else {}

    def is_complete(self) -> bool:
        return self.read_meta().get("status") == "complete" and self.hf.is_dir()

    def _write_meta(self, meta: dict) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.meta_file, meta)

    def record_slimmed(self, **fields) -> None:
        """The slice is decided (written with ``keep.pt``): criterion, widths before/after, hash, timings."""
        self._write_meta({"stage": self.name, "status": "slimmed", **fields})

    def record_complete(self, **fields) -> None:
        """The stage is done and exported: what ``record_slimmed`` wrote plus the stage's result."""
        self._write_meta({**(self.read_meta() or {"stage": self.name}), "status": "complete", **fields})

    # --- checkpoints/ --------------------------------------------------------------------------------
    def step_checkpoints(self) -> list[Path]:
        """ModelCheckpoint's ``stepNNNNNNN.ckpt`` (files, or directories when sharded)."""
        return sorted(self.checkpoints.glob("step*.ckpt")) if self.checkpoints.is_dir() else []

    def remove_step_checkpoints(self) -> list[Path]:
        """A complete stage keeps one checkpoint, ``last.ckpt`` (what ``--resume`` and ``export`` read): its
        ``stepNNNNNNN.ckpt`` is the same state (ModelCheckpoint keeps only its latest, written with ``last.ckpt``),
        and keeping both doubles what the stage's checkpoints take on disk. The caller checks that the stage is
        complete and that ``last.ckpt`` is. Returns what was removed."""
        removed = self.step_checkpoints()
        for path in removed:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
        return removed

    # --- keep.pt / scores.pt / config.json ---------------------------------------------------------
    def has_keep(self) -> bool:
        return self.keep_file.exists()

    def save_keep(self, keep: KeepIndices, kept_experts: dict[int, torch.Tensor] | None) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_torch_save({"format": KEEP_FORMAT, "keep": keep.to_dict(),
                           "kept_experts": {str(k): v for k, v in (kept_experts or {}).items()}}, self.keep_file)

    def load_keep(self) -> tuple[KeepIndices, dict[int, torch.Tensor]]:
        saved = torch.load(self.keep_file, map_location="cpu", weights_only=True)  # never unpickle code
        if not isinstance(saved, dict) or saved.get("format") != KEEP_FORMAT:
            raise ValueError(f"{self.keep_file} is not a lightning_slimmoe keep-indices file")
        return KeepIndices.from_dict(saved["keep"]), {int(k): v for k, v in saved["kept_experts"].items()}

    def save_scores(self, scores) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        scores.save(str(self.scores_file))

    def write_student_config(self, config, architecture: str) -> None:
        """The stage's (slimmed) student config with the class ``save_pretrained`` records: DCP checkpoints store
        tensors, not the architecture, so this is what ``export`` builds the student from."""
        import copy

        config = copy.deepcopy(config)
        config.architectures = [architecture]
        self.path.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.config_file, config.to_json_string(use_diff=True))


class RunDir:
    """``<output_dir>/`` of a run with the given stage names."""

    def __init__(self, output_dir: str | Path, stage_names: list[str] | None = None):
        self.path = Path(output_dir)
        self.stages = [StageDir(self.path / f"stage_{k}_{name}", name) for k, name in enumerate(stage_names or [])]
        self._created: list[Path] | None = None  # by a new run's start(): what discard_unstarted may remove

    @classmethod
    def of_stage(cls, stage_dir: StageDir) -> "RunDir":
        return cls(stage_dir.path.parent)

    run_file = property(lambda self: self.path / "run.json")
    summary_file = property(lambda self: self.path / "summary.json")
    tokenizer_dir = property(lambda self: self.path / "tokenizer")
    tb_dir = property(lambda self: self.path / "tb")
    final_dir = property(lambda self: self.path / "final")

    # --- run.json ----------------------------------------------------------------------------------
    def read_record(self) -> dict:
        if not self.run_file.is_file():
            raise ConfigError(f"no {self.run_file.name} in {str(self.path)!r}: not the directory of a run")
        return json.loads(self.run_file.read_text())

    def check(self, record: dict, resume: bool, allow_data_change: bool = False) -> list[str]:
        """Read-only: a bad ``--resume`` or an output_dir holding another run fails before any work. Without a
        ``batch`` / ``data`` entry in ``record`` the saved one is not compared (they are only known once the data
        is set up; a run saved before data identities were recorded has none). A resume on other data (another
        corpus, tokenizer, ``seq_len``) is refused with the differences, unless ``allow_data_change``: then the
        differences are returned (for the resumed stages' meta.json)."""
        if not resume:
            if self.run_file.exists() and self.has_progress():
                raise ConfigError(f"output_dir={str(self.path)!r} already holds a run; pass `--resume true` to "
                                  "continue it, or choose another output_dir (nothing is overwritten)")
            if self.run_file.exists():  # a run killed before its first stage wrote anything (no chance to clean up)
                raise ConfigError(f"output_dir={str(self.path)!r} already holds a run that has not started a stage "
                                  "(killed before it, or still loading the teacher in another process); if none is "
                                  "running, delete that output_dir or pass `--resume true` to start it with the same "
                                  "configuration, or choose another output_dir (nothing is overwritten)")
            return []
        if not self.run_file.exists():
            raise ConfigError(f"--resume: no run to resume in output_dir={str(self.path)!r} "
                              f"(no {self.run_file.name})")
        saved, now = self.read_record(), dict(record)
        for key in ("batch", "data", "precision"):  # known once data and Trainer are set up; absent in older runs
            if key not in now or key not in saved:
                saved.pop(key, None), now.pop(key, None)
        data_diff = config_diff(saved.pop("data", None), now.pop("data", None), "data")
        diff = config_diff(saved, now)
        if diff:
            raise ConfigError(f"--resume: the configuration differs from the run in {self.path} "
                              f"(saved -> now): {'; '.join(diff[:20])}. Resume with the same stages, or start "
                              "a new output_dir")
        if data_diff and not allow_data_change:
            raise ConfigError(f"--resume: the data differs from what the run in {self.path} trained on (saved -> now): "
                              f"{'; '.join(diff_line[:300] for diff_line in data_diff[:10])}. Resume with the same "
                              "corpus and tokenizer, or set `resume_allow_data_change: true` to continue on this "
                              "data (recorded in the stages' meta.json)")
        return data_diff

    def start(self, record: dict, resume: bool, tokenizer=None, allow_data_change: bool = False) -> list[str]:
        """The first write of a run (rank 0), once everything was validated: ``run.json`` of a new run, and the
        tokenizer a pretrain run trained (saved once; a resume finds it). Returns the accepted data differences of
        a resume (:meth:`check`)."""
        data_change = self.check(record, resume, allow_data_change)
        if not resume:
            # What this new run creates, all of it absent now: the only paths discard_unstarted may remove.
            self._created = [p for p in (self.path, self.tokenizer_dir, self.tb_dir, *(s.path for s in self.stages))
                             if not p.exists()]
            self.path.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.run_file, record)
        if tokenizer is not None:
            with atomic_dir(self.tokenizer_dir) as tmp:
                tokenizer.save_pretrained(tmp)
        return data_change

    def has_progress(self) -> bool:
        """Whether any stage has written a file (scores, keep indices, meta.json, its config at the start of its fit,
        a checkpoint, a partial write, an export) or the run has ended: from then on the run holds work to keep."""
        return (self.summary_file.exists() or self.final_dir.exists()
                or any(p.is_file() for stage in self.path.glob("stage_*") for p in stage.rglob("*")))

    def discard_unstarted(self) -> bool:
        """After a new run (rank 0's :meth:`start`) failed: if no stage has written anything, remove what the run
        created (``run.json``, and ``tokenizer/``, ``tb/``, the empty stage dirs and ``output_dir`` itself where
        they were absent before it started), so that the same command can be run again. Anything else is left, e.g.
        a ``teacher_cache`` kept below ``output_dir``. Returns whether it removed the run."""
        created = self._created
        if created is None or self.has_progress():
            return False
        try:  # best effort: the failure that brought us here is the error to report, not this
            self.run_file.unlink(missing_ok=True)
            for path in created:
                if path != self.path:
                    shutil.rmtree(path, ignore_errors=True)
            if self.path in created and not any(self.path.iterdir()):
                self.path.rmdir()
        except OSError:
            pass
        self._created = None
        return True

    # --- the end of a run ----------------------------------------------------------------------------
    def write_final(self, source: Path, model_card: str) -> Path:
        """``final/``: the last stage's export plus the model card."""
        with atomic_dir(self.final_dir, what="final model") as tmp:
            shutil.copytree(source, tmp, dirs_exist_ok=True)
            (tmp / "README.md").write_text(model_card)
        return self.final_dir

    def write_summary(self, summary: dict) -> None:
        write_json_atomic(self.summary_file, summary)


def config_diff(saved, now, path: str = "") -> list[str]:
    """Leaf-by-leaf differences, e.g. ``stages[1].max_tokens: 512 -> 1024``."""
    if isinstance(saved, dict) and isinstance(now, dict):
        return [d for k in sorted(set(saved) | set(now), key=str)
                for d in config_diff(saved.get(k), now.get(k), f"{path}.{k}" if path else str(k))]
    if isinstance(saved, list) and isinstance(now, list):  # e.g. a stage added or removed: name it, no dump
        brief = lambda x: f"stage {x['name']!r}" if isinstance(x, dict) and "name" in x else json.dumps(x)
        return ([d for i, (a, b) in enumerate(zip(saved, now)) for d in config_diff(a, b, f"{path}[{i}]")]
                + [f"{path}[{i}]: {brief(saved[i])} -> (removed)" for i in range(len(now), len(saved))]
                + [f"{path}[{i}]: (none) -> {brief(now[i])} (added)" for i in range(len(saved), len(now))])
    return [] if saved == now else [f"{path}: {json.dumps(saved)} -> {json.dumps(now)}"]
