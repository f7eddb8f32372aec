"""The memory plan (lightning_slimmoe/memory.py) reads the recipe — world size, strategy, precision, activation
checkpointing, optimizer, teacher cache, criterion, micro-batch — and plans every phase of every stage; ``train``
refuses a run whose plan does not fit before any weight is read, under every strategy; ``plan`` prices a recipe in
FLOPs and GPU-hours (lightning_slimmoe/flops.py)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from helpers import FSDP1, MODEL_PARALLEL, tiny_recipe
from lightning_slimmoe.cli import main, plan, run_command

ROOT = Path(__file__).resolve().parents[1]
PHI_TINY = str(ROOT / "conf" / "phi_tiny.yaml")


def memory_of(*overrides: str, recipe: str = PHI_TINY) -> dict:
    return plan(["--config", recipe, "--json", "--memory", *overrides])["memory"]


def phase(memory: dict, stage: int, name: str) -> dict:
    return memory["stages"][stage]["phases"][name]


# ---------------------------------------------------------------------------------------------------
# plan --memory reads the recipe
# ---------------------------------------------------------------------------------------------------
def test_the_plan_reads_world_size_strategy_and_precision_from_the_recipe(capsys):
    import yaml

    trainer = yaml.safe_load(Path(PHI_TINY).read_text())["trainer"]  # ModelParallelStrategy, 32-true + bf16 params
    setup = memory_of()["setup"]
    assert (setup["devices"], setup["num_nodes"]) == (trainer["devices"], trainer["num_nodes"])
    assert setup["world_size"] == trainer["devices"] * trainer["num_nodes"] and setup["strategy"] == "fsdp2"
    assert setup["precision"] == "32-true" and setup["activation_checkpointing"]
    recipe = memory_of("--trainer.num_nodes", "8")
    one_node = memory_of("--trainer.num_nodes", "1")
    assert (recipe["setup"]["world_size"], one_node["setup"]["world_size"]) == (64, 8)
    # sharded terms scale as 1/world: 8x the teacher's shard on 8 GPUs than on 64
    assert phase(one_node, 0, "train")["teacher_weights"] == pytest.approx(8 * phase(recipe, 0, "train")["teacher_weights"], rel=0.01)
    ddp = memory_of("--trainer.strategy", "ddp")  # whole models on every rank
    assert ddp["setup"]["strategy"] == "ddp" and "gathered_params" not in phase(ddp, 0, "train")
    assert phase(ddp, 0, "train")["teacher_weights"] == pytest.approx(41_873_153_344 * 2 / 2**30, rel=1e-3)  # bf16
    assert phase(ddp, 0, "train")["ddp_grad_buckets"] == pytest.approx(phase(ddp, 0, "train")["student_grads"])
    assert not ddp["fits"]
    fsdp1 = memory_of("--trainer.strategy", FSDP1)
    assert fsdp1["setup"]["strategy"] == "fsdp1" and fsdp1["stages"][0]["host_gib_per_node"] > 8 * 80  # loads whole
    assert "score" in fsdp1["stages"][0]["phases"] and not fsdp1["fits"]  # FSDP1 scores the whole student per rank
    # bf16-true: weights, gradients and AdamW moments in 2 bytes, not 4
    bf16 = memory_of("--trainer.num_nodes", "8", "--trainer.precision", "bf16-true")
    assert phase(bf16, 0, "train")["student_weights"] == pytest.approx(phase(recipe, 0, "train")["student_weights"] / 2,
                                                                      rel=0.01)
    assert phase(bf16, 0, "train")["optimizer_state"] == pytest.approx(phase(recipe, 0, "train")["optimizer_state"] / 2,
                                                                       rel=0.01)


def test_the_plan_reads_the_training_choices():
    base = memory_of("--trainer.num_nodes", "1")
    train, score = phase(base, 0, "train"), phase(base, 0, "score")
    assert train["optimizer_state"] == pytest.approx(2 * train["student_weights"], rel=0.01)  # AdamW: 2 fp32 moments
    eight_bit = memory_of("--trainer.num_nodes", "1", "--stages.0.optimizer.name", "adamw8bit")
    assert phase(eight_bit, 0, "train")["optimizer_state"] == pytest.approx(train["optimizer_state"] / 4, rel=0.01)
    no_ckpt = memory_of("--trainer.num_nodes", "1", "--parallel.activation_checkpointing", "false")
    assert phase(no_ckpt, 0, "train")["activations"] > 3 * train["activations"]
    assert phase(no_ckpt, 0, "score")["activations"] > 3 * score["activations"]  # the scoring backward too
    cached = memory_of("--trainer.num_nodes", "1", "--teacher_cache", "cache")  # no teacher forward in a KD step
    assert phase(cached, 0, "train")["teacher_weights"] == train["teacher_weights"]  # it stays loaded (validation)
    assert phase(cached, 0, "train")["gathered_params"] <= train["gathered_params"]
    half_chunk = memory_of("--trainer.num_nodes", "1", "--stages.0.kd.chunk_tokens", "2048")
    assert phase(half_chunk, 0, "train")["kd_logits"] == pytest.approx(train["kd_logits"] / 2, rel=0.01)
    micro = memory_of("--trainer.num_nodes", "1", "--data.init_args.batch_size", "1")
    assert phase(micro, 0, "train")["activations"] == pytest.approx(train["activations"] / 2, rel=0.01)
    # scoring: kd_taylor holds the gradients of the full-size incoming student; activation only runs it forward;
    # magnitude runs nothing
    assert score["student_weights"] > 2 * train["student_weights"] and score["student_grads"] > 0
    by_activation = phase(memory_of("--trainer.num_nodes", "1", "--stages.0.criterion", "activation"), 0, "score")
    assert "student_grads" not in by_activation and by_activation["total"] < score["total"]
    by_magnitude = phase(memory_of("--trainer.num_nodes", "1", "--stages.0.criterion", "magnitude"), 0, "score")
    assert set(by_magnitude) == {"teacher_weights", "student_weights", "total"}
    smaller_batch = memory_of("--trainer.num_nodes", "1", "--stages.0.calibration_batch_size", "1")
    assert phase(smaller_batch, 0, "score")["activations"] < score["activations"] / 4
    assert list(base["stages"][0]["phases"]) == ["load", "score", "train", "validate", "export"]


def test_plan_marks_the_binding_term_and_says_what_makes_a_stage_fit(capsys):
    few = memory_of("--trainer.num_nodes", "1", "--gpu-memory-gib", "40")
    first = few["stages"][0]
    assert not first["fits"] and first["peak_phase"] == "score"
    assert first["binding_term"]["gib"] == max(v for k, v in phase(few, 0, "score").items() if k != "total")
    changes = {f["change"]: f for f in first["fixes"]}
    nodes = next(f for c, f in changes.items() if c.startswith("trainer.num_nodes"))
    assert nodes["fits"] and nodes["peak_gib"] <= 0.9 * 40
    assert "stages[0].calibration_batch_size: 1" in changes
    # the fix holds: planned with the nodes it names, the stage fits
    count = int(next(c for c in changes if c.startswith("trainer.num_nodes")).split()[1])
    assert memory_of("--trainer.num_nodes", str(count), "--gpu-memory-gib", "40")["stages"][0]["fits"]
    assert memory_of("--gpus", str(8 * count), "--gpu-memory-gib", "40")["stages"][0]["fits"]  # --gpus: the same
    plan(["--config", PHI_TINY, "--memory", "--trainer.num_nodes", "1", "--gpu-memory-gib", "40"])
    printed = capsys.readouterr().out
    assert "memory per rank (GiB): 8 GPUs, FSDP2 (ModelParallelStrategy), precision 32-true" in printed
    assert "score: " in printed and "NO" in printed and "width30 does not fit; it fits with any of:" in printed
    # DDP on one 8-GPU node: FSDP2 on more nodes would hold it
    ddp = memory_of("--trainer.strategy", "ddp", "--trainer.num_nodes", "1")
    assert any(f["change"].startswith("with FSDP2 trainer.num_nodes: ") and f["fits"] for f in ddp["stages"][0]["fixes"])
    # ... and without activation checkpointing no single change suffices (the scoring backward's activations do not
    # shrink with more GPUs): the combination is named
    bare = memory_of("--trainer.strategy", "ddp", "--trainer.num_nodes", "1", "--parallel.activation_checkpointing", "false")
    combined = bare["stages"][0]["fixes"][0]
    assert combined["change"].startswith("together: trainer.strategy: ModelParallelStrategy, "
                                         "parallel.activation_checkpointing: true") and combined["fits"]


def test_the_json_keeps_the_flops_and_the_gpu_hours_at_the_stated_mfu():
    """Per token: teacher forward 2 N_t + attention, student forward + backward (+ the recompute of activation
    checkpointing), KD head 2 H V + 6 H V; GPU-hours = tokens x FLOPs / (MFU x peak) (+ scoring)."""
    result = plan(["--config", PHI_TINY, "--json", "--mfu", "0.5", "--peak-tflops", "1000"])
    compute = result["compute"]
    vocab, hidden, layers, heads, head_dim, seq = 32064, 4096, 32, 32, 128, 4096
    matmul = 6_640_999_744 - 2 * vocab * hidden  # active less the embedding and the (untied) head
    attention = layers * 2 * heads * (head_dim + head_dim) * seq / 2
    first = compute["stages"][0]
    assert first["teacher_forward_flops_per_token"] == pytest.approx(2 * matmul + attention)
    assert first["kd_head_flops_per_token"] == pytest.approx(8 * hidden * vocab)
    student_matmul = result["stages"][0]["active_params"] - 2 * vocab * hidden
    student_attention = attention  # width30 keeps 32/8 heads
    assert compute["activation_checkpointing_recompute"]
    assert first["student_forward_backward_flops_per_token"] == pytest.approx(4 * (2 * student_matmul + student_attention))
    tokens = 100_000_000_000
    assert first["tokens"] == tokens
    assert first["gpu_hours"] == pytest.approx(first["total_flops"] / (0.5 * 1000e12) / 3600, abs=0.05)
    assert first["total_flops"] > tokens * first["flops_per_token"]  # + scoring (kd_taylor on 4M tokens)
    assert compute["gpu_hours"] == pytest.approx(sum(s["gpu_hours"] for s in compute["stages"]), abs=0.2)


# ---------------------------------------------------------------------------------------------------
# train refuses a run that does not fit, in seconds, before any weight or data is read
# ---------------------------------------------------------------------------------------------------
@pytest.fixture
def no_weight_reads(no_weights, monkeypatch):
    """No weight is read (conftest's ``no_weights``; the plan's meta-device builds hold none), nor the corpus or the
    tokenizer."""
    import lightning_slimmoe.pipeline as pipeline

    def refuse(*args, **kwargs):
        raise AssertionError("the data were read")

    monkeypatch.setattr(pipeline, "prepare_data", refuse)


STRATEGIES = {"auto": (None, 1, "1 CPU rank, one device, nothing sharded"),
              "ddp": ("ddp", 2, "2 CPU ranks, DDP, nothing sharded"),
              "fsdp2": (MODEL_PARALLEL, 2, "2 CPU ranks, FSDP2 (ModelParallelStrategy)"),
              "fsdp1": (FSDP1, 2, "2 CPU ranks, FSDP1 (FSDPStrategy) FULL_SHARD")}


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_train_refuses_a_run_that_does_not_fit_before_reading_anything(strategy, tmp_path, phimoe_teacher, corpus_file,
                                                                       no_weight_reads, capsys):
    name, devices, described = STRATEGIES[strategy]
    recipe = tiny_recipe(tmp_path, phimoe_teacher, corpus_file, memory_plan={"device_memory_gib": 1e-6})
    args = ["--config", recipe, "--trainer.devices", str(devices)]
    if name is not None:
        args += ["--trainer.strategy", name]
    started = time.time()
    with pytest.raises(SystemExit) as exit_info:
        run_command(main, args)
    elapsed = time.time() - started
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: memory: stage 'slim1' does not fit: its "), err
    line = err[0]
    assert "phase needs" in line and "GiB per rank (largest term " in line  # the phase, the term and its numbers
    assert "over the limit of 9e-07 GiB (90% of 1e-06 GiB; " + described in line
    assert "memory_plan.check: warn" in line and "plan --config" in line  # how to look, how to run anyway
    assert not (tmp_path / "run").exists()  # nothing written
    assert elapsed < 10, elapsed


def test_the_refusal_names_the_phase_and_the_fix(tmp_path, phimoe_teacher, corpus_file, no_weight_reads, capsys):
    """A budget between the phases' needs: the score phase (kd_taylor's backward through the full-size student)
    does not fit, the KD step would; the message says so and names a change that makes it fit."""
    from lightning_slimmoe.cli import SlimMoECLI
    from lightning_slimmoe.memory import gib_text, recipe_memory_plan, setup_from_section
    from lightning_slimmoe.planning import plan_shapes

    recipe = tiny_recipe(tmp_path, phimoe_teacher, corpus_file)
    cli = SlimMoECLI(args=["--config", recipe])
    memory = recipe_memory_plan(cli.run_config, plan_shapes(cli.run_config), setup_from_section(cli.config_init["trainer"]),
                                cli.datamodule.hparams)
    first = memory.stages[0]
    score, train = first.totals["score"], first.totals["train"]
    assert score > train
    budget = (score + train) / 2 / 0.9
    with pytest.raises(SystemExit):
        run_command(main, ["--config", recipe, "--memory_plan.device_memory_gib", str(budget)])
    line = capsys.readouterr().err.strip()
    assert f"its score phase needs {gib_text(score)} GiB per rank" in line
    assert "it fits with any of: " in line and "calibration_batch_size: 1" in line
    assert not (tmp_path / "run").exists()


def test_memory_check_warn_runs_anyway_and_off_does_not_plan(tmp_path, phimoe_teacher, corpus_file, monkeypatch,
                                                            no_weight_reads):
    import lightning_slimmoe.memory as memory

    recipe = tiny_recipe(tmp_path, phimoe_teacher, corpus_file, memory_plan={"device_memory_gib": 1e-6})
    with pytest.warns(UserWarning, match=r"memory: stage 'slim1' does not fit"):
        with pytest.raises(AssertionError, match="the data were read"):  # past the check: on to the data
            main(["--config", recipe, "--memory_plan.check", "warn"])
    monkeypatch.setattr(memory, "recipe_memory_plan", lambda *a, **k: pytest.fail("memory_plan.check: off planned"))
    with pytest.raises(AssertionError, match="the data were read"):
        main(["--config", recipe, "--memory_plan.check", "off"])


def test_a_recipe_that_fits_trains_with_the_check_on(tmp_path, phimoe_teacher, corpus_file, caplog):
    """The default check on a CPU run: the host's RAM shared by the ranks; the tiny run fits and says its peak."""
    import logging

    recipe = tiny_recipe(tmp_path, phimoe_teacher, corpus_file)
    with caplog.at_level(logging.INFO):
        summary = main(["--config", recipe, "--stages.0.max_tokens", "128", "--stages.1.max_tokens", "128"])
    assert [s["name"] for s in summary["stages"]] == ["slim1", "slim2"]
    assert any("memory plan: peak" in r.getMessage() and "1 CPU rank" in r.getMessage() for r in caplog.records)
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["stages"]
