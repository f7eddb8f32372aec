"""One rank of tests/test_loading.py::test_two_ranks_never_hold_the_whole_model (started by torchrun, gloo).

Runs the sharded path of a stage on a checkpoint: teacher and student built on meta, sharded and loaded by
``StageModule.configure_model``; the sharded student scored (kd_taylor against the sharded teacher); the
sliced student loaded from the checkpoint with the keep indices; streamed export. Writes this rank's peak-RSS
growth after each phase (bytes, over the RSS after imports) to ``<out>/rank<r>.json``.
"""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from callbacks.expert_slimming import ExpertSlimming  # noqa: E402
from lightning_slimmoe.distill import KDConfig  # noqa: E402
from lightning_slimmoe.export import export_sharded_hf  # noqa: E402
from lightning_slimmoe.importance import compute_scores  # noqa: E402
from lightning_slimmoe.config import ParallelConfig  # noqa: E402
from lightning_slimmoe.distributed import fsdp_mesh, shard_model  # noqa: E402
from lightning_slimmoe.loading import PendingLoad, materialize_, meta_model, pending_load  # noqa: E402
from lightning_slimmoe.module import StageModule, model_fingerprint  # noqa: E402
from lightning_slimmoe.slimming import resolve_target, select_keep  # noqa: E402


def status() -> dict[str, int]:
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return {k: int(fields[k].split()[0]) * 1024 for k in ("VmRSS", "RssAnon", "RssFile")}


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def main(source: str, out: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    ids = torch.randint(0, 512, (2, 17))
    batches = [{"input_ids": ids[:, :-1], "labels": ids[:, 1:]}]

    # The teacher first, alone, exactly as configure_model does it: shard on meta, then read this rank's rows.
    teacher = meta_model(source, torch.float32)
    teacher.slimmoe_fingerprint = model_fingerprint(teacher)  # as the pipeline: from the checkpoint, before sharding
    shard_model(teacher, fsdp_mesh(torch.device("cpu")), ParallelConfig(), trainable=False)
    # Baseline: after imports and the one-off set-up (model classes, process group, FSDP on meta: no weights yet).
    base = peak_rss()
    report = {"base_rss": base}
    materialize_(teacher, "cpu")
    report["teacher_growth"] = peak_rss() - base
    module = StageModule(meta_model(source, torch.float32), teacher, kd=KDConfig(top_k=8))
    del teacher
    module._device_mesh = object()  # what ModelParallelStrategy sets: configure_model shards (fsdp_mesh)
    module.configure_model()  # the student (the teacher is already done: idempotent)
    assert pending_load(module.student) is None and pending_load(module.teacher) is None
    report["load_growth"] = peak_rss() - base  # teacher + student, each rank its half

    scores = compute_scores(module.student, batches, "kd_taylor", teacher=module.teacher, kd=KDConfig(top_k=8))
    target = resolve_target(module.student.config, expert_width=48, attention_groups=2)
    keep = select_keep(scores, target)
    report["scoring_growth"] = peak_rss() - base

    ExpertSlimming._load_student(module, PendingLoad(source=source), keep=keep, configure=True)
    export_sharded_hf(module.student, out_dir / "hf", stock_check_max_bytes=0)  # the big-model check path
    report["peak_growth"] = peak_rss() - base
    if rank == 0:
        torch.save(keep.to_dict(), out_dir / "keep.pt")
    report["end"] = status()
    (out_dir / f"rank{rank}.json").write_text(json.dumps(report))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
