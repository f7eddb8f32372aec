"""Lightning callbacks of the SlimMoE pipeline."""

from callbacks.expert_slimming import ExpertSlimming
from callbacks.monitoring import ParamAndWidthLogger, ThroughputMonitor

__all__ = ["ExpertSlimming", "ParamAndWidthLogger", "ThroughputMonitor"]
