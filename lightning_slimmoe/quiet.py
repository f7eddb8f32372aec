"""Console output a user wants: the stage, its steps, losses and throughput — not what is expected and harmless.

Silenced, each for its reason: Lightning's note that some modules are in eval mode (the frozen teacher is, by
design, docs/design.md §4), its note that a resumed stage's checkpoint directory is not empty, its advertisement
of optional logger and checkpoint packages, its device report after the first Trainer of the run (and the lines of
devices that are absent), the seed message of every rank but rank 0, its advice to ``sync_dist`` metrics that are
already global, a deprecation inside its own ``all_gather``, and transformers' per-load progress bars ("Loading
weights" three times at every stage boundary, "Writing model shards" at every export).
"""

from __future__ import annotations

import logging
import re
import warnings

from lightning.pytorch.utilities import rank_zero_only

_EXPECTED_WARNINGS = (
    r"Found \d+ module\(s\) in eval mode",  # the frozen teacher, every stage
    r"Checkpoint directory .* exists and is not empty",  # a resumed stage continues in its checkpoints/
    r".*isinstance\(treespec, LeafSpec\)",  # inside Lightning itself, nothing a user can change
    r".*LightningCLI's args parameter is intended.*",  # we pass args on purpose (sys.argv must stay intact)
    # Several ranks: val/* are torchmetrics values, computed over every rank; train/* are means of the losses that
    # training_step all-gathers. A sync_dist all-reduce would average numbers that are equal already.
    r"It is recommended to use `self\.log\('(val|train)/",
    # Lightning's own LightningModule.all_gather calls it (training_step gathers the losses through it)
    r"torch\.distributed\.nn\.functional\.all_gather is deprecated",
)

# "GPU available: False, used: False", "TPU available: False, using: 0 TPU cores": a device that is not there
_ABSENT_DEVICE = re.compile(r"^[A-Z]PU available: False")


class _DropTips(logging.Filter):
    """Lightning's package tips, the device report after the first of the run's Trainers (one per stage) and the
    lines of absent devices, the model-summary note of our own summary callback, and every rank's seed message
    but rank 0's."""

    def __init__(self):
        super().__init__()
        self.said: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "Tip:" in message or "litlogger" in message.lower():
            return False
        if message.startswith(("GPU available", "TPU available", "HPU available")):
            if message in self.said or _ABSENT_DEVICE.match(message):
                return False
            self.said.add(message)
        if message.startswith("Trainer already configured with model summary callbacks"):
            return False  # ours (cli.SlimMoECLI.make_trainer): the summary without its always-zero FLOPs
        if "Seed set to" in message and rank_zero_only.rank != 0:
            return False
        return True


def quiet_lightning() -> None:
    for pattern in _EXPECTED_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    for name in ("lightning.pytorch", "lightning.fabric", "lightning.pytorch.utilities.rank_zero",
                 "lightning.fabric.utilities.rank_zero", "lightning.fabric.utilities.seed"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropTips) for f in logger.filters):
            logger.addFilter(_DropTips())
    # transformers' tqdm bars of every from_pretrained / save_pretrained: a run loads and saves whole models at every
    # stage boundary, and the stage's own log lines say what is loaded and written.
    from transformers.utils import logging as transformers_logging
    transformers_logging.disable_progress_bar()
