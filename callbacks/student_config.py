"""StudentConfigWriter: the stage's (slimmed) student config in the stage dir, written when the fit starts."""

from __future__ import annotations

from lightning.pytorch import Callback

from lightning_slimmoe.hf_dir import hf_architecture
from lightning_slimmoe.run_dir import StageDir


class StudentConfigWriter(Callback):
    """Writes the student's config (after slimming: ``on_fit_start`` runs after ExpertSlimming.setup and
    configure_model) to ``<stage_dir>/config.json`` on rank 0. It is what makes a sharded checkpoint of the stage
    readable on its own (``export``): DCP stores tensors, not the architecture."""

    def __init__(self, stage_dir: StageDir):
        self.stage_dir = stage_dir

    def on_fit_start(self, trainer, pl_module) -> None:
        if trainer.global_rank == 0:
            self.stage_dir.write_student_config(pl_module.student.config, hf_architecture(pl_module.student))
