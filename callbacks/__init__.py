"""Lightning callbacks of the SlimMoE pipeline: slimming at the stage boundary, the teacher cache, what a stage
logs and shows (and the phases of its memory trace), the stage config, Ctrl-C / SIGTERM handling."""

from callbacks.expert_slimming import ExpertSlimming
from callbacks.monitoring import (MemoryPhases, ParamAndWidthLogger, StageModelSummary, StageProgressBar,
                                  TokenThroughput, ValidateAfterSlicing)
from callbacks.student_config import StudentConfigWriter

__all__ = ["ExpertSlimming", "MemoryPhases", "ParamAndWidthLogger", "StageModelSummary", "StageProgressBar",
           "StudentConfigWriter", "TokenThroughput", "ValidateAfterSlicing"]
