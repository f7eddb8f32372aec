"""Memory and time of every phase at real tensor sizes, measured on this machine against the memory plan.

    python -m bench.memory --corpus PATH --out runs/bench_memory \\
        [--configs qwen3-30b-a3b,gpt-oss-20b,deepseek-v2-lite] [--layers 1,2,4] [--ranks 1,2] [--steps 3]

For each shipped config (``conf/models/<name>.json``) and each L it writes a *real-dimension* checkpoint: the config's
hidden, expert, head and vocabulary sizes with L decoder layers (DeepSeek-V2-Lite keeps its dense first layer, so
its L counts MoE layers after it), in the hub's own key layout and format — bf16 safetensors shards of at most 1 GB,
per-expert keys where the hub has them (Qwen3-MoE, DeepSeek-V2), MXFP4 ``*_blocks`` / ``*_scales`` experts for
gpt-oss — streamed tensor by tensor (:func:`write_safetensors`), so that this process never holds the model; and a
BPE tokenizer trained on ``--corpus``. It then compresses that checkpoint with ``train.py`` exactly as a user would:
one KD stage at 50% expert width, ``kd_taylor`` scoring on 256 calibration tokens, ``--steps`` KD steps of one
128-token sequence per rank, validation and the export of ``hf/``, ``precision: bf16-true``, KD chunk 128 —

* on 1 rank: one process, both models whole (strategy ``auto``): the reference "one process holding teacher and
  student whole";
* on 2 ranks: ``torchrun``, FSDP2 (``ModelParallelStrategy``) over gloo, per-layer activation checkpointing.

Every rank records its resident set per phase (``SLIMMOE_MEMORY_TRACE``, lightning_slimmoe/memory_trace.py): its
baseline (interpreter and libraries, no model), and the peak and seconds of ``load``, ``score``, ``train``,
``validate``, ``export``. The plan of the same recipe (``plan --memory --json``, with the host's RAM as the device
memory) is printed beside it per phase; the plan has no process baseline, so a phase's measured figure is its peak
RSS minus the rank's baseline, and both are reported. The I/O phases are set against this disk's sequential write
and read bandwidth, measured in the same run (a file of ``--disk-gib`` written with fsync, dropped from the page
cache, read back).

Writes ``<out>/memory.json`` (every run, every rank, every phase, the plan, the ratios, the machine's load) and
prints the tables ``docs/results.md`` shows. A run the kernel kills for memory is recorded as such, with the phases
its ranks finished. Runs are sequential and use both cores: run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
GiB = 2**30
SHARD_BYTES = 10**9  # the hub's shards are at most ~5 GB; 1 GB here, as the issue asks
PHASES = ("load", "score", "train", "validate", "export")
DTYPE_CODES = {torch.bfloat16: "BF16", torch.float32: "F32", torch.uint8: "U8"}
MXFP4_SCALE_RANGE = (118, 122)  # e8m0 exponents: values of 2^-9 .. 2^-5 x the fp4 grid, O(0.01-0.2)


# ---------------------------------------------------------------------------------------------------
# A real-dimension checkpoint in the hub's layout, streamed tensor by tensor
# ---------------------------------------------------------------------------------------------------
def truncated_config(name: str, layers: int) -> dict:
    """The shipped config of ``name`` with ``layers`` decoder layers (+ DeepSeek's dense first layers)."""
    config = json.loads((ROOT / "conf" / "models" / f"{name}.json").read_text())
    config.pop("_comment", None)
    total = layers + int(config.get("first_k_dense_replace", 0))
    config["num_hidden_layers"] = total
    if isinstance(config.get("layer_types"), list):
        config["layer_types"] = config["layer_types"][:total]
    for key in ("num_nextn_predict_layers", "mtp_num_hidden_layers"):  # no MTP layers are written
        if key in config:
            config[key] = 0
    return config


def hub_tensors(config: dict) -> list[tuple[str, torch.dtype, tuple[int, ...], str]]:
    """``(hub key, dtype, shape, kind)`` of every tensor of the checkpoint the hub would ship for ``config``, from the
    model built on the meta device (transformers' layout) mapped to the hub's: fused experts become per-expert
    ``gate_proj`` / ``up_proj`` / ``down_proj`` (Qwen3-MoE, DeepSeek-V2), or MXFP4 blocks and scales (gpt-oss).
    ``kind``: ``normal`` (random, std 0.02), ``ones`` (norm weights), ``zeros`` (biases), ``fp4`` / ``e8m0``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_config = AutoConfig.for_model(**config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    mxfp4 = config["model_type"] == "gpt_oss"
    out = []
    for key, t in model.state_dict().items():
        shape = tuple(t.shape)
        if key.endswith(("experts.gate_up_proj", "experts.down_proj")):
            experts, a, b = shape
            if mxfp4:  # in memory [E, in, out] -> hub [E, out, in/32, 16] fp4 pairs + [E, out, in/32] exponents
                out.append((key + "_blocks", torch.uint8, (experts, b, a // 32, 16), "fp4"))
                out.append((key + "_scales", torch.uint8, (experts, b, a // 32), "e8m0"))
                continue
            stem = key.removesuffix("gate_up_proj").removesuffix("down_proj")
            for e in range(experts):  # in memory [E, 2I, H] (gate; up) and [E, H, I]
                if key.endswith("gate_up_proj"):
                    out.append((f"{stem}{e}.gate_proj.weight", torch.bfloat16, (a // 2, b), "normal"))
                    out.append((f"{stem}{e}.up_proj.weight", torch.bfloat16, (a // 2, b), "normal"))
                else:
                    out.append((f"{stem}{e}.down_proj.weight", torch.bfloat16, (a, b), "normal"))
            continue
        if key.endswith(("norm.weight", "layernorm.weight")):
            kind = "ones"
        elif key.endswith("bias") or key.endswith("sinks"):
            kind = "zeros"
        else:
            kind = "normal"
        out.append((key, torch.bfloat16, shape, kind))
    return out


def _values(kind: str, dtype: torch.dtype, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    if kind == "normal":
        return (torch.randn(shape, generator=gen) * 0.02).to(dtype)
    if kind == "ones":
        return torch.ones(shape, dtype=dtype)
    if kind == "zeros":
        return torch.zeros(shape, dtype=dtype)
    if kind == "fp4":
        return torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen)
    return torch.randint(*MXFP4_SCALE_RANGE, shape, dtype=torch.uint8, generator=gen)


def write_safetensors(path: Path, entries: list, gen: torch.Generator, rows_per_piece: int = 1 << 14) -> int:
    """One safetensors file of ``entries`` ``(key, dtype, shape, kind)``, written as the format lays it out (an
    8-byte header length, the JSON header, the raw little-endian data) with each tensor made and written in pieces
    of ``rows_per_piece`` rows: the writer holds one piece at a time. Returns the bytes written."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for key, dtype, shape, _ in entries:
        size = math.prod(shape) * dtype.itemsize
        header[key] = {"dtype": DTYPE_CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for key, dtype, shape, kind in entries:
            rows = shape[0] if shape else 1
            for start in range(0, rows, rows_per_piece):
                piece_shape = (min(rows_per_piece, rows - start), *shape[1:]) if shape else ()
                f.write(_values(kind, dtype, piece_shape, gen).contiguous().view(torch.uint8).numpy().tobytes())
        f.flush()
        os.fsync(f.fileno())
    tmp.rename(path)
    return 8 + len(text) + offset


def write_checkpoint(directory: Path, config: dict, corpus: str, seed: int = 0, vocab: int = 4096) -> dict:
    """The hub checkpoint of ``config`` (:func:`truncated_config`: real dimensions), with its index, config.json and
    a BPE tokenizer of ``vocab`` tokens trained on ``corpus``."""
    from lightning_slimmoe.data import TextDataModule

    config = dict(config)
    entries = hub_tensors(config)
    directory.mkdir(parents=True, exist_ok=True)
    shards, current, size = [], [], 0
    for entry in entries:
        nbytes = math.prod(entry[2]) * entry[1].itemsize
        if current and size + nbytes > SHARD_BYTES:
            shards.append(current)
            current, size = [], 0
        current.append(entry)
        size += nbytes
    shards.append(current)
    gen = torch.Generator().manual_seed(seed)
    started, written, weight_map = time.time(), 0, {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        written += write_safetensors(directory / file, shard, gen)
        weight_map.update({key: file for key, *_ in shard})
    seconds = time.time() - started
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": written}, "weight_map": weight_map}, indent=1))
    if config["model_type"] == "gpt_oss":  # as the hub's config.json declares it
        config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
            "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    config["torch_dtype"] = "bfloat16"
    (directory / "config.json").write_text(json.dumps(config, indent=1))
    tokenizer = TextDataModule(files=[corpus]).train_tokenizer(vocab, str(directory))
    tokenizer.save_pretrained(directory)
    return {"dir": str(directory), "bytes": written, "shards": len(shards), "write_s": round(seconds, 2),
            "write_gib_per_s": round(written / GiB / seconds, 3), "tensors": len(entries)}


# ---------------------------------------------------------------------------------------------------
# The run: a recipe, train.py on 1 or 2 ranks, the trace of every rank
# ---------------------------------------------------------------------------------------------------
def recipe(path: Path, teacher: Path, output_dir: Path, corpus: str, ranks: int, steps: int) -> Path:
    import yaml

    trainer = {"accelerator": "cpu", "devices": ranks, "num_nodes": 1, "precision": "bf16-true",
               "log_every_n_steps": 1, "limit_val_batches": 1, "enable_progress_bar": False,
               "enable_model_summary": False}
    if ranks > 1:
        trainer["strategy"] = {"class_path": "lightning.pytorch.strategies.ModelParallelStrategy"}
    config = {
        "seed_everything": 0, "output_dir": str(output_dir), "teacher": str(teacher), "trainer": trainer,
        "parallel": {"activation_checkpointing": True},
        "memory_plan": {"check": "warn"},  # the plan is what is measured here, not a gate
        "data": {"class_path": "lightning_slimmoe.data.TextDataModule",
                 "init_args": {"files": [corpus], "seq_len": 128, "batch_size": 1, "val_fraction": 0.01,
                               "max_chars": 400_000}},
        "stages": [{"name": "width50", "expert_width": 0.5, "criterion": "kd_taylor", "calibration_tokens": 256,
                    "calibration_batch_size": 2, "max_tokens": steps * 128 * ranks, "val_every_n_steps": steps,
                    "kd": {"top_k": 8, "chunk_tokens": 128, "tail_bucket": True},
                    "optimizer": {"name": "adamw", "lr": 1.0e-5}}],
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def planned(recipe_path: Path) -> dict:
    """``plan --memory --json`` of the recipe: GiB per rank of every phase and term."""
    out = subprocess.run([sys.executable, "-m", "lightning_slimmoe", "plan", "--config", str(recipe_path),
                          "--memory", "--json"], cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)["memory"]


def run_train(recipe_path: Path, ranks: int, trace_dir: Path, log: Path) -> dict:
    threads = str(max(1, os.cpu_count() // ranks))
    env = {**os.environ, "SLIMMOE_MEMORY_TRACE": str(trace_dir), "OMP_NUM_THREADS": threads}
    if ranks == 1:
        cmd = [sys.executable, "train.py", "--config", str(recipe_path)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
               "train.py", "--config", str(recipe_path)]
    started = time.time()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    return {"rc": rc, "wall_s": round(time.time() - started, 1), "oom_killed": rc in (-9, 137) or "exitcode  : -9"
            in log.read_text(errors="replace"), "log": str(log)}


def read_trace(trace_dir: Path, ranks: int) -> list[dict]:
    """Per rank: baseline RSS, and per phase the largest peak RSS and the seconds summed over its segments."""
    result = []
    for rank in range(ranks):
        path = trace_dir / f"rank{rank}.jsonl"
        lines = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
        baseline = next((r["peak_rss_gib"] for r in lines if r["phase"] == "baseline"), None)
        phases: dict[str, dict] = {}
        for r in lines:
            if r["phase"] == "baseline" or r["stage"] == "teacher":
                continue
            p = phases.setdefault(r["phase"], {"peak_rss_gib": 0.0, "seconds": 0.0})
            p["peak_rss_gib"] = max(p["peak_rss_gib"], r["peak_rss_gib"])
            p["seconds"] += r["seconds"]
        teacher_val = [r for r in lines if r["stage"] == "teacher"]
        result.append({"rank": rank, "baseline_rss_gib": baseline, "phases": phases,
                       "teacher_validation": {"peak_rss_gib": max((r["peak_rss_gib"] for r in teacher_val),
                                                                  default=None),
                                              "seconds": sum(r["seconds"] for r in teacher_val)},
                       "last_phase": lines[-1]["phase"] if lines else None})
    return result


# ---------------------------------------------------------------------------------------------------
# Disk bandwidth and the machine
# ---------------------------------------------------------------------------------------------------
def disk_bandwidth(directory: Path, gib: float) -> dict:
    """Sequential write (fsync'd) and read (after dropping the file's pages) of one file of ``gib`` GiB."""
    path = directory / "bandwidth.bin"
    block = os.urandom(64 * 2**20)
    count = max(1, int(gib * GiB // len(block)))
    started = time.time()
    with open(path, "wb") as f:
        for _ in range(count):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    write_s = time.time() - started
    started = time.time()
    with open(path, "rb", buffering=0) as f:
        while f.read(len(block)):
            pass
    read_s = time.time() - started
    path.unlink()
    nbytes = count * len(block)
    return {"bytes": nbytes, "write_gib_per_s": round(nbytes / GiB / write_s, 3),
            "read_gib_per_s": round(nbytes / GiB / read_s, 3)}


def drop_cache(directory: Path) -> None:
    """Drop the page cache of every file under ``directory`` (so a run reads its checkpoint from the disk)."""
    for path in directory.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def machine() -> dict:
    with open("/proc/meminfo") as f:
        mem = {line.split(":")[0]: int(line.split()[1]) for line in f}
    return {"cpus": os.cpu_count(), "ram_gib": round(mem["MemTotal"] / 2**20, 1), "load_avg": os.getloadavg(),
            "python": platform.python_version(), "torch": torch.__version__}


# ---------------------------------------------------------------------------------------------------
def compare(plan: dict, trace: list[dict]) -> list[dict]:
    """Rows of measured (peak RSS - baseline) against planned GiB, per rank and phase."""
    stage = plan["stages"][0]["phases"]
    rows = []
    for rank in trace:
        for phase in PHASES:
            got = rank["phases"].get(phase)
            want = stage.get(phase, {}).get("total")
            if got is None or want is None:
                continue
            net = got["peak_rss_gib"] - (rank["baseline_rss_gib"] or 0.0)
            rows.append({"rank": rank["rank"], "phase": phase, "planned_gib": want,
                         "measured_peak_rss_gib": round(got["peak_rss_gib"], 3),
                         "measured_over_baseline_gib": round(net, 3),
                         "ratio": round(net / want, 3) if want else None, "seconds": round(got["seconds"], 2)})
    return rows


def summarize(report: dict) -> dict:
    """The issue's checks over all runs: every phase within +-25% of the plan; on 2 ranks, each rank's peak against
    the 1-rank (whole-model) run of the same config and L; memory and time per phase against L; I/O against the
    disk."""
    runs = [r for r in report["runs"] if r["rc"] == 0]
    ratios = [row["ratio"] for r in runs for row in r["rows"] if row["ratio"] is not None]
    def peak(run: dict) -> float:  # the largest peak RSS of any rank in any phase
        return max(t["phases"][p]["peak_rss_gib"] for t in run["trace"] for p in t["phases"])

    whole = {(r["config"], r["layers"]): peak(r) for r in runs if r["ranks"] == 1}
    sharded = []
    for r in runs:
        if r["ranks"] > 1 and (r["config"], r["layers"]) in whole:
            one = whole[(r["config"], r["layers"])]
            sharded.append({"config": r["config"], "layers": r["layers"], "ranks": r["ranks"], "rank_peak_gib": peak(r),
                            "whole_peak_gib": one, "ratio": round(peak(r) / one, 3)})
    by_l = {}
    for r in runs:
        for row in r["rows"]:
            if row["rank"] == 0:
                by_l.setdefault(f"{r['config']} r{r['ranks']} {row['phase']}", {})[r["layers"]] = {
                    "gib": row["measured_over_baseline_gib"], "s": row["seconds"]}
    disk = report["disk"]
    io = []
    for r in runs:
        t0 = r["trace"][0]["phases"]
        read = r["checkpoint"]["bytes"] * 2 / r["ranks"]  # teacher and student, each rank its rows
        if "load" in t0:
            io.append({"config": r["config"], "layers": r["layers"], "ranks": r["ranks"], "phase": "load",
                       "gib_per_s": round(read / GiB / t0["load"]["seconds"], 3),
                       "of_disk_read": round(read / GiB / t0["load"]["seconds"] / disk["read_gib_per_s"], 3)})
        if "export" in t0 and r["export_bytes"]:
            io.append({"config": r["config"], "layers": r["layers"], "ranks": r["ranks"], "phase": "export",
                       "gib_per_s": round(r["export_bytes"] / GiB / t0["export"]["seconds"], 3),
                       "of_disk_write": round(r["export_bytes"] / GiB / t0["export"]["seconds"]
                                              / disk["write_gib_per_s"], 3)})
    return {"runs_ok": len(runs), "runs_failed": [f"{r['config']}-L{r['layers']}-r{r['ranks']}: rc {r['rc']}"
                                                  for r in report["runs"] if r["rc"] != 0],
            "ratio_min": min(ratios, default=None), "ratio_max": max(ratios, default=None),
            "phases_within_25pct": sum(0.75 <= x <= 1.25 for x in ratios), "phases": len(ratios),
            "sharded_vs_whole": sharded, "by_layers": by_l, "io": io}


def print_report(report: dict) -> None:
    print("| config | L | ranks | rank | phase | planned GiB | measured GiB (peak RSS - baseline) | ratio | s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in report["runs"]:
        for row in r["rows"]:
            print(f"| {r['config']} | {r['layers']} | {r['ranks']} | {row['rank']} | {row['phase']} | "
                  f"{row['planned_gib']:.2f} | {row['measured_over_baseline_gib']:.2f} | {row['ratio']} | "
                  f"{row['seconds']:.1f} |")
        if r["rc"] != 0:
            print(f"| {r['config']} | {r['layers']} | {r['ranks']} | | rc {r['rc']} (oom: {r['oom_killed']}) | | | | |")
    print(json.dumps(report.get("summary", {}), indent=1))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", required=True, help="a text file (or directory of them) for data and tokenizer")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--configs", default="qwen3-30b-a3b,gpt-oss-20b,deepseek-v2-lite")
    parser.add_argument("--layers", default="1,2")
    parser.add_argument("--ranks", default="1,2")
    parser.add_argument("--steps", type=int, default=3, help="KD steps per run")
    parser.add_argument("--disk-gib", type=float, default=2.0)
    parser.add_argument("--keep-checkpoints", action="store_true", help="keep the written checkpoints")
    parser.add_argument("--replan", action="store_true",
                        help="run nothing: plan every run of <out>/memory.json again (its recipe.yaml) and report")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    result_path = args.out / "memory.json"
    if args.replan:
        report = json.loads(result_path.read_text())
        for run in report["runs"]:
            work = args.out / f"{run['config']}-L{run['layers']}-r{run['ranks']}"
            run["plan"] = planned(work / "recipe.yaml")
            run["rows"] = compare(run["plan"], run["trace"])
        report["summary"] = summarize(report)
        result_path.write_text(json.dumps(report, indent=1))
        print_report(report)
        return 0
    report = {"machine_at_start": machine(), "disk": disk_bandwidth(args.out, args.disk_gib), "runs": []}
    print(f"disk: write {report['disk']['write_gib_per_s']} GiB/s, read {report['disk']['read_gib_per_s']} GiB/s")
    for layers in [int(x) for x in args.layers.split(",")]:  # every config at the smallest L first
        for name in args.configs.split(","):
            ckpt = args.out / f"{name}-L{layers}"
            if ckpt.exists():
                shutil.rmtree(ckpt)
            written = write_checkpoint(ckpt, truncated_config(name, layers), args.corpus)
            print(f"{name} L={layers}: {written['bytes'] / GiB:.2f} GiB in {written['shards']} shards, "
                  f"{written['write_gib_per_s']} GiB/s")
            for ranks in [int(x) for x in args.ranks.split(",")]:
                tag = f"{name}-L{layers}-r{ranks}"
                work = args.out / tag
                if work.exists():
                    shutil.rmtree(work)
                work.mkdir()
                path = recipe(work / "recipe.yaml", ckpt, work / "run", args.corpus, ranks, args.steps)
                plan = planned(path)
                if not plan["fits"]:  # the plan itself says this box cannot hold it: not run (and said so)
                    print(f"  {ranks} rank(s): skipped, planned {plan['peak_gib']} GiB per rank of "
                          f"{plan['setup']['limit_gib']} usable")
                    report.setdefault("skipped", []).append({"config": name, "layers": layers, "ranks": ranks,
                                                             "planned_peak_gib": plan["peak_gib"],
                                                             "limit_gib": plan["setup"]["limit_gib"]})
                    continue
                drop_cache(ckpt)
                load_before = os.getloadavg()
                outcome = run_train(path, ranks, work / "trace", work / "train.log")
                trace = read_trace(work / "trace", ranks)
                export_dir = work / "run" / "stage_0_width50" / "hf"
                export_bytes = sum(p.stat().st_size for p in export_dir.glob("*.safetensors"))  # none if it failed
                run = {"config": name, "layers": layers, "ranks": ranks, "checkpoint": written, **outcome,
                       "load_avg_before": load_before, "load_avg_after": os.getloadavg(), "plan": plan,
                       "trace": trace, "rows": compare(plan, trace), "export_bytes": export_bytes}
                report["runs"].append(run)
                result_path.write_text(json.dumps(report, indent=1))
                print(f"  {ranks} rank(s): rc {outcome['rc']}, {outcome['wall_s']} s")
                for row in run["rows"]:
                    print(f"    rank {row['rank']} {row['phase']:<8} planned {row['planned_gib']:6.2f}  measured "
                          f"{row['measured_over_baseline_gib']:6.2f} (+ baseline = {row['measured_peak_rss_gib']:.2f})"
                          f"  x{row['ratio']}  {row['seconds']:.1f}s")
                if not args.keep_checkpoints:
                    shutil.rmtree(work / "run", ignore_errors=True)
            if not args.keep_checkpoints:  # the weights go; config.json and the tokenizer stay for --replan
                for weights in ckpt.glob("*.safetensors"):
                    weights.unlink()
    report["machine_at_end"] = machine()
    report["summary"] = summarize(report)
    result_path.write_text(json.dumps(report, indent=1))
    print_report(report)
    print(f"wrote {result_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
