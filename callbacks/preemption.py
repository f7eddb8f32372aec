"""CheckpointOnSigterm: a SIGTERM (preemption, ``scancel``, ``kill``, a container stop) ends a stage cleanly,
on every rank, even when only one rank received it.

Lightning's own SIGTERM handling is not safe with several ranks: its handler runs a ``broadcast`` *inside
the signal handler* (a collective issued at an arbitrary point on one rank only) and each rank raises at
the end of a batch when *it* saw the signal, so a signal that reaches one rank leaves the others waiting in
a collective (a deadlock). During training this callback therefore replaces that handler with one that
only records the signal, and at the end of every training batch — the same point on every rank — the ranks
agree whether any of them was signalled (one all-reduce of a boolean). If so, every rank writes its part
of exactly one checkpoint, the stage's ``last.ckpt`` (what ``--resume true`` continues from; written
atomically), and the process exits with status 143 (128 + SIGTERM) so that schedulers and scripts see the
run as not finished. Lightning restores the previous handler when the fit ends.

Outside a fit (loading, scoring, exporting) a SIGTERM keeps its default action; the atomic writes make that
safe and the resume redoes the unfinished part.
"""

from __future__ import annotations

import signal

from lightning.pytorch import Callback
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

EXIT_CODE = 128 + int(signal.SIGTERM)


class CheckpointOnSigterm(Callback):
    def __init__(self, ckpt_path: str):
        self.ckpt_path = ckpt_path
        self.received = False

    def on_train_start(self, trainer, pl_module) -> None:
        # Lightning registered its handlers right before the training loop started; replace the SIGTERM one.
        self.received = False
        signal.signal(signal.SIGTERM, self._note_sigterm)

    def _note_sigterm(self, signum, frame) -> None:
        self.received = True  # no collective, no I/O here: the ranks agree at the next batch end

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not trainer.strategy.reduce_boolean_decision(self.received, all=False):
            return
        trainer.save_checkpoint(self.ckpt_path)  # collective under a sharded strategy: every rank is here
        rank_zero_info(f"SIGTERM: saved {self.ckpt_path} at global step {trainer.global_step}; "
                       "continue with --resume true")
        raise SIGTERMException(EXIT_CODE)  # a SystemExit: its code is the process's exit status
