"""TeacherCacheCallback: build the teacher top-k cache once, then read the teacher's targets from it.

Runs in ``on_fit_start`` — after ``configure_model`` and the strategy set the teacher up on its device (sharded
under FSDP2), so the cache is computed by exactly the teacher forward that training steps would run — of the
first KD stage of a run whose cache is not complete yet; every later KD stage finds it complete and only checks
it. Then it attaches a reader to the StageModule: training batches (which carry ``block_index``) take their
targets from disk; validation and scoring still run the live teacher.
"""

from __future__ import annotations

import time

from lightning.pytorch import Callback
from lightning.pytorch.utilities import rank_zero_info
from tqdm.auto import tqdm

from lightning_slimmoe.teacher_cache import TeacherCache


class TeacherCacheCallback(Callback):
    def __init__(self, cache: TeacherCache, stage_name: str) -> None:
        self.cache = cache
        self.stage_name = stage_name
        self.built = False
        self.build_s = 0.0  # time spent building in this fit (the pipeline leaves it out of the stage's tokens/s)

    def on_fit_start(self, trainer, pl_module) -> None:
        started = time.perf_counter()
        top_k = self.cache.key.top_k  # the largest of the KD stages' top_k: one cache serves them all

        def targets(ids_BT):
            # The precision plugin's autocast, as around a training step: the cached numbers are the live ones.
            with trainer.precision_plugin.forward_context():
                return pl_module.teacher_targets(ids_BT.to(pl_module.device), top_k=top_k)

        if not self.cache.complete:
            rank_zero_info(f"[{self.stage_name}] teacher cache: computing the teacher's top-{top_k} for "
                           f"{len(self.cache.needed):,} training blocks into {self.cache.dir}")
        self.built = self.cache.build(
            targets, trainer.datamodule.batch_size, rank=trainer.global_rank, world_size=trainer.world_size,
            barrier=trainer.strategy.barrier, broadcast=trainer.strategy.broadcast,
            progress=lambda it: tqdm(it, desc=f"[{self.stage_name}] teacher cache", leave=False,
                                     disable=trainer.global_rank != 0))
        if self.built:
            self.build_s = time.perf_counter() - started
            info = self.cache.info()
            rank_zero_info(f"[{self.stage_name}] teacher cache written: {info['tokens']:,} tokens, "
                           f"{info['bytes'] / 2**20:,.1f} MiB in {self.build_s:.1f}s")
        pl_module.teacher_cache = self.cache.open()

    def teardown(self, trainer, pl_module, stage: str) -> None:
        pl_module.teacher_cache = None
