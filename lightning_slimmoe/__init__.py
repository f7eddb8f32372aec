"""lightning_slimmoe: SlimMoE (arXiv 2506.18349) on PyTorch Lightning and Hugging Face transformers.

Compress a Mixture-of-Experts LLM by slimming every expert's FFN width and pruning whole GQA
attention groups, stage by stage, each stage recovered by knowledge distillation from the frozen
original teacher.
"""

__version__ = "0.1.0"
