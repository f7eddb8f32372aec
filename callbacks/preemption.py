"""CheckpointOnSigterm: a SIGTERM (preemption, ``scancel``, ``kill``, a container stop) ends a stage cleanly.

Lightning's signal connector notes the SIGTERM, lets the running optimizer step finish and then raises
``SIGTERMException`` from the loop on every rank. This callback then writes exactly one checkpoint, the stage's
``last.ckpt`` (the one ``--resume true`` continues from; written atomically by ``AtomicCheckpointIO``), and makes
the process exit with status 143 (128 + SIGTERM) so that schedulers and scripts see the run as not finished.
A SIGTERM outside a fit (while exporting, between stages) keeps its default action; the atomic writes make
that safe, and the resume redoes the unfinished part.
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

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException) or trainer.state.fn != "fit":
            return
        trainer.save_checkpoint(self.ckpt_path)  # collective under a distributed strategy: every rank is here
        rank_zero_info(f"SIGTERM: saved {self.ckpt_path} at global step {trainer.global_step}; "
                       "continue with --resume true")
        exception.code = EXIT_CODE  # SIGTERMException is a SystemExit; its code is the process's exit status
