"""Speed benchmark: our KD training step against TRL's GKDTrainer and a plain PyTorch floor.

    python bench/speed.py --out bench/out/speed-cpu --device cpu
    python bench/speed.py --out bench/out/speed-cuda --device cuda --preset gpu

One teacher/student pair (a Qwen3-MoE-shaped teacher as in ``bench/quality.py`` and its final 25%-width,
half-KV-group student; random weights, speed does not depend on them), one batch size and sequence length,
the same token windows for every configuration:

  ours_topk      our Lightning training step (StageModule + Trainer), chunked top-k KD loss (k = 8)
  ours_topk_cached  ours_topk reading the teacher's top-8 from a prebuilt teacher cache (teacher_cache.py) instead
                 of running the teacher forward; the one-off build pass is timed separately (cache_build_*)
  ours_fullkl    the same step with the KD loss over the full vocabulary (top_k = vocab size)
  ours_topk_flash  (CUDA with flash-attn installed) ours_topk with attn_implementation=flash_attention_2
  floor          a plain PyTorch loop: student + teacher forward, full-vocab KL, backward, AdamW step
  trl_gkd        TRL ``GKDTrainer`` (lmbda=0, beta=0 = forward KL on the data, seq_kd=False), text as chat
  scoring        our kd_taylor importance-scoring pass (forward + backward, no optimizer) on the student

Every configuration runs in a fresh subprocess, so that the peak memory figure is its own: on CPU the
process's ``ru_maxrss`` (peak resident set size: interpreter, libraries, both models, activations and
optimizer state), also shown minus the RSS measured right before the first (warm-up) step; on CUDA
``torch.cuda.max_memory_allocated`` from the first step on. Throughput is measured after warm-up steps; our
Lightning steps also report the process's CPU time per step (``step_cpu_s``), steadier than the wall clock on a
CPU shared with other jobs.
Writes ``speed.json`` (absolute figures and ratios ours/TRL) and ``speed.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PRESETS = {
    "tiny": dict(quality_preset="tiny", batch_size=2, seq_len=32, warmup=1, steps=2, max_chars=60_000),
    "cpu": dict(quality_preset="cpu", batch_size=8, seq_len=256, warmup=3, steps=12, max_chars=400_000),
    "gpu": dict(quality_preset="gpu", batch_size=8, seq_len=1024, warmup=5, steps=30, max_chars=4_000_000),
}
CONFIGS = ["ours_topk", "ours_topk_cached", "ours_fullkl", "floor", "trl_gkd", "scoring", "ours_topk_flash"]
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}  # dense bf16


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# ---------------------------------------------------------------------------------------------------
# set-up (parent): models, tokenizer and token windows on disk, shared by every worker
# ---------------------------------------------------------------------------------------------------
def prepare(out: Path, preset: dict, text_file: str | None) -> dict:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from bench.quality import PRESETS as QUALITY, final_shape, teacher_model_config
    from lightning_slimmoe.data import TextDataModule

    q = QUALITY[preset["quality_preset"]]
    work = out / "work"
    if (work / "windows.pt").exists():
        return json.loads((work / "setup.json").read_text())
    work.mkdir(parents=True, exist_ok=True)
    dm = TextDataModule(files=[text_file] if text_file else None, max_chars=preset["max_chars"])
    tokenizer = dm.train_tokenizer(q["vocab"], str(work / "tokenizer"))
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"  # plain text as chat for TRL
    tokenizer.save_pretrained(work / "tokenizer")
    cfg = teacher_model_config({**q, "seq_len": preset["seq_len"]})
    cfg["vocab_size"] = len(tokenizer)
    teacher_config = AutoConfig.for_model(**cfg)
    for name, config, seed in (("teacher", teacher_config, 0), ("student", final_shape(teacher_config, q), 1)):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
        model.save_pretrained(work / name)
        tokenizer.save_pretrained(work / name)
    ids = torch.as_tensor(tokenizer("\n".join(dm.load_documents()), add_special_tokens=False, verbose=False)["input_ids"])
    need = (preset["warmup"] + preset["steps"] + 1) * preset["batch_size"]
    num = ids.numel() // preset["seq_len"]
    if num < need:
        raise ValueError(f"corpus too short: {num} windows of {preset['seq_len']} tokens, need {need}")
    torch.save(ids[: need * preset["seq_len"]].view(need, preset["seq_len"]).clone(), work / "windows.pt")
    setup = {"teacher": str(work / "teacher"), "student": str(work / "student"), "tokenizer": str(work / "tokenizer"),
             "windows": str(work / "windows.pt"), "vocab_size": len(tokenizer)}
    (work / "setup.json").write_text(json.dumps(setup))
    return setup


# ---------------------------------------------------------------------------------------------------
# workers (one fresh process each)
# ---------------------------------------------------------------------------------------------------
def _load(setup: dict, device: str, attn: str | None = None):
    import torch
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": torch.float32}
    if attn:
        kwargs["attn_implementation"] = attn
    teacher = AutoModelForCausalLM.from_pretrained(setup["teacher"], **kwargs).to(device).eval()
    student = AutoModelForCausalLM.from_pretrained(setup["student"], **kwargs).to(device)
    windows = torch.load(setup["windows"])
    return teacher, student, windows


def _batches(windows, batch_size: int, n: int):
    # inputs and labels are the same window shifted inside the model's loss: labels = next token
    for i in range(n):
        w = windows[i * batch_size:(i + 1) * batch_size]
        yield {"input_ids": w[:, :-1].contiguous(), "labels": w[:, 1:].contiguous()}


def _mem_reset(device: str):
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    return rss_mb()


def _mem_report(device: str, base_rss: float) -> dict:
    import torch

    result = {"peak_rss_mb": round(peak_rss_mb(), 1), "rss_before_steps_mb": round(base_rss, 1),
              "peak_rss_over_setup_mb": round(peak_rss_mb() - base_rss, 1)}
    if device == "cuda":
        result["cuda_peak_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return result


def build_cache(module, windows, p: dict, device: str, directory: str) -> dict:
    """Teacher top-k cache of the benchmark's windows (one block per window), attached to ``module``: its
    training steps then read the teacher's targets from disk. Returns the build pass's own throughput."""
    import torch

    from lightning_slimmoe.teacher_cache import TeacherCache, cache_key

    teacher = module.teacher.to(device)
    key = cache_key([("bench", module.kd)], seq_len=p["seq_len"] - 1, vocab_size=teacher.config.vocab_size,
                    value_dtype="float32", teacher_dtype="float32",
                    precision="bf16-mixed" if device == "cuda" else "32-true")
    cache = TeacherCache(directory, key, windows, torch.arange(windows.shape[0]))
    cache.check()
    cache.check_teacher(module.teacher_fingerprint)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda")  # as bf16-mixed steps run it

    def targets(ids_BT):
        with autocast:
            return module.teacher_targets(ids_BT.to(device))

    t0 = time.perf_counter()
    cache.build(targets, p["batch_size"])
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    module.teacher.to("cpu")  # the Trainer places the whole module
    module.teacher_cache = cache.open()
    tokens = windows.shape[0] * (p["seq_len"] - 1)
    return {"cache_build_s": seconds, "cache_build_tokens_per_s": tokens / seconds,
            "cache_bytes": cache.info()["bytes"], "cache_bytes_per_token": key.bytes_per_token}


def worker_ours(setup: dict, p: dict, device: str, top_k: int | None, attn: str | None = None,
                cached: bool = False) -> dict:
    import lightning.pytorch as pl
    import torch
    from torch.utils.data import DataLoader

    from lightning_slimmoe.config import OptimizerConfig
    from lightning_slimmoe.distill import KDConfig
    from lightning_slimmoe.module import StageModule

    teacher, student, windows = _load(setup, device if device == "cpu" else "cpu", attn)
    n = p["warmup"] + p["steps"]
    data = list(_batches(windows, p["batch_size"], n))
    kd = KDConfig(top_k=top_k or setup["vocab_size"])
    module = StageModule(student, teacher, kd=kd, optimizer=OptimizerConfig(lr=1e-4, warmup_ratio=0.0))
    marks, cache_stats = {}, {}
    cache_dir = tempfile.TemporaryDirectory()
    if cached:
        cache_stats = build_cache(module, windows[: n * p["batch_size"]], p, device, cache_dir.name)
        for i, batch in enumerate(data):  # training samples carry their block index (data.py does the same)
            batch["block_index"] = torch.arange(i * p["batch_size"], (i + 1) * p["batch_size"])

    class Timer(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            marks["base_rss"] = _mem_reset(device)

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == p["warmup"]:
                if device == "cuda":
                    torch.cuda.synchronize()
                marks["t0"], marks["cpu0"] = time.perf_counter(), time.process_time()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == n - 1:
                if device == "cuda":
                    torch.cuda.synchronize()
                marks["t1"], marks["cpu1"] = time.perf_counter(), time.process_time()

    trainer = pl.Trainer(accelerator="gpu" if device == "cuda" else "cpu", devices=1, max_steps=n, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, limit_val_batches=0,
                         precision="bf16-mixed" if device == "cuda" else "32-true", callbacks=[Timer()])
    trainer.fit(module, train_dataloaders=DataLoader(data, batch_size=None))
    cache_dir.cleanup()
    seconds = marks["t1"] - marks["t0"]
    tokens = p["steps"] * p["batch_size"] * (p["seq_len"] - 1)
    # CPU seconds of this process per step: on a CPU shared with other jobs, steadier than the wall clock.
    step_cpu_s = (marks["cpu1"] - marks["cpu0"]) / p["steps"]
    return {"tokens_per_s": tokens / seconds, "step_s": seconds / p["steps"], "step_cpu_s": step_cpu_s,
            "tokens": tokens, "kd_top_k": kd.top_k, **cache_stats, **_mem_report(device, marks["base_rss"])}


def worker_floor(setup: dict, p: dict, device: str) -> dict:
    import torch
    import torch.nn.functional as F

    teacher, student, windows = _load(setup, device)
    teacher.requires_grad_(False)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)
    n = p["warmup"] + p["steps"]
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda")
    base = _mem_reset(device)
    for i, batch in enumerate(_batches(windows, p["batch_size"], n)):
        if i == p["warmup"]:
            t0 = time.perf_counter()
        ids = batch["input_ids"].to(device)
        with autocast:
            s_logits = student(input_ids=ids, use_cache=False).logits.float()
            with torch.no_grad():
                t_logits = teacher(input_ids=ids, use_cache=False).logits.float()
        loss = F.kl_div(F.log_softmax(s_logits, -1).flatten(0, 1), F.log_softmax(t_logits, -1).flatten(0, 1),
                        reduction="batchmean", log_target=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return _timed_result(device, t0, p, base)


def _timed_result(device: str, t0: float, p: dict, base) -> dict:
    """Throughput of the timed steps since ``t0`` and the peak memory since ``base``."""
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    tokens = p["steps"] * p["batch_size"] * (p["seq_len"] - 1)
    return {"tokens_per_s": tokens / seconds, "step_s": seconds / p["steps"], "tokens": tokens,
            **_mem_report(device, base)}


def worker_scoring(setup: dict, p: dict, device: str) -> dict:
    import torch

    from lightning_slimmoe.distill import KDConfig
    from lightning_slimmoe.importance import compute_scores

    teacher, student, windows = _load(setup, device)
    n = p["warmup"] + p["steps"]
    batches = [{k: v.to(device) for k, v in b.items()} for b in _batches(windows, p["batch_size"], n)]
    base = _mem_reset(device)
    compute_scores(student, batches[: p["warmup"]], "kd_taylor", teacher=teacher, kd=KDConfig())
    t0 = time.perf_counter()
    compute_scores(student, batches[p["warmup"]:], "kd_taylor", teacher=teacher, kd=KDConfig())
    return _timed_result(device, t0, p, base)


def worker_trl(setup: dict, p: dict, device: str) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    teacher, student, windows = _load(setup, device)
    tokenizer = AutoTokenizer.from_pretrained(setup["tokenizer"])
    n = p["warmup"] + p["steps"]
    rows = []
    for w in windows[: n * p["batch_size"]]:
        text = tokenizer.decode(w.tolist())
        cut = max(1, len(text) // 64)  # a short "prompt", the rest is the completion that is distilled
        rows.append({"messages": [{"role": "user", "content": text[:cut]},
                                  {"role": "assistant", "content": text[cut:]}]})
    marks = {"tokens": 0, "loss_tokens": 0}

    class Timed(GKDTrainer):
        def compute_loss(self, model, inputs, *args, **kwargs):
            if self.state.global_step >= p["warmup"]:
                marks["tokens"] += int(inputs["attention_mask"].sum())
                marks["loss_tokens"] += int((inputs["labels"][:, 1:] != -100).sum())
            return super().compute_loss(model, inputs, *args, **kwargs)

    class Timer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            marks["base_rss"] = _mem_reset(device)

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == p["warmup"]:
                marks["t0"] = time.perf_counter()
            if state.global_step == n:
                if device == "cuda":
                    torch.cuda.synchronize()
                marks["t1"] = time.perf_counter()

    with tempfile.TemporaryDirectory() as tmp:
        args = GKDConfig(output_dir=tmp, per_device_train_batch_size=p["batch_size"], max_steps=n, lmbda=0.0, beta=0.0,
                         seq_kd=False, temperature=1.0, max_length=p["seq_len"], learning_rate=1e-4,
                         lr_scheduler_type="constant", logging_steps=10_000, save_strategy="no", report_to=[],
                         use_cpu=device == "cpu", bf16=device == "cuda", dataloader_num_workers=0,
                         gradient_checkpointing=False, max_grad_norm=1.0, seed=0)
        trainer = Timed(model=student, teacher_model=teacher, args=args, train_dataset=Dataset.from_list(rows),
                        processing_class=tokenizer, callbacks=[Timer()])
        trainer.train()
    seconds = marks["t1"] - marks["t0"]
    return {"tokens_per_s": marks["tokens"] / seconds, "step_s": seconds / p["steps"], "tokens": marks["tokens"],
            "loss_tokens": marks["loss_tokens"], **_mem_report(device, marks["base_rss"])}


def run_worker(name: str, setup: dict, p: dict, device: str) -> dict:
    import torch

    torch.manual_seed(0)
    if name == "ours_topk":
        result = worker_ours(setup, p, device, top_k=8)
    elif name == "ours_topk_cached":
        result = worker_ours(setup, p, device, top_k=8, cached=True)
    elif name == "ours_fullkl":
        result = worker_ours(setup, p, device, top_k=None)
    elif name == "ours_topk_flash":
        result = worker_ours(setup, p, device, top_k=8, attn="flash_attention_2")
    elif name == "floor":
        result = worker_floor(setup, p, device)
    elif name == "scoring":
        result = worker_scoring(setup, p, device)
    elif name == "trl_gkd":
        result = worker_trl(setup, p, device)
    else:
        raise ValueError(name)
    result["torch_threads"] = torch.get_num_threads()
    return result


# ---------------------------------------------------------------------------------------------------
def active_params(path: str) -> int:
    from transformers import AutoConfig

    from lightning_slimmoe.params import count_config_params

    return count_config_params(AutoConfig.from_pretrained(path)).active


def available(name: str, device: str) -> str | None:
    """None if the configuration can run here, else why not."""
    import importlib.util

    if name == "trl_gkd" and importlib.util.find_spec("trl") is None:
        return "trl not installed (pip install -r bench/requirements.txt)"
    if name == "ours_topk_flash":
        if device != "cuda":
            return "flash-attn needs CUDA"
        if importlib.util.find_spec("flash_attn") is None:
            return "flash-attn not installed"
    return None


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None, help="default: cpu / gpu by --device")
    parser.add_argument("--configs", default="", help=f"comma-separated subset of {CONFIGS}")
    parser.add_argument("--text", default=None, help="text file for the token windows (default: stdlib sources)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    preset_name = args.preset or ("gpu" if args.device == "cuda" else "cpu")
    p = PRESETS[preset_name]
    out = Path(args.out).resolve()

    if args.worker:  # child process: one configuration, result as JSON on the last stdout line
        setup = json.loads((out / "work" / "setup.json").read_text())
        print("RESULT " + json.dumps(run_worker(args.worker, setup, p, args.device)), flush=True)
        return {}

    out.mkdir(parents=True, exist_ok=True)
    setup = prepare(out, p, args.text)
    wanted = [c for c in args.configs.split(",") if c] or CONFIGS
    results, skipped = {}, {}
    for name in wanted:
        why = available(name, args.device)
        if why:
            skipped[name] = why
            continue
        cmd = [sys.executable, str(Path(__file__).resolve()), "--out", str(out), "--device", args.device,
               "--preset", preset_name, "--worker", name]
        started = time.time()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=str(ROOT))
        lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            skipped[name] = f"failed (rc {proc.returncode}): " + (proc.stderr.strip().splitlines() or ["?"])[-1][:300]
            (out / f"{name}.stderr.txt").write_text(proc.stderr)
            print(f"{name}: {skipped[name]}", flush=True)
            continue
        results[name] = json.loads(lines[-1][len("RESULT "):])
        results[name]["process_wall_s"] = round(time.time() - started, 1)
        print(f"{name}: {results[name]['tokens_per_s']:,.0f} tok/s, peak RSS {results[name]['peak_rss_mb']:,.0f} MB",
              flush=True)

    ratios = {}
    for ours in ("ours_topk", "ours_fullkl"):
        for peer in ("trl_gkd", "floor"):
            if ours in results and peer in results:
                ratios[f"{ours}/{peer}_tokens_per_s"] = results[ours]["tokens_per_s"] / results[peer]["tokens_per_s"]
                key = "cuda_peak_allocated_mb" if args.device == "cuda" else "peak_rss_mb"
                ratios[f"{ours}/{peer}_peak_memory"] = results[ours][key] / results[peer][key]
    if "scoring" in results and "ours_topk" in results:
        ratios["scoring/ours_topk_tokens_per_s"] = results["scoring"]["tokens_per_s"] / results["ours_topk"]["tokens_per_s"]
    if "ours_topk_cached" in results and "ours_topk" in results:
        cached, live = results["ours_topk_cached"], results["ours_topk"]
        ratios["ours_topk_cached/ours_topk_step_s"] = cached["step_s"] / live["step_s"]
        ratios["ours_topk_cached/ours_topk_tokens_per_s"] = cached["tokens_per_s"] / live["tokens_per_s"]
        ratios["ours_topk_cached/ours_topk_step_cpu_s"] = cached["step_cpu_s"] / live["step_cpu_s"]
        # The build pass runs the teacher once per block; every later read of the block saves (live - cached).
        ratios["cache_build/ours_topk_tokens_per_s"] = cached["cache_build_tokens_per_s"] / live["tokens_per_s"]
    if "ours_topk_flash" in results and "ours_topk" in results:
        ratios["flash/sdpa_tokens_per_s"] = results["ours_topk_flash"]["tokens_per_s"] / results["ours_topk"]["tokens_per_s"]
    if args.device == "cuda":
        import torch

        name = torch.cuda.get_device_name()
        peak = next((v for k, v in PEAK_FLOPS.items() if k in name), None)
        student_flops, teacher_flops = 6 * active_params(setup["student"]), 2 * active_params(setup["teacher"])
        for config, r in results.items():
            if peak and "scoring" not in config:  # the cached step runs no teacher forward
                flops_per_token = student_flops + (0 if config == "ours_topk_cached" else teacher_flops)
                r["mfu"] = r["tokens_per_s"] * flops_per_token / peak
    import torch

    summary = {"device": args.device, "preset": preset_name, "batch_size": p["batch_size"], "seq_len": p["seq_len"],
               "warmup_steps": p["warmup"], "measured_steps": p["steps"], "torch_threads": torch.get_num_threads(),
               "teacher_active_params": active_params(setup["teacher"]),
               "student_active_params": active_params(setup["student"]), "vocab_size": setup["vocab_size"],
               "memory_method": ("torch.cuda.max_memory_allocated from the first measured step" if args.device == "cuda"
                                 else "ru_maxrss of a fresh process per configuration (whole process: interpreter, "
                                      "libraries, both models, optimizer state, activations); *over setup* subtracts "
                                      "VmRSS right before the first (warm-up) step, models loaded"),
               "results": results, "ratios": ratios, "skipped": skipped}
    (out / "speed.json").write_text(json.dumps(summary, indent=2))
    (out / "speed.md").write_text(markdown(summary))
    print(markdown(summary))
    return summary


def markdown(s: dict) -> str:
    cuda = s["device"] == "cuda"
    head = "| configuration | tokens/s | s/step | peak RSS MB | peak RSS over setup MB |" + (" CUDA peak MB | MFU |" if cuda else "")
    lines = [f"{s['device']}, batch {s['batch_size']} x seq {s['seq_len']}, vocab {s['vocab_size']:,}, teacher "
             f"{s['teacher_active_params']:,} / student {s['student_active_params']:,} active params, "
             f"{s['measured_steps']} measured steps after {s['warmup_steps']} warm-up, {s['torch_threads']} threads.",
             f"Memory: {s['memory_method']}.", "", head, "|---" * (head.count("|") - 1) + "|"]
    for name, r in s["results"].items():
        row = (f"| {name} | {r['tokens_per_s']:,.0f} | {r['step_s']:.3f} | {r['peak_rss_mb']:,.0f} | "
               f"{r['peak_rss_over_setup_mb']:,.0f} |")
        if cuda:
            row += f" {r.get('cuda_peak_allocated_mb', 0):,.0f} | {r.get('mfu', float('nan')):.3f} |"
        lines.append(row)
    if s["ratios"]:
        lines += ["", "| ratio | value |", "|---|---:|"] + [f"| {k} | {v:.2f} |" for k, v in s["ratios"].items()]
    for name, why in s["skipped"].items():
        lines.append(f"\n* {name}: not run ({why})")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
