"""CheckpointOnSignal: Ctrl-C (SIGINT) or a SIGTERM (preemption, ``scancel``, ``kill``, a container stop) ends a stage
cleanly, on every rank, even when only one rank received it: one checkpoint, the command that resumes, a non-zero exit.

Lightning's own handling loses work or deadlocks. On Ctrl-C it catches the ``KeyboardInterrupt`` in
``_call_and_handle_interrupt`` and exits with status 1, saving nothing: everything since the last periodic checkpoint
is lost. Its SIGTERM handler runs a ``broadcast`` *inside the signal handler* (a collective issued at an arbitrary
point on one rank only) and each rank raises at the end of a batch when *it* saw the signal, so a signal that reaches
one rank leaves the others waiting in a collective (a deadlock). During training this callback therefore replaces both
handlers with one that only records the signal (no collective, no I/O: a handler runs between any two bytecodes of
the main thread, possibly inside a write), and at the end of every training batch — the same point on every rank —
the ranks agree whether any of them was signalled (one all-reduce of the signal number, max). If so, every rank
writes its part of exactly one checkpoint, the stage's ``last.ckpt`` (what ``--resume true`` continues from; written
atomically), rank 0 prints the exact command that resumes, and every process exits with 128 + the signal number
(130 for SIGINT, 143 for SIGTERM) so that shells, schedulers and scripts see the run as not finished. A signal that
arrives after the last batch end is acted on in ``on_train_end`` the same way, not dropped. Lightning restores the
previous handlers when the fit ends.

A second Ctrl-C while the first is pending ends the process at once: the first one puts SIGINT's default action
back, so the kernel terminates the process even inside a long step or a collective (where a Python-level handler
would only run once control returns to the interpreter). Nothing is half-written under a final name — every file is
written to a temporary name and renamed (storage.py) — so this is as safe as a ``kill -9``: the resume starts from
the last complete checkpoint. (Under torchrun the ranks are in their own session and torchrun forwards one signal per
Ctrl-C; Lightning's own launcher and a terminal deliver one to every rank.)

Outside a fit (loading, scoring, exporting) a SIGTERM keeps its default action and Ctrl-C raises KeyboardInterrupt;
the atomic writes make that safe and the resume redoes the unfinished part.
"""

from __future__ import annotations

import signal

import torch
from lightning.pytorch import Callback
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

SIGNALS = (signal.SIGINT, signal.SIGTERM)


def exit_code(signum: int) -> int:
    """The shell convention for a process ended by a signal: 130 for SIGINT, 143 for SIGTERM."""
    return 128 + int(signum)


class CheckpointOnSignal(Callback):
    def __init__(self, ckpt_path: str, resume_command: str | None = None):
        self.ckpt_path = ckpt_path
        self.resume_command = resume_command  # shown to the user; None: only "--resume true" is named
        self.received = 0  # the first signal received during this fit (0: none)

    def on_train_start(self, trainer, pl_module) -> None:
        # Lightning registered its handlers right before the training loop started; replace them.
        self.received = 0
        for signum in SIGNALS:
            signal.signal(signum, self._note_signal)

    def _note_signal(self, signum, frame) -> None:
        self.received = self.received or int(signum)  # no collective, no I/O here: the ranks agree at the batch end
        if signum == signal.SIGINT:  # a second Ctrl-C ends the process at once (module docstring)
            signal.signal(signal.SIGINT, signal.SIG_DFL)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._stop_if_signalled(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        self._stop_if_signalled(trainer)  # a signal after the last batch end still stops the run

    def _stop_if_signalled(self, trainer) -> None:
        # One collective per step on every rank; the highest signal number wins (SIGTERM, a preemption, over SIGINT),
        # so every rank exits with the same status.
        signum = int(trainer.strategy.reduce(torch.tensor(self.received, device=trainer.strategy.root_device),
                                             reduce_op="max"))
        if not signum:
            return
        trainer.save_checkpoint(self.ckpt_path)  # collective under a sharded strategy: every rank is here
        name = signal.Signals(signum).name
        how = f"resume with: {self.resume_command}" if self.resume_command else "continue with --resume true"
        rank_zero_info(f"{name}: saved {self.ckpt_path} at global step {trainer.global_step}; {how}")
        # A SystemExit: its code is the process's exit status (Lightning tears the fit down first). SIGTERM raises
        # Lightning's own subclass, which on_exception callbacks may look for.
        raise (SIGTERMException if signum == signal.SIGTERM else SystemExit)(exit_code(signum))
