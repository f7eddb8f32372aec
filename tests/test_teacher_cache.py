"""Teacher top-k cache (lightning_slimmoe/teacher_cache.py): built once, read by every KD stage instead of the
teacher forward, with the live teacher's losses; a cache that does not match the run is refused."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import lightning_slimmoe.cli as cli
from helpers import make_teacher_dir, read_summary, tiny_recipe
from lightning_slimmoe.cli import main
from lightning_slimmoe.data import ResumableBlockStream, TextDataModule
from lightning_slimmoe.pipeline import ConfigError
from lightning_slimmoe.teacher_cache import META, TeacherCache, TeacherCacheReader, part_name


class RecordLoss(Callback):
    """Per-step train losses, keyed by (expert width, global step); fails any training step that would run the
    teacher forward (validation, between steps, still runs it)."""

    def __init__(self, forbid_teacher: bool = False):
        self.losses: dict[tuple[int, int], float] = {}
        self.forbid_teacher = forbid_teacher

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.forbid_teacher:
            def refuse(*args, **kwargs):
                raise AssertionError("a training step ran the teacher forward although the cache is attached")
            pl_module.teacher_targets = refuse

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses[(pl_module.student.config.intermediate_size, trainer.global_step)] = outputs["loss"].item()
        pl_module.__dict__.pop("teacher_targets", None)


def run(workdir: Path, teacher: str, corpus: str, *args: str, callbacks=(), stages=None, **top) -> dict:
    workdir.mkdir(parents=True, exist_ok=True)
    recipe = tiny_recipe(workdir, teacher, corpus, stages=stages, **top)
    original = cli.SlimMoECLI.make_trainer

    def make_trainer(self, extra_callbacks=(), **kw):
        return original(self, extra_callbacks=[*extra_callbacks, *callbacks], **kw)

    with pytest.MonkeyPatch.context() as mp:  # also used by module-scoped fixtures: no `monkeypatch` there
        mp.setattr(cli.SlimMoECLI, "make_trainer", make_trainer)
        return main(["--config", recipe, *args])


@pytest.fixture(scope="module")
def runs(tmp_path_factory, phimoe_teacher, corpus_file):
    """The tiny 2-stage recipe with the live teacher, and with a teacher cache (built by its first stage)."""
    root = tmp_path_factory.mktemp("cache_runs")
    live, cached = RecordLoss(), RecordLoss(forbid_teacher=True)
    run(root / "live", phimoe_teacher, corpus_file, callbacks=[live])
    summary = run(root / "cached", phimoe_teacher, corpus_file, "--teacher_cache", str(root / "cache"),
                  callbacks=[cached])
    return {"root": root, "live": live.losses, "cached": cached.losses, "summary": summary, "cache": root / "cache"}


def final_state(run_dir: Path) -> dict:
    return AutoModelForCausalLM.from_pretrained(run_dir / "final").state_dict()


def test_cached_run_gives_the_live_teachers_losses(runs):
    live, cached = runs["live"], runs["cached"]
    assert live.keys() == cached.keys() and {w for w, _ in live} == {16, 8} and len(live) == 10
    for key in live:
        assert abs(live[key] - cached[key]) <= 1e-5, (key, live[key], cached[key])
    a, b = final_state(runs["root"] / "live" / "run"), final_state(runs["root"] / "cached" / "run")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-5, msg=name)
    info = runs["summary"]["teacher_cache"]
    assert info["dir"] == str(runs["cache"]) and info["build_s"] > 0 and info["bytes_per_token"] == 48  # uint16 + fp32
    assert info["blocks"] == 40 and info["tokens"] == 40 * 32  # 10 steps x 4 samples, all distinct (one epoch)
    assert read_summary(runs["root"] / "cached" / "run")["teacher_cache"] == json.loads(json.dumps(info))


def test_a_complete_cache_is_reused_by_another_run(runs, phimoe_teacher, corpus_file, tmp_path):
    again = RecordLoss(forbid_teacher=True)
    summary = run(tmp_path, phimoe_teacher, corpus_file, "--teacher_cache", str(runs["cache"]), callbacks=[again])
    assert summary["teacher_cache"]["build_s"] == 0  # read, not rebuilt
    assert again.losses == runs["cached"]  # the same numbers from disk: identical losses
    # A run that reads fewer blocks (shorter stages) and a smaller top_k is served by the same cache.
    stages = [{"name": "s", "expert_width": 16, "calibration_tokens": 256, "max_tokens": 2 * 4 * 32,
               "kd": {"top_k": 4}}]
    short = run(tmp_path / "short", phimoe_teacher, corpus_file, "--teacher_cache", str(runs["cache"]), stages=stages)
    assert short["teacher_cache"]["build_s"] == 0


def test_cache_files_are_safetensors_and_json_read_without_pickle(runs, monkeypatch):
    cache = runs["cache"]
    names = sorted(p.name for p in cache.iterdir())
    assert names == ["blocks.safetensors", "meta.json", "part-000000.safetensors"]
    meta = json.loads((cache / META).read_text())
    for field in ("format", "teacher_fingerprint", "data_sha256", "seq_len", "top_k", "values", "value_dtype",
                  "id_dtype", "vocab_size", "teacher_dtype", "precision"):
        assert meta[field] is not None, field

    def no_pickle(*args, **kwargs):
        raise AssertionError("pickle used to read the teacher cache")

    for target, name in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")):
        monkeypatch.setattr(target, name, no_pickle)
    reader = TeacherCacheReader(cache, meta)
    values, ids = reader.lookup(reader.blocks[:3], top_k=8)
    assert values.shape == ids.shape == (3, 32, 8) and values.dtype == torch.float32 and ids.dtype == torch.int64
    assert bool((values[..., :-1] >= values[..., 1:]).all())  # the teacher's top-k, by value
    top4_values, top4_ids = reader.lookup(reader.blocks[:3], top_k=4)
    assert torch.equal(top4_values, values[..., :4]) and torch.equal(top4_ids, ids[..., :4])
    with pytest.raises(KeyError, match="not in the teacher cache"):
        reader.lookup(torch.tensor([10**6]))


# ---------------------------------------------------------------------------------------------------
# Refusals: a cache built for something else is never used, a foreign directory never written
# ---------------------------------------------------------------------------------------------------
def refused(runs, tmp_path, teacher, corpus, *args, stages=None, cache=None) -> str:
    with pytest.raises(ConfigError) as err:
        run(tmp_path, teacher, corpus, "--teacher_cache", str(cache or runs["cache"]), *args, stages=stages)
    return str(err.value)


def test_cache_of_another_teacher_is_refused_before_any_compute(runs, tmp_path, corpus_file, monkeypatch):
    other = make_teacher_dir(tmp_path / "other_teacher", "phimoe", corpus_file, seed=1)  # same tokenizer, new weights
    scored = []
    monkeypatch.setattr("callbacks.expert_slimming.compute_scores", lambda *a, **k: scored.append(1))
    message = refused(runs, tmp_path, other, corpus_file)
    assert "teacher_fingerprint" in message and "different teacher" in message
    assert not scored  # refused before scoring, before any step


@pytest.mark.parametrize("case", ["seq_len", "top_k", "values", "value_dtype", "data_sha256", "blocks"])
def test_mismatching_cache_is_refused_naming_the_field(runs, tmp_path, phimoe_teacher, corpus_file, case,
                                                       monkeypatch):
    def no_weights(*args, **kwargs):
        raise AssertionError("weights loaded before the cache was checked")

    monkeypatch.setattr("lightning_slimmoe.pipeline.load_model", no_weights)
    corpus, args, stages = corpus_file, [], None
    base = {"expert_width": 16, "calibration_tokens": 256, "max_tokens": 6 * 4 * 32}
    if case == "seq_len":
        args = ["--data.init_args.seq_len", "16"]
    elif case == "top_k":
        stages = [{"name": "s", **base, "kd": {"top_k": 16}}]
    elif case == "values":
        stages = [{"name": "s", **base, "kd": {"tail_bucket": True}}]
    elif case == "value_dtype":
        args = ["--teacher_cache_dtype", "bfloat16"]
    elif case == "data_sha256":
        corpus = str(tmp_path / "other.txt")
        Path(corpus).write_text(Path(corpus_file).read_text()[1000:])
    elif case == "blocks":
        stages = [{"name": "s", **base, "max_tokens": 20 * 4 * 32}]  # reads blocks the cache does not hold
    message = refused(runs, tmp_path, phimoe_teacher, corpus, *args, stages=stages)
    assert f"{case} of the cache is" in message and "refusing to use it" in message, message
    assert not (tmp_path / "run" / "run.json").exists()  # refused before the run's first write


def test_stages_that_need_different_caches_and_bad_directories_are_refused(runs, tmp_path, phimoe_teacher,
                                                                            corpus_file):
    base = {"expert_width": 16, "calibration_tokens": 256, "max_tokens": 128}
    stages = [{"name": "a", **base, "kd": {"tail_bucket": True}}, {"name": "b", **base, "expert_width": 8}]
    assert "disagree" in refused(runs, tmp_path / "1", phimoe_teacher, corpus_file, stages=stages,
                                 cache=tmp_path / "new_cache")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert "is no teacher cache" in refused(runs, tmp_path / "2", phimoe_teacher, corpus_file, cache=foreign)
    assert (foreign / "notes.txt").read_text() == "mine"
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    assert "is a file" in refused(runs, tmp_path / "3", phimoe_teacher, corpus_file, cache=a_file)
    with pytest.raises(SystemExit):  # a typo in the key fails at parse time, like every other key
        main(["--config", tiny_recipe(tmp_path, phimoe_teacher, corpus_file), "--teacher_cahce", "x"])


def test_incomplete_cache_is_rebuilt_never_used(runs, tmp_path, phimoe_teacher, corpus_file):
    """A copy of the cache without meta.json (a killed build), its part poisoned: the run rebuilds it."""
    partial = tmp_path / "partial"
    shutil.copytree(runs["cache"], partial)
    (partial / META).unlink()
    (partial / "building.json").write_text("{}")  # the marker a build of ours writes first
    part = load_file(str(partial / part_name(0)))
    save_file({**part, "values": torch.full_like(part["values"], 7.0)}, str(partial / part_name(0)))
    rebuilt = RecordLoss(forbid_teacher=True)
    summary = run(tmp_path, phimoe_teacher, corpus_file, "--teacher_cache", str(partial), callbacks=[rebuilt])
    assert summary["teacher_cache"]["build_s"] > 0
    assert (partial / META).is_file() and not (partial / "building.json").exists()
    for key, loss in runs["live"].items():
        assert abs(rebuilt.losses[key] - loss) <= 1e-5, key


def test_bfloat16_cache_halves_the_values_and_drifts_little(runs, tmp_path, phimoe_teacher, corpus_file):
    bf16 = RecordLoss(forbid_teacher=True)
    summary = run(tmp_path, phimoe_teacher, corpus_file, "--teacher_cache", str(tmp_path / "bf16"),
                  "--teacher_cache_dtype", "bfloat16", callbacks=[bf16])
    assert summary["teacher_cache"]["bytes_per_token"] == 32  # top-8: uint16 ids + bf16 values
    drift = max(abs(bf16.losses[key] - loss) for key, loss in runs["live"].items())
    print(f"bfloat16 teacher cache: max |train loss - live| over {len(bf16.losses)} steps = {drift:.2e}")
    assert 0 < drift < 5e-3


# ---------------------------------------------------------------------------------------------------
# The pieces: samples carry their block index; the blocks a range of samples reads
# ---------------------------------------------------------------------------------------------------
def test_training_samples_carry_their_block_index_and_block_indices_covers_them(phimoe_teacher, corpus_file):
    dm = TextDataModule(files=[corpus_file], seq_len=32, batch_size=4)
    dm.set_tokenizer(AutoTokenizer.from_pretrained(phimoe_teacher))
    dm.setup("fit")
    stream = dm.train_stream(start_sample=5)
    samples = [s for _, s in zip(range(3 * dm.num_train_blocks), stream)]
    for s in samples[:50]:
        assert torch.equal(s["input_ids"], dm.train_blocks[s["block_index"], :-1])
    batch = next(iter(dm.train_dataloader()))
    assert batch["block_index"].shape == (4,) and batch["block_index"].dtype == torch.int64
    assert set(next(iter(dm.val_dataloader()))) == {"input_ids", "labels"}  # validation runs the live teacher
    assert all("block_index" not in b for b in dm.calibration_batches(256))
    n = dm.num_train_blocks
    for start, count in ((5, 30), (n - 10, 25), (7, n), (5, 1), (n, n), (5, 2 * n)):
        expected = sorted({s["block_index"] for s in samples[start - 5:start - 5 + count]})
        assert stream.block_indices(start, count).tolist() == expected, (start, count)


def test_two_ranks_build_what_one_process_builds(tmp_path, phimoe_teacher, corpus_file, monkeypatch):
    """Rank r writes every world_size-th part, and every rank runs as many teacher forwards (a sharded teacher's
    all-gathers must line up). Two threads stand in for two ranks, with a real barrier between them."""
    import threading

    from lightning_slimmoe import teacher_cache
    from lightning_slimmoe.distill import KDConfig
    from lightning_slimmoe.module import StageModule

    monkeypatch.setattr(teacher_cache, "PART_BYTES", 5 * 32 * 48)  # 5 blocks per part: several parts
    dm = TextDataModule(files=[corpus_file], seq_len=32, batch_size=4)
    dm.set_tokenizer(AutoTokenizer.from_pretrained(phimoe_teacher))
    dm.setup("fit")
    teacher = AutoModelForCausalLM.from_pretrained(phimoe_teacher)
    module = StageModule(AutoModelForCausalLM.from_pretrained(phimoe_teacher), teacher)
    key = teacher_cache.cache_key([("s", KDConfig())], seq_len=32, vocab_size=teacher.config.vocab_size,
                                  value_dtype="float32", teacher_dtype="float32", precision="32-true")
    needed = torch.arange(0, 75, 3)  # 25 blocks -> 5 parts: rank 0 writes 3, rank 1 writes 2 (+ padding)

    def make(directory):
        cache = TeacherCache(directory, key, dm.train_blocks, needed)
        cache.check_teacher(module.teacher_fingerprint)
        return cache

    assert make(tmp_path / "one").build(module.teacher_targets, batch_size=4)
    barrier, calls, errors = threading.Barrier(2), {0: 0, 1: 0}, []

    def rank_main(rank):
        def targets(ids_BT):
            calls[rank] += 1
            return module.teacher_targets(ids_BT)
        try:
            make(tmp_path / "two").build(targets, batch_size=4, rank=rank, world_size=2, barrier=barrier.wait)
        except BaseException as err:  # noqa: BLE001 - re-raised in the main thread
            errors.append(err)
            barrier.abort()

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert calls == {0: 6, 1: 6}  # rank 0: 3 parts x 2 batches; rank 1: 2 parts x 2 batches + 2 padding forwards
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())
    for p in range(5):
        a, b = load_file(str(tmp_path / "one" / part_name(p))), load_file(str(tmp_path / "two" / part_name(p)))
        assert torch.equal(a["block_index"], b["block_index"]) and torch.equal(a["ids"], b["ids"])
        torch.testing.assert_close(a["values"], b["values"], rtol=0, atol=1e-6)
    values, ids = make(tmp_path / "two").open().lookup(torch.tensor([72, 0, 30]))
    live_values, live_ids = module.teacher_targets(dm.train_blocks[[72, 0, 30], :-1])
    torch.testing.assert_close(values.flatten(0, 1), live_values, rtol=0, atol=1e-6)
    assert torch.equal(ids.flatten(0, 1), live_ids)


def test_speed_bench_reports_the_cached_step_ratio(tmp_path):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bench import speed

    summary = speed.main(["--out", str(tmp_path / "s"), "--preset", "tiny", "--configs", "ours_topk,ours_topk_cached"])
    cached = summary["results"]["ours_topk_cached"]
    assert cached["tokens_per_s"] > 0 and cached["cache_build_tokens_per_s"] > 0 and cached["cache_bytes_per_token"] == 48
    for ratio in ("step_s", "tokens_per_s", "step_cpu_s"):
        assert summary["ratios"][f"ours_topk_cached/ours_topk_{ratio}"] > 0
    assert "| ours_topk_cached |" in (tmp_path / "s" / "speed.md").read_text()


@pytest.mark.distributed
@pytest.mark.parametrize("strategy", ["fsdp2", "fsdp1"])
def test_two_gloo_ranks_build_and_use_the_cache_like_one_process(tmp_path, corpus_file, monkeypatch, strategy):
    """FSDP2 or FSDP1 over 2 CPU processes: each rank computes its parts with the sharded teacher (rank 1 pads
    with an extra forward); the cache and the per-step losses match a single process's (within 1e-5)."""
    from helpers import FSDP1, MODEL_PARALLEL, scalars, train

    monkeypatch.setenv("SLIMMOE_CACHE_PART_BYTES", str(7 * 32 * 48))  # 7 blocks per part: 6 parts, 3 per rank
    teacher = make_teacher_dir(tmp_path / "teacher", "qwen3_moe", corpus_file)
    recipe = tiny_recipe(tmp_path, teacher, corpus_file)
    train(recipe, tmp_path / "one", "--data.init_args.batch_size", "4", "--teacher_cache", str(tmp_path / "c1"))
    train(recipe, tmp_path / "two", "--data.init_args.batch_size", "2", "--trainer.devices", "2",
          "--trainer.strategy", MODEL_PARALLEL if strategy == "fsdp2" else FSDP1, "--teacher_cache", str(tmp_path / "c2"))
    one, two = (json.loads((tmp_path / c / META).read_text()) for c in ("c1", "c2"))
    assert one["data_sha256"] == two["data_sha256"] and one["teacher_fingerprint"] == two["teacher_fingerprint"]
    assert one["num_files"] == two["num_files"] == 6
    for p in range(one["num_files"]):
        a, b = load_file(str(tmp_path / "c1" / part_name(p))), load_file(str(tmp_path / "c2" / part_name(p)))
        assert torch.equal(a["block_index"], b["block_index"]) and torch.equal(a["ids"], b["ids"])
        torch.testing.assert_close(a["values"], b["values"], rtol=0, atol=1e-5)
    loss_one, loss_two = scalars(tmp_path / "one" / "tb", "train/loss"), scalars(tmp_path / "two" / "tb", "train/loss")
    assert loss_one.keys() == loss_two.keys() and len(loss_one) >= 8
    for step in loss_one:
        assert abs(loss_one[step] - loss_two[step]) <= 1e-5, (step, loss_one[step], loss_two[step])
