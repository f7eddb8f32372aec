"""One rank of tests/test_loading.py::test_sharded_scores_equal_single_process (torchrun, gloo).

For every tiny model dir given: teacher and student built on meta, sharded and loaded (StageModule.configure_model),
then scored with every criterion on the same calibration batches on every rank; rank 0 saves the scores.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import random_batch  # noqa: E402
from lightning_slimmoe.distill import KDConfig  # noqa: E402
from lightning_slimmoe.importance import CRITERIA, compute_scores, expert_saliency  # noqa: E402
from lightning_slimmoe.loading import meta_model  # noqa: E402
from lightning_slimmoe.module import StageModule, model_fingerprint  # noqa: E402


def main(out: str, *sources: str) -> None:
    dist.init_process_group("gloo")
    batches = [random_batch(seed=s) for s in range(3)]
    results = {}
    for source in sources:
        teacher = meta_model(source + "/teacher", torch.float32)
        teacher.slimmoe_fingerprint = model_fingerprint(teacher)
        module = StageModule(meta_model(source + "/student", torch.float32), teacher)
        module._device_mesh = object()  # as ModelParallelStrategy: configure_model shards
        module.configure_model()
        results[source] = {criterion: compute_scores(module.student, batches, criterion, teacher=module.teacher,
                                                     kd=KDConfig(top_k=5, temperature=2.0), seed=3).__dict__
                           for criterion in CRITERIA}
        results[source]["saliency"] = expert_saliency(module.student, batches)
    if dist.get_rank() == 0:
        torch.save(results, out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
