"""What happens with damaged weights, full disks and changed data: each is named before (or instead of) a
traceback, nothing but the intended files is written, and a resume either reproduces the run or is refused."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import tiny_recipe
from lightning_slimmoe import storage
from lightning_slimmoe.cli import main
from lightning_slimmoe.config import ConfigError

STAGES = [{"name": "slim1", "expert_width": 16, "calibration_tokens": 128, "max_tokens": 2 * 4 * 32}]


def tree(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")) if path.exists() else []


# --- damaged weights are named before anything is written ------------------------------------------
def damaged_copy(src: str, dst: Path, damage) -> str:
    shutil.copytree(src, dst)
    damage(dst)
    return str(dst)


def truncate_last_bytes(d: Path):
    f = d / "model.safetensors"
    os.truncate(f, f.stat().st_size - 64)


def garbage_header(d: Path):
    (d / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}" + b"\0" * 64)


def sharded(d: Path, drop_shard: bool = False, drop_tensor: bool = False, bad_index: bool = False):
    state = load_file(str(d / "model.safetensors"))  # the teacher's own tensors, split into two shards
    (d / "model.safetensors").unlink()
    keys = sorted(state)
    half = len(keys) // 2
    parts = {"model-00001-of-00002.safetensors": keys[:half], "model-00002-of-00002.safetensors": keys[half:]}
    for file, names in parts.items():
        save_file({k: state[k].contiguous() for k in names if not (drop_tensor and k == names[-1])}, str(d / file))
    index = {"metadata": {}, "weight_map": {k: f for f, names in parts.items() for k in names}}
    (d / "model.safetensors.index.json").write_text("{oops" if bad_index else json.dumps(index))
    if drop_shard:
        (d / "model-00002-of-00002.safetensors").unlink()


@pytest.mark.parametrize("damage, expected", [
    (truncate_last_bytes, r"model\.safetensors: truncated: [\d,]+ bytes, its header describes"),
    (garbage_header, r"model\.safetensors: .*not a safetensors|model\.safetensors: header length"),
    (lambda d: sharded(d, drop_shard=True), r"model-00002-of-00002\.safetensors: missing"),
    (lambda d: sharded(d, drop_tensor=True), r"model-00001-of-00002\.safetensors: lacks 1 tensors"),
    (lambda d: sharded(d, bad_index=True), r"model\.safetensors\.index\.json: not a valid safetensors index"),
], ids=["truncated", "garbage_header", "missing_shard", "missing_tensor", "bad_index"])
def test_damaged_teacher_is_named_before_anything_is_written(tmp_path, phimoe_teacher, corpus_file, no_weights,
                                                            damage, expected):
    teacher = damaged_copy(phimoe_teacher, tmp_path / "teacher", damage)
    recipe = tiny_recipe(tmp_path, teacher, corpus_file, stages=STAGES)
    with pytest.raises(ConfigError, match=expected) as err:
        main(["--config", recipe])
    assert "teacher=" in str(err.value) and "damaged weights" in str(err.value)
    assert tree(tmp_path / "run") == [] and not no_weights  # no run.json, no weight was read


def test_intact_sharded_teacher_passes_the_check(tmp_path, phimoe_teacher):
    teacher = damaged_copy(phimoe_teacher, tmp_path / "teacher", sharded)
    assert storage.model_weights_problem(teacher) is None


# --- full disks and failing writes --------------------------------------------------------------
class FullDiskTorch:
    """``torch`` for storage.py whose save writes a little, then finds the disk full."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def save(obj, f):
        f.write(b"\0" * 1024)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_disk_full_checkpoint_write_is_one_clear_error_and_keeps_the_previous(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    storage.atomic_torch_save({"global_step": 2}, path, what="checkpoint")
    monkeypatch.setattr(storage, "torch", FullDiskTorch())
    with pytest.raises(storage.StorageError) as err:
        storage.atomic_torch_save({"global_step": 4}, path, what="checkpoint")
    message = str(err.value.strerror)
    assert err.value.errno == errno.ENOSPC and "\n" not in message
    assert message.startswith(f"no space left on the device writing checkpoint {path}") and "MiB free on" in message
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"global_step": 2}  # the previous checkpoint is intact
    assert tree(tmp_path) == ["last.ckpt"]  # no partial file left behind


def test_disk_full_inside_a_directory_write_keeps_the_previous_directory(tmp_path):
    final = tmp_path / "hf"
    with storage.atomic_dir(final) as tmp:
        (tmp / "config.json").write_text("{}")
    with pytest.raises(storage.StorageError, match=r"no space left on the device writing HF export .*hf"):
        with storage.atomic_dir(final, what="HF export") as tmp:
            (tmp / "config.json").write_text('{"new": 1}')
            raise RuntimeError("PytorchStreamWriter failed") from OSError(errno.ENOSPC, "No space left on device")
    assert (final / "config.json").read_text() == "{}"


def test_other_write_errors_name_what_and_where(tmp_path):
    with pytest.raises(storage.StorageError, match=r"could not write run\.json .*Read-only file system"):
        with storage.writing("run.json", tmp_path / "run.json"):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
    with pytest.raises(ValueError, match="not an I/O error"):  # anything else passes through unchanged
        with storage.writing("run.json", tmp_path / "run.json"):
            raise ValueError("not an I/O error")


def test_a_full_disk_ends_the_command_with_one_line(tmp_path, capsys):
    from lightning_slimmoe.cli import run_command

    def command(argv):
        with storage.writing("summary.json", tmp_path / "summary.json"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(SystemExit) as exit_:
        run_command(command, [])
    assert exit_.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: no space left on the device writing summary.json")


# --- --resume refuses changed data ----------------------------------------------------------------
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, phimoe_teacher, corpus_file):
    work = tmp_path_factory.mktemp("finished")
    recipe = tiny_recipe(work, phimoe_teacher, corpus_file, stages=STAGES)
    main(["--config", recipe])
    return work, recipe


def test_run_json_records_the_data_identity(finished_run, corpus_file):
    work, _ = finished_run
    data = json.loads((work / "run" / "run.json").read_text())["data"]
    assert data["source"]["files"] == [{"path": corpus_file, "bytes": Path(corpus_file).stat().st_size}]
    assert len(data["blocks_sha256"]) == 64 and data["tokenizer"]["size"] > 0


def test_resume_with_another_corpus_is_refused_listing_the_difference(finished_run, tmp_path, corpus_file, no_weights):
    work, recipe = finished_run
    other = tmp_path / "other.txt"
    other.write_text(Path(corpus_file).read_text()[::-1])
    before = {p: p.stat().st_mtime_ns for p in (work / "run").rglob("*")}
    with pytest.raises(ConfigError, match=r"the data differs .*data\.blocks_sha256.*resume_allow_data_change") as err:
        main(["--config", recipe, "--resume", "true", "--data.init_args.files", json.dumps([str(other)])])
    assert "other.txt" in str(err.value) and not no_weights
    assert {p: p.stat().st_mtime_ns for p in (work / "run").rglob("*")} == before  # nothing written


def test_resume_with_the_same_data_is_accepted(finished_run):
    work, recipe = finished_run
    summary = main(["--config", recipe, "--resume", "true"])  # every stage complete: skipped
    assert [s["name"] for s in summary["stages"]] == ["slim1"]


def test_resume_allowed_on_other_data_records_the_change(tmp_path, phimoe_teacher, corpus_file, monkeypatch):
    from lightning.pytorch import Callback

    import lightning_slimmoe.cli as cli

    class Preempted(RuntimeError):
        pass

    class Interrupt(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 2:
                raise Preempted("node lost")  # after the step-2 checkpoint

    stages = [{**STAGES[0], "max_tokens": 4 * 4 * 32, "checkpoint_every_n_steps": 2}]
    recipe = tiny_recipe(tmp_path, phimoe_teacher, corpus_file, stages=stages)
    original = cli.SlimMoECLI.make_trainer
    monkeypatch.setattr(cli.SlimMoECLI, "make_trainer", lambda self, extra_callbacks=(), **kw: original(
        self, extra_callbacks=[*extra_callbacks, Interrupt()], **kw))
    with pytest.raises(Preempted):
        main(["--config", recipe])
    monkeypatch.setattr(cli.SlimMoECLI, "make_trainer", original)
    other = tmp_path / "other.txt"
    other.write_text(Path(corpus_file).read_text()[::-1])
    args = ["--config", recipe, "--resume", "true", "--data.init_args.files", json.dumps([str(other)])]
    with pytest.raises(ConfigError, match="the data differs"):
        main(args)
    main(args + ["--resume_allow_data_change", "true"])
    meta = json.loads((tmp_path / "run" / "stage_0_slim1" / "meta.json").read_text())
    assert meta["status"] == "complete"
    assert any(line.startswith("data.blocks_sha256") for line in meta["resumed_with_data_change"])
    assert any("other.txt" in line for line in meta["resumed_with_data_change"])


@pytest.mark.parametrize("quantization", [{"quant_method": "bitsandbytes", "load_in_8bit": True},
                                          {"quant_method": "mxfp4"}])
def test_quantized_teacher_is_refused_naming_the_format(tmp_path, phimoe_teacher, corpus_file, no_weights,
                                                        quantization):
    teacher = Path(shutil.copytree(phimoe_teacher, tmp_path / "teacher"))
    config = json.loads((teacher / "config.json").read_text())
    (teacher / "config.json").write_text(json.dumps({**config, "quantization_config": quantization}))
    with pytest.raises(ConfigError, match=rf"quant_method='{quantization['quant_method']}'.*are not read"):
        main(["--config", tiny_recipe(tmp_path, str(teacher), corpus_file, stages=STAGES)])
    assert tree(tmp_path / "run") == [] and not no_weights
