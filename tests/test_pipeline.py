"""End-to-end stage pipeline on tiny models (CPU, seconds each)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from helpers import FAMILIES, make_teacher_dir, read_summary, scalar_events, tiny_config, tiny_recipe
from lightning_slimmoe.cli import main
from lightning_slimmoe.families import get_family


def test_two_stage_run_leaves_the_contract(tmp_path, phimoe_teacher, corpus_file):
    recipe = tiny_recipe(tmp_path, phimoe_teacher, corpus_file)
    summary = main(["--config", recipe])
    run = tmp_path / "run"
    for k, name in enumerate(["slim1", "slim2"]):
        stage = run / f"stage_{k}_{name}"
        assert (stage / "checkpoints" / "last.ckpt").is_file()
        assert (stage / "hf" / "config.json").is_file() and (stage / "scores.pt").is_file()
        meta = json.loads((stage / "meta.json").read_text())
        assert meta["status"] == "complete" and len(meta["kept_index_hash"]) == 64
    assert list((run / "tb").glob("events.out.tfevents*"))
    on_disk = read_summary(run)
    assert on_disk == json.loads(json.dumps(summary))
    widths = [s["expert_width"] for s in on_disk["stages"]]
    assert widths == [16, 8] and on_disk["teacher"]["expert_width"] == 32
    assert [s["num_key_value_heads"] for s in on_disk["stages"]] == [2, 1]
    for s in on_disk["stages"]:
        for key in ("name", "expert_width", "num_attention_heads", "num_key_value_heads", "head_dim", "total_params",
                    "active_params", "tokens", "val_loss", "val_ppl", "teacher_top1_agreement", "tokens_per_s",
                    "wall_s"):
            assert key in s
        assert s["val_ppl"] > 1
    assert on_disk["stages"][0]["total_params"] > on_disk["stages"][1]["total_params"]
    final = AutoModelForCausalLM.from_pretrained(on_disk["final_dir"])
    tok = AutoTokenizer.from_pretrained(on_disk["final_dir"])
    assert final.config.num_attention_heads == 2 and final.config.head_dim == 8
    out = final.generate(**tok("def main(", return_tensors="pt"), max_new_tokens=5, do_sample=False)
    assert out.shape[1] > 1
    assert "slim2" in (run / "final" / "README.md").read_text()


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "phimoe"])
def test_users_own_tiny_moe_of_each_family(tmp_path, corpus_file, family):
    teacher = make_teacher_dir(tmp_path / "teacher", family, corpus_file)
    stages = None
    if not get_family(tiny_config(family)).attention_prunable:  # expert slimming only (olmoe, MLA, minimax_m2)
        stages = [{"name": "a", "expert_width": 16, "calibration_tokens": 128, "max_tokens": 256},
                  {"name": "b", "expert_width": 8, "calibration_tokens": 128, "max_tokens": 256}]
    elif family in ("qwen2_moe", "qwen3_next"):  # their own shared-expert width
        stages = [{"name": "a", "expert_width": 16, "shared_expert_width": 16, "calibration_tokens": 128, "max_tokens": 256},
                  {"name": "b", "expert_width": 8, "attention_groups": 1, "calibration_tokens": 128, "max_tokens": 256}]
    main(["--config", tiny_recipe(tmp_path, teacher, corpus_file, stages=stages)])
    summary = read_summary(tmp_path / "run")
    assert [s["expert_width"] for s in summary["stages"]] == [16, 8]
    AutoModelForCausalLM.from_pretrained(summary["final_dir"])


def test_resume_after_interruption_reproduces_losses(tmp_path, phimoe_teacher, corpus_file, monkeypatch):
    """Kill stage 2 after a checkpoint, resume: per-step losses equal the uninterrupted run exactly."""
    from lightning.pytorch import Callback

    class RecordLoss(Callback):
        def __init__(self):
            self.losses = {}

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.losses[(pl_module.student.config.intermediate_size, trainer.global_step)] = outputs["loss"].item()

    class Preempted(RuntimeError):
        pass

    class Interrupt(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if pl_module.student.config.intermediate_size == 8 and trainer.global_step == 3:
                raise Preempted("node lost")  # a crash after the step-2 checkpoint

    stages = [
        {"name": "slim1", "expert_width": 16, "calibration_tokens": 256, "max_tokens": 4 * 4 * 32},
        {"name": "slim2", "expert_width": 8, "attention_groups": 1, "calibration_tokens": 256,
         "max_tokens": 6 * 4 * 32, "checkpoint_every_n_steps": 2},
    ]
    import lightning_slimmoe.cli as cli

    original = cli.SlimMoECLI.make_trainer

    def run(subdir, extra, resume=False):
        recipe = tiny_recipe(tmp_path / subdir, phimoe_teacher, corpus_file, stages=stages)

        def make_trainer(self, extra_callbacks=(), **kw):
            return original(self, extra_callbacks=[*extra_callbacks, *extra], **kw)
        monkeypatch.setattr(cli.SlimMoECLI, "make_trainer", make_trainer)  # this run's callbacks only
        return main(["--config", recipe] + (["--resume", "true"] if resume else []))

    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    full = RecordLoss()
    run("a", [full])
    first, second = RecordLoss(), RecordLoss()
    with pytest.raises(Preempted):
        run("b", [first, Interrupt()])
    run("b", [second], resume=True)
    resumed = {**first.losses, **second.losses}
    slim2_steps = [k for k in full.losses if k[0] == 8]
    assert all(k in second.losses for k in slim2_steps if k[1] > 2)  # resumed after the step-2 checkpoint
    assert not any(k[0] == 16 for k in second.losses)  # finished stage skipped, nothing pruned twice
    for key, loss in full.losses.items():
        assert resumed[key] == loss, key
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "a" / "run" / "final").state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "b" / "run" / "final").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    meta_a = json.loads((tmp_path / "a/run/stage_1_slim2/meta.json").read_text())
    meta_b = json.loads((tmp_path / "b/run/stage_1_slim2/meta.json").read_text())
    assert meta_a["kept_index_hash"] == meta_b["kept_index_hash"]


def test_teacher_never_in_checkpoint_and_gets_no_grads(tmp_path, phimoe_teacher, corpus_file):
    stages = [{"name": "s", "expert_width": 16, "calibration_tokens": 128, "max_tokens": 2 * 4 * 32}]
    main(["--config", tiny_recipe(tmp_path, phimoe_teacher, corpus_file, stages=stages)])
    ckpt = torch.load(tmp_path / "run/stage_0_s/checkpoints/last.ckpt", weights_only=True)
    assert ckpt["state_dict"] and all(k.startswith("student.") for k in ckpt["state_dict"])
    n_student = sum(v.numel() for v in ckpt["state_dict"].values())
    optim_state = ckpt["optimizer_states"][0]["state"]
    assert sum(s["exp_avg"].numel() for s in optim_state.values()) == n_student  # optimizer: student only

    from lightning_slimmoe.module import StageModule
    from helpers import random_batch
    teacher = AutoModelForCausalLM.from_pretrained(phimoe_teacher)
    student = AutoModelForCausalLM.from_pretrained(phimoe_teacher)
    module = StageModule(student, teacher).train()
    assert not teacher.training
    batch = random_batch()
    batch = {k: v % teacher.config.vocab_size for k, v in batch.items()}
    module.forward_loss(batch).loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None for p in student.parameters())


def test_adamw8bit_stage_runs(tmp_path, phimoe_teacher, corpus_file):
    """bitsandbytes AdamW8bit (8-bit optimizer state) as a stage optimizer; it steps on CPU too."""
    pytest.importorskip("bitsandbytes")
    stages = [{"name": "s8", "expert_width": 16, "calibration_tokens": 128, "max_tokens": 3 * 4 * 32,
               "optimizer": {"name": "adamw8bit", "lr": 1e-3}}]
    main(["--config", tiny_recipe(tmp_path, phimoe_teacher, corpus_file, stages=stages)])
    ckpt = torch.load(tmp_path / "run/stage_0_s8/checkpoints/last.ckpt", weights_only=True)
    def tensors(obj):  # bitsandbytes nests its quantised state under '__bnb_optimizer_quant_state__'
        if torch.is_tensor(obj):
            yield obj
        elif isinstance(obj, dict):
            for value in obj.values():
                yield from tensors(value)

    states = ckpt["optimizer_states"][0]["state"]
    assert any(t.dtype == torch.uint8 for t in tensors(states))  # 8-bit moments, saved for resume
    assert read_summary(tmp_path / "run")["stages"][0]["expert_width"] == 16


def test_lr_schedule_run_is_one_curve_and_resumes_exactly(tmp_path, phimoe_teacher, corpus_file, monkeypatch):
    """`lr_schedule: run`: the LR the optimizer had at every step of a 2-stage run is ONE warm-up + cosine curve
    over both stages' steps (stage 2 does not warm up again), also when stage 2 is interrupted and resumed;
    `lr_schedule: stage` (the default) keeps each stage's own curve."""
    import math

    from lightning.pytorch import Callback

    import lightning_slimmoe.cli as cli

    class RecordLR(Callback):
        def __init__(self):
            self.lrs = {}

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            key = (pl_module.student.config.intermediate_size, trainer.global_step)
            self.lrs[key] = trainer.optimizers[0].param_groups[0]["lr"]

    class Preempted(RuntimeError):
        pass

    class Interrupt(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if pl_module.student.config.intermediate_size == 8 and trainer.global_step == 3:
                raise Preempted("node lost")  # after the step-2 checkpoint of stage 2

    optimizer = {"lr": 1e-3, "warmup_ratio": 0.3, "min_lr_ratio": 0.1}
    stages = [
        {"name": "slim1", "expert_width": 16, "calibration_tokens": 256, "max_tokens": 4 * 4 * 32,
         "criterion": "magnitude", "optimizer": optimizer},
        {"name": "slim2", "expert_width": 8, "calibration_tokens": 256, "max_tokens": 6 * 4 * 32,
         "criterion": "magnitude", "optimizer": optimizer, "checkpoint_every_n_steps": 2},
    ]
    original = cli.SlimMoECLI.make_trainer

    def run(subdir, extra, schedule, resume=False):
        recipe = tiny_recipe(tmp_path / subdir, phimoe_teacher, corpus_file, stages=stages, lr_schedule=schedule)

        def make_trainer(self, extra_callbacks=(), **kw):
            return original(self, extra_callbacks=[*extra_callbacks, *extra], **kw)
        monkeypatch.setattr(cli.SlimMoECLI, "make_trainer", make_trainer)
        return main(["--config", recipe] + (["--resume", "true"] if resume else []))

    def curve(step, total):  # the documented warm-up + cosine, written out
        warmup = int(0.3 * total)
        if step < warmup:
            return 1e-3 * (step + 1) / warmup
        return 1e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / (total - warmup)))))

    for sub in ("a", "b", "c"):
        (tmp_path / sub).mkdir()
    whole = RecordLR()
    run("a", [whole], "run")
    steps = [(16, s) for s in range(4)] + [(8, s) for s in range(6)]
    assert sorted(whole.lrs, key=steps.index) == steps
    for g, key in enumerate(steps):  # one curve over the 10 KD steps: warm-up steps 0-2 only, then one decay
        assert whole.lrs[key] == pytest.approx(curve(g, 10), rel=1e-12), (key, whole.lrs[key])
    first, second = RecordLR(), RecordLR()
    with pytest.raises(Preempted):
        run("b", [first, Interrupt()], "run")
    run("b", [second], "run", resume=True)
    assert {k for k in second.lrs if k[0] == 8} >= {(8, s) for s in range(3, 6)}
    assert {**first.lrs, **second.lrs} == whole.lrs  # the resumed stage continued the same curve exactly
    per_stage = RecordLR()
    run("c", [per_stage], "stage")
    for key, lr in per_stage.lrs.items():
        assert lr == pytest.approx(curve(key[1], 4 if key[0] == 16 else 6), rel=1e-12), (key, lr)


# ---------------------------------------------------------------------------------------------------
# What a run leaves in TensorBoard and checkpoints/: one 2-stage run, read by the tests below
# ---------------------------------------------------------------------------------------------------
# slim1: 6 steps, validated after step 4 of 6 (its last step is no validation step); slim2: 4 steps from run step 6,
# validated every 2 (its last step is one).
TB_STAGES = [
    {"name": "slim1", "expert_width": 16, "calibration_tokens": 256, "max_tokens": 6 * 4 * 32,
     "val_every_n_steps": 4, "checkpoint_every_n_steps": 2, "optimizer": {"lr": 1e-3}},
    {"name": "slim2", "expert_width": 8, "attention_groups": 1, "calibration_tokens": 256, "max_tokens": 4 * 4 * 32,
     "val_every_n_steps": 2, "optimizer": {"lr": 1e-3}},
]
TB_OFFSETS = {"slim1": 0, "slim2": 6}


@pytest.fixture(scope="module")
def tb_run(tmp_path_factory, phimoe_teacher, corpus_file):
    work = tmp_path_factory.mktemp("tb_run")
    recipe = tiny_recipe(work, phimoe_teacher, corpus_file, stages=TB_STAGES)
    main(["--config", recipe])
    return {"dir": work / "run", "recipe": recipe, "summary": read_summary(work / "run")}


def test_val_loss_is_the_held_out_lm_loss_in_every_stage(tb_run):
    """val/loss (and summary.json's val_loss) is the LM cross-entropy in every stage: val_ppl = exp(val_loss); the KD
    losses are on their own tags; each stage's result is its curve's point at its last step."""
    import math

    tb = tb_run["dir"] / "tb"
    val_loss, val_kd = dict(scalar_events(tb, "val/loss")), dict(scalar_events(tb, "val/kd_loss"))
    for stage, last_step in zip(tb_run["summary"]["stages"], (5, 9)):
        assert math.exp(stage["val_loss"]) == pytest.approx(stage["val_ppl"], rel=1e-5)
        assert val_loss[last_step] == pytest.approx(stage["val_loss"], rel=1e-6)
        assert dict(scalar_events(tb, "val/ppl"))[last_step] == pytest.approx(stage["val_ppl"], rel=1e-6)
        assert abs(val_kd[last_step] - val_loss[last_step]) > 0.1  # another quantity (KD over the teacher's top-8)
    for tag in ("train/loss", "train/kd_loss", "train/lm_loss", "lr"):
        assert [s for s, _ in scalar_events(tb, tag)] == list(range(10)), tag  # every step of both stages, once
    kd, lm = dict(scalar_events(tb, "train/kd_loss")), dict(scalar_events(tb, "train/lm_loss"))
    assert dict(scalar_events(tb, "train/loss")) == kd  # lm_weight 0: the objective is the KD term
    assert all(abs(lm[s] - kd[s]) > 0.1 for s in kd)


def test_each_kd_stage_starts_with_a_validation_of_the_sliced_student(tb_run, phimoe_teacher, corpus_file):
    """At each stage's first step of the run's axis, val/ holds the incoming student after the slice and before any
    update (validated here independently); no validation step shows twice."""
    from lightning import Trainer
    from transformers import AutoTokenizer

    from lightning_slimmoe.data import TextDataModule
    from lightning_slimmoe.module import StageModule
    from lightning_slimmoe.run_dir import StageDir
    from lightning_slimmoe.slimming import slim_model_

    run, tb = tb_run["dir"], tb_run["dir"] / "tb"
    dm = TextDataModule(files=[corpus_file], seq_len=32, batch_size=4, val_fraction=0.05)
    dm.set_tokenizer(AutoTokenizer.from_pretrained(phimoe_teacher))
    dm.setup("fit")
    teacher = AutoModelForCausalLM.from_pretrained(phimoe_teacher)
    val = {tag: dict(scalar_events(tb, tag)) for tag in ("val/loss", "val/kd_loss", "val/teacher_agreement")}
    for k, (name, incoming) in enumerate([("slim1", phimoe_teacher), ("slim2", run / "stage_0_slim1" / "hf")]):
        student = AutoModelForCausalLM.from_pretrained(incoming)
        slim_model_(student, StageDir(run / f"stage_{k}_{name}", name).load_keep()[0])
        trainer = Trainer(accelerator="cpu", logger=False, limit_val_batches=2, enable_progress_bar=False,
                          enable_model_summary=False)
        want = trainer.validate(StageModule(student, teacher), datamodule=dm, verbose=False)[0]
        for tag, points in val.items():
            assert points[TB_OFFSETS[name]] == pytest.approx(want[tag], rel=1e-6), (name, tag)
    for tag in ("val/loss", "val/ppl", "val/kd_loss", "val/teacher_agreement"):
        # slim1: before its first step, after step 4 (run step 3), after its last (5); slim2 likewise, then every 2
        assert [s for s, _ in scalar_events(tb, tag)] == [0, 3, 5, 6, 7, 9], tag


def test_hparams_are_the_runs_configuration_logged_once(tb_run):
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.plugins.hparams import plugin_data_pb2

    tb = tb_run["dir"] / "tb"
    starts = [plugin_data_pb2.HParamsPluginData.FromString(v.metadata.plugin_data.content).session_start_info
              for f in sorted(tb.glob("events.out.tfevents*")) for e in EventFileLoader(str(f)).Load()
              if e.HasField("summary") for v in e.summary.value if v.tag == "_hparams_/session_start_info"]
    assert len(starts) == 1  # once per run, not once per stage
    hp = starts[0].hparams
    assert [hp[f"stages/{k}/name"].string_value for k in range(2)] == ["slim1", "slim2"]
    assert hp["stages/1/expert_width"].number_value == 8 and hp["stages/1/kd/top_k"].number_value == 8
    assert hp["trainer/limit_val_batches"].number_value == 2 and hp["data/init_args/seq_len"].number_value == 32
    assert hp["output_dir"].string_value == str(tb_run["dir"])
    assert hp["stages/0/optimizer/betas"].string_value == "[0.9, 0.95]"
    saved = yaml.safe_load((tb / "hparams.yaml").read_text())
    assert saved["stages"][1]["name"] == "slim2" and "kd" not in saved  # the run's, not a stage module's


def test_a_finished_stage_keeps_one_checkpoint(tb_run, tmp_path):
    """Once a stage's hf/ is verified and it is recorded complete, checkpoints/ holds last.ckpt alone (its
    stepNNNNNNN.ckpt was the same state); a --resume of the finished run still skips every stage."""
    for k, name in enumerate(["slim1", "slim2"]):
        checkpoints = tb_run["dir"] / f"stage_{k}_{name}" / "checkpoints"
        assert [p.name for p in checkpoints.iterdir()] == ["last.ckpt"]
        assert torch.load(checkpoints / "last.ckpt", weights_only=True)["global_step"] == [6, 4][k]
    copy = tmp_path / "run"
    shutil.copytree(tb_run["dir"], copy)
    assert main(["--config", tb_run["recipe"], "--output_dir", str(copy), "--resume", "true"]) == \
        json.loads(json.dumps(tb_run["summary"] | {"final_dir": str(copy / "final")}))


def test_a_finished_sharded_stage_keeps_one_checkpoint_directory(tmp_path):
    """A sharded checkpoint is a directory: the complete stage's step directory goes, its complete last.ckpt stays;
    while last.ckpt is not complete (a kill between the renames of a sharded save), nothing is removed."""
    from lightning_slimmoe.pipeline import keep_one_checkpoint
    from lightning_slimmoe.run_dir import StageDir
    from lightning_slimmoe.strategies import DCP_METADATA, LIGHTNING_META, checkpoint_global_step

    stage = StageDir(tmp_path / "stage_0_a", "a")
    for name, step in (("step0000004.ckpt", 4), ("last.ckpt", 4), ("last.ckpt.old", 2)):
        (stage.checkpoints / name).mkdir(parents=True)
        (stage.checkpoints / name / "__0_0.distcp").write_bytes(b"shard")
        (stage.checkpoints / name / DCP_METADATA).write_bytes(b"")
        if name != "last.ckpt":  # last.ckpt incomplete first: its meta.pt is not written yet
            torch.save({"global_step": step}, stage.checkpoints / name / LIGHTNING_META)
    keep_one_checkpoint(stage)
    assert sorted(p.name for p in stage.checkpoints.iterdir()) == ["last.ckpt", "last.ckpt.old", "step0000004.ckpt"]
    torch.save({"global_step": 4}, stage.checkpoints / "last.ckpt" / LIGHTNING_META)
    shutil.rmtree(stage.checkpoints / "last.ckpt.old")  # what the strategy does after the second rename
    keep_one_checkpoint(stage)
    assert [p.name for p in stage.checkpoints.iterdir()] == ["last.ckpt"]
    assert checkpoint_global_step(stage.last_checkpoint) == 4
    single = tmp_path / "single.ckpt"
    torch.save({"global_step": 7, "state_dict": {"student.w": torch.zeros(3)}}, single)
    assert checkpoint_global_step(single) == 7
