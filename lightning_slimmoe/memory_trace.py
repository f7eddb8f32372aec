"""Measured memory per phase: what each rank really held in the phases the memory plan plans (memory.py); and
:func:`release_freed_memory`, which hands what a phase freed back to the system before the next one allocates.

Off unless ``SLIMMOE_MEMORY_TRACE=DIR`` is set. Then every rank samples its own memory every few milliseconds on a
background thread — the process's resident set (``/proc/self/statm``; the whole process: interpreter, libraries,
both models, activations, optimizer state, touched pages of memory-mapped checkpoint files) and, on CUDA, the
allocator's peak — and appends one JSON line per phase it leaves to ``DIR/rank<r>.jsonl``:

    {"stage": "width50", "phase": "score", "seconds": 41.2, "peak_rss_gib": 6.91, "start_rss_gib": 4.02,
     "peak_cuda_gib": null}

The first line (``"phase": "baseline"``) is the RSS when tracing started: the interpreter with torch, transformers
and Lightning imported, no model yet. A phase's lines are written as it ends, so a run killed for memory leaves the
phases it finished and the one it died in is the next. ``bench/memory.py`` compares the lines with the plan.

Phases (memory.py's): ``load`` (teacher and incoming student read; under FSDP2 also the sliced student read after
scoring), ``score``, ``train`` (the KD steps), ``validate`` (every validation pass, the teacher's own included)
and ``export``. The pipeline and the callbacks mark them with :func:`phase`; nested marks resume the outer phase.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import torch

GiB = 2**30
ENV = "SLIMMOE_MEMORY_TRACE"
SAMPLE_S = 0.005
_PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    """This process's resident set now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


class MemoryTrace:
    """One rank's sampler and its phase lines (module docstring)."""

    def __init__(self, path: Path, sample_s: float = SAMPLE_S):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.sample_s = sample_s
        self.stage: str | None = None
        self.current: str | None = None
        self._lock = threading.Lock()
        self._start_rss = self._peak = rss_bytes()
        self._started = time.time()
        self._write({"stage": None, "phase": "baseline", "seconds": 0.0, "peak_rss_gib": self._peak / GiB,
                     "start_rss_gib": self._peak / GiB, "peak_cuda_gib": None})
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="slimmoe-memory-trace", daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(self.sample_s):
            rss = rss_bytes()
            with self._lock:
                self._peak = max(self._peak, rss)

    def _write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in record.items()}) + "\n")

    def switch(self, phase: str | None) -> str | None:
        """Close the current phase (its line), start ``phase``; returns the phase it closed."""
        now_rss = rss_bytes()
        with self._lock:
            peak, self._peak = max(self._peak, now_rss), now_rss
            start_rss, self._start_rss = self._start_rss, now_rss
            closed, self.current = self.current, phase
            started, self._started = self._started, time.time()
        cuda = None
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            cuda = torch.cuda.max_memory_allocated() / GiB
            torch.cuda.reset_peak_memory_stats()
        if closed is not None:
            self._write({"stage": self.stage, "phase": closed, "seconds": time.time() - started,
                         "peak_rss_gib": peak / GiB, "start_rss_gib": start_rss / GiB, "peak_cuda_gib": cuda})
        return closed


_TRACE: MemoryTrace | None = None


def trace() -> MemoryTrace | None:
    """This process's trace, started on first use when ``SLIMMOE_MEMORY_TRACE`` is set; else None."""
    global _TRACE
    if _TRACE is None and os.environ.get(ENV):
        rank = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))
        _TRACE = MemoryTrace(Path(os.environ[ENV]) / f"rank{rank}.jsonl")
    return _TRACE


def set_stage(name: str | None) -> None:
    """The stage the following phases belong to (``teacher`` for the teacher's own validation)."""
    if (t := trace()) is not None:
        t.switch(None)
        t.stage = name


@contextmanager
def phase(name: str):
    """Mark ``name`` as the phase of everything inside; the enclosing phase resumes after it."""
    t = trace()
    if t is None:
        yield
        return
    outer = t.switch(name)
    try:
        yield
    finally:
        t.switch(outer)


def enter(name: str | None) -> str | None:
    """Switch to ``name`` without a block (Lightning's paired hooks); returns the phase left, for :func:`enter`
    to restore later."""
    t = trace()
    return t.switch(name) if t is not None else None


def release_freed_memory() -> None:
    """Collect garbage and return freed memory to the system: CUDA's cached blocks (``empty_cache``), and glibc's
    free heap (``malloc_trim``), which keeps the many mid-sized blocks a scoring pass frees — 0.8 GiB after scoring a
    1-layer Qwen3-30B-A3B student, resident through the whole KD phase otherwise (bench/memory.py)."""
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
