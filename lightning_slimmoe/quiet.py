"""Console output a user wants: the stage, its steps, losses and throughput — not what is expected and harmless.

Silenced, each for its reason: Lightning's note that some modules are in eval mode (the frozen teacher is, by
design, docs/design.md §4), its note that a resumed stage's checkpoint directory is not empty, its advertisement
of optional logger and checkpoint packages, and its device report after the first Trainer of the run.
"""

from __future__ import annotations

import logging
import warnings

_EXPECTED_WARNINGS = (
    r"Found \d+ module\(s\) in eval mode",  # the frozen teacher, every stage
    r"Checkpoint directory .* exists and is not empty",  # a resumed stage continues in its checkpoints/
    r".*isinstance\(treespec, LeafSpec\)",  # inside Lightning itself, nothing a user can change
    r".*LightningCLI's args parameter is intended.*",  # we pass args on purpose (sys.argv must stay intact)
)


class _DropTips(logging.Filter):
    """Lightning's package tips, and the device report after the first of the run's Trainers (one per stage)."""

    def __init__(self):
        super().__init__()
        self.said: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "Tip:" in message or "litlogger" in message.lower():
            return False
        if message.startswith(("GPU available", "TPU available", "HPU available")):
            if message in self.said:
                return False
            self.said.add(message)
        return True


def quiet_lightning() -> None:
    for pattern in _EXPECTED_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    for name in ("lightning.pytorch", "lightning.fabric", "lightning.pytorch.utilities.rank_zero",
                 "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropTips) for f in logger.filters):
            logger.addFilter(_DropTips())
