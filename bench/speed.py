"""Speed benchmark: our KD training step against TRL's GKDTrainer and a plain PyTorch floor.

    python bench/speed.py --out bench/out/speed-cpu --device cpu
    python bench/speed.py --out bench/out/speed-32k --device cpu --vocab 32064 --configs ours_topk,trl_gkd
    python bench/speed.py --out bench/out/speed-cuda --device cuda          # the `gpu` preset: ~1B-active student

One teacher/student pair (a Qwen3-MoE-shaped teacher as in ``bench/quality.py`` and its final 25%-width,
half-KV-group student; random weights, speed does not depend on them), one batch size and sequence length,
the same token windows for every configuration. ``--vocab V`` (and ``--hidden``, ``--experts``,
``--expert-width``) change the model shape of the preset and nothing else: the tokenizer is still trained at the
preset's vocabulary, the models get V output rows (ids the text never uses cost the same projection), so the
same comparison runs at Phi's 32,064 or Qwen's 151,936 vocabulary.

  ours_topk      our Lightning training step (StageModule + Trainer), top-k KD loss (k = 8), fused LM head + loss
  ours_topk_ckpt the same step with the previous, checkpointed loss (distill_loss(fused=False): the [chunk, V]
                 logits recomputed in backward)
  bare_topk      our loss and optimizer (StageModule.forward_loss, clipping, AdamW) in a plain PyTorch loop, no
                 Lightning: ours_topk / bare_topk is the cost of Lightning's hooks and our logging
  ours_topk_cached  ours_topk reading the teacher's top-8 from a prebuilt teacher cache (teacher_cache.py) instead
                 of running the teacher forward; the one-off build pass is timed separately (cache_build_*)
  ours_topk_8bit (CUDA, bitsandbytes) ours_topk with the teacher in 8 bit (quantize.py, ``teacher_8bit: true``)
  ours_fullkl    the same step with the KD loss over the full vocabulary (top_k = vocab size)
  ours_topk_flash  (CUDA with flash-attn installed) ours_topk with attn_implementation=flash_attention_2
  floor          a plain PyTorch loop: student + teacher forward, full-vocab KL, backward, AdamW step
  trl_gkd        TRL ``GKDTrainer`` (lmbda=0, beta=0 = forward KL on the data, seq_kd=False), text as chat
  scoring        our kd_taylor importance-scoring pass (forward + backward, no optimizer) on the student

``ours_topk``, ``ours_topk_ckpt``, ``bare_topk`` and ``scoring`` take an expert-kernel suffix, e.g.
``ours_topk:eager`` or ``scoring:batched_mm`` (transformers' ``experts_implementation``; none = our automatic
per-device choice, module.choose_experts_implementation), to compare the kernels side by side.
``--repeats R`` runs the whole list R times, interleaved (A B A B ...); every figure is then the median of the R
runs and every ratio the median of the R per-round ratios (each round's configurations ran minutes apart, under
about the same load), with the per-round values kept under ``runs`` / ``ratio_runs``.

Every configuration runs in a fresh subprocess, so that the peak memory figure is its own: on CPU the
process's ``ru_maxrss`` (peak resident set size: interpreter, libraries, both models, activations and
optimizer state), also shown minus the RSS measured right before the first (warm-up) step; on CUDA
``torch.cuda.max_memory_allocated`` from the first step on. Throughput is measured after warm-up steps; our
Lightning steps also report the process's CPU time per step (``step_cpu_s``), steadier than the wall clock on a
CPU shared with other jobs.
The 1-minute load average is recorded before and after every configuration (``load_before`` / ``load_after``):
on a shared CPU a figure means little without it.
On CUDA, MFU counts the FLOPs of the KD step's matmuls over active parameters: 6 x (student active - input
embedding) + 2 x (teacher active - input embedding) per token (the embedding lookup is no matmul; attention's
sequence-length term is left out), 6 x student only for the cached step.
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
    # One H200 within bench/gpu_check.sh's minutes: a Qwen3-MoE-shaped teacher of 3.9B (1.23B active) parameters
    # with Qwen's 151,936 vocabulary, and its final student (25% expert width, half the KV groups): 1.6B total,
    # 0.89B active (0.58B of them the embedding and the head).
    "gpu": dict(quality_preset="gpu", batch_size=8, seq_len=1024, warmup=3, steps=10, max_chars=4_000_000,
                shape=dict(hidden=2048, layers=16, heads=16, kv_heads=8, expert_width=2048, experts=16,
                           vocab=151_936)),
}
CONFIGS = ["ours_topk", "ours_topk_ckpt", "bare_topk", "ours_topk_cached", "ours_fullkl", "floor", "trl_gkd",
           "scoring", "ours_topk_flash", "ours_topk_8bit"]
EXPERT_KERNELS = ("grouped_mm", "batched_mm", "eager")
KERNEL_CONFIGS = ("ours_topk", "ours_topk_ckpt", "bare_topk", "scoring")  # take a ":<kernel>" suffix
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
SHAPE_KEYS = ("hidden", "layers", "heads", "kv_heads", "expert_width", "experts", "vocab")


def model_shape(preset: dict, overrides: dict | None = None) -> dict:
    """The teacher's shape: the quality preset's, then the speed preset's ``shape``, then the command line's."""
    from bench.quality import PRESETS as QUALITY

    q = QUALITY[preset["quality_preset"]]
    shape = {k: q[k] for k in SHAPE_KEYS}
    shape.update(preset.get("shape", {}))
    shape.update({k: v for k, v in (overrides or {}).items() if v is not None})
    shape["vocab_overridden"] = shape["vocab"] != q["vocab"]
    return shape


def prepare(out: Path, preset: dict, text_file: str | None, shape: dict | None = None, device: str = "cpu") -> dict:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from bench.quality import PRESETS as QUALITY, final_shape, teacher_model_config
    from lightning_slimmoe.data import TextDataModule

    q = dict(QUALITY[preset["quality_preset"]])
    shape = shape or model_shape(preset)
    work = out / "work"
    if (work / "windows.pt").exists() and (work / "setup.json").exists():
        setup = json.loads((work / "setup.json").read_text())
        if setup.get("shape") == shape:
            return setup
        print(f"{work}: built for another model shape ({setup.get('shape')}); rebuilding", flush=True)
    work.mkdir(parents=True, exist_ok=True)
    dm = TextDataModule(files=[text_file] if text_file else None, max_chars=preset["max_chars"])
    # The tokenizer is trained at the quality preset's vocabulary (a BPE on this corpus cannot reach 150k merges);
    # a larger --vocab only adds output rows the text never uses, which cost the same projection.
    tokenizer = dm.train_tokenizer(min(q["vocab"], shape["vocab"]), str(work / "tokenizer"))
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"  # plain text as chat for TRL
    tokenizer.save_pretrained(work / "tokenizer")
    q.update({k: shape[k] for k in SHAPE_KEYS})
    cfg = teacher_model_config({**q, "seq_len": preset["seq_len"]})
    if shape["vocab"] < len(tokenizer):
        raise ValueError(f"--vocab {shape['vocab']} is smaller than the trained tokenizer ({len(tokenizer)} tokens)")
    cfg["vocab_size"] = shape["vocab"] if shape["vocab_overridden"] else len(tokenizer)
    teacher_config = AutoConfig.for_model(**cfg)
    # Big (gpu preset) models are built on the GPU and stored in bf16: init and the disk round trip take seconds.
    build_device = device if device == "cuda" else "cpu"
    store_dtype = torch.bfloat16 if build_device == "cuda" else torch.float32
    for name, config, seed in (("teacher", teacher_config, 0), ("student", final_shape(teacher_config, q), 1)):
        torch.manual_seed(seed)
        with torch.device(build_device):
            model = AutoModelForCausalLM.from_config(config)
        model.to(store_dtype).save_pretrained(work / name)
        tokenizer.save_pretrained(work / name)
        del model
    ids = torch.as_tensor(tokenizer("\n".join(dm.load_documents()), add_special_tokens=False, verbose=False)["input_ids"])
    need = (preset["warmup"] + preset["steps"] + 1) * preset["batch_size"]
    num = ids.numel() // preset["seq_len"]
    if num < need:
        raise ValueError(f"corpus too short: {num} windows of {preset['seq_len']} tokens, need {need}")
    torch.save(ids[: need * preset["seq_len"]].view(need, preset["seq_len"]).clone(), work / "windows.pt")
    setup = {"teacher": str(work / "teacher"), "student": str(work / "student"), "tokenizer": str(work / "tokenizer"),
             "windows": str(work / "windows.pt"), "vocab_size": cfg["vocab_size"], "tokenizer_size": len(tokenizer),
             "shape": shape}
    (work / "setup.json").write_text(json.dumps(setup))
    return setup


# ---------------------------------------------------------------------------------------------------
# workers (one fresh process each)
# ---------------------------------------------------------------------------------------------------
def _load(setup: dict, device: str, attn: str | None = None, teacher_8bit: bool = False):
    import torch
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": torch.float32}
    if attn:
        kwargs["attn_implementation"] = attn
    if device == "cuda":
        kwargs["device_map"] = "cuda"  # straight onto the GPU (the gpu preset's teacher is 16 GB in fp32)
    if teacher_8bit:
        from lightning_slimmoe.quantize import load_teacher_8bit

        teacher = load_teacher_8bit(setup["teacher"], torch.float32).eval()
    else:
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
    module.teacher_cache = cache.open()
    tokens = windows.shape[0] * (p["seq_len"] - 1)
    return {"cache_build_s": seconds, "cache_build_tokens_per_s": tokens / seconds,
            "cache_bytes": cache.info()["bytes"], "cache_bytes_per_token": key.bytes_per_token}


def _kd_module(setup: dict, teacher, student, top_k: int | None, kernel: str | None):
    from lightning_slimmoe.config import OptimizerConfig
    from lightning_slimmoe.distill import KDConfig
    from lightning_slimmoe.module import StageModule

    kd = KDConfig(top_k=top_k or setup["vocab_size"])
    return StageModule(student, teacher, kd=kd, optimizer=OptimizerConfig(lr=1e-4, warmup_ratio=0.0),
                       experts_implementation=kernel)


def _checkpointed_loss() -> None:
    """This process's StageModule uses the previous, checkpointed loss path (ours_topk_ckpt)."""
    import functools

    import lightning_slimmoe.module as module_py

    module_py.distill_loss = functools.partial(module_py.distill_loss, fused=False)


def worker_ours(setup: dict, p: dict, device: str, top_k: int | None, attn: str | None = None,
                cached: bool = False, kernel: str | None = None, teacher_8bit: bool = False) -> dict:
    import lightning.pytorch as pl
    import torch
    from torch.utils.data import DataLoader

    teacher, student, windows = _load(setup, device, attn, teacher_8bit=teacher_8bit)
    n = p["warmup"] + p["steps"]
    data = list(_batches(windows, p["batch_size"], n))
    module = _kd_module(setup, teacher, student, top_k, kernel)
    kernels = module.apply_experts_kernel(device)
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
            "tokens": tokens, "kd_top_k": module.kd.top_k, "experts_kernels": kernels, **cache_stats,
            **_mem_report(device, marks["base_rss"])}


def worker_bare(setup: dict, p: dict, device: str, kernel: str | None = None) -> dict:
    """ours_topk's work without Lightning: StageModule.forward_loss, backward, clip to 1.0, AdamW (as
    configure_optimizers builds it), the LR scheduler step; nothing logged."""
    import torch

    teacher, student, windows = _load(setup, device)
    module = _kd_module(setup, teacher, student, 8, kernel).to(device)
    kernels = module.apply_experts_kernel(device)
    module.train()
    cfg = module.optim_cfg
    params = [q for q in student.parameters() if q.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay,
                                  fused=True if device == "cuda" else None)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda")
    base, marks = _mem_reset(device), {}
    for batch in _timed_batches(windows, p, device, marks):
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast:
            out = module.forward_loss(batch)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    result = _timed_result(device, marks["t0"], p, base, marks["cpu0"])
    return {**result, "experts_kernels": kernels}


def worker_floor(setup: dict, p: dict, device: str) -> dict:
    import torch
    import torch.nn.functional as F

    teacher, student, windows = _load(setup, device)
    teacher.requires_grad_(False)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda")
    base, marks = _mem_reset(device), {}
    for batch in _timed_batches(windows, p, device, marks):
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
    return _timed_result(device, marks["t0"], p, base, marks["cpu0"])


def _timed_batches(windows, p: dict, device: str, marks: dict):
    """The warm-up and measured batches; ``marks`` gets the wall and CPU clocks (``t0`` / ``cpu0``) as the first
    measured step starts (after a CUDA sync: the warm-up's kernels are not counted)."""
    import torch

    for i, batch in enumerate(_batches(windows, p["batch_size"], p["warmup"] + p["steps"])):
        if i == p["warmup"]:
            if device == "cuda":
                torch.cuda.synchronize()
            marks["t0"], marks["cpu0"] = time.perf_counter(), time.process_time()
        yield batch


def _timed_result(device: str, t0: float, p: dict, base, cpu0: float | None = None) -> dict:
    """Throughput of the timed steps since ``t0`` and the peak memory since ``base``."""
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    tokens = p["steps"] * p["batch_size"] * (p["seq_len"] - 1)
    result = {"tokens_per_s": tokens / seconds, "step_s": seconds / p["steps"], "tokens": tokens,
              **_mem_report(device, base)}
    if cpu0 is not None:
        result["step_cpu_s"] = (time.process_time() - cpu0) / p["steps"]
    return result


def worker_scoring(setup: dict, p: dict, device: str, kernel: str | None = None) -> dict:
    import torch

    from lightning_slimmoe.distill import KDConfig
    from lightning_slimmoe.importance import compute_scores
    from lightning_slimmoe.module import set_experts_implementation_

    teacher, student, windows = _load(setup, device)
    kernels = {role: set_experts_implementation_(model, device, kernel, role=role)
               for role, model in (("student", student), ("teacher", teacher))}
    n = p["warmup"] + p["steps"]
    batches = [{k: v.to(device) for k, v in b.items()} for b in _batches(windows, p["batch_size"], n)]
    base = _mem_reset(device)
    # fp32, as ExpertSlimming scores in the pipeline (its setup hook runs outside the precision plugin's autocast)
    compute_scores(student, batches[: p["warmup"]], "kd_taylor", teacher=teacher, kd=KDConfig())
    if device == "cuda":
        torch.cuda.synchronize()
    t0, cpu0 = time.perf_counter(), time.process_time()
    compute_scores(student, batches[p["warmup"]:], "kd_taylor", teacher=teacher, kd=KDConfig())
    return {**_timed_result(device, t0, p, base, cpu0), "experts_kernels": kernels}


def worker_kernels(setup: dict, p: dict, device: str) -> dict:
    """transformers' three fused-experts kernels on the same models and batch, in one process: the teacher's
    forward (inference mode) and the student's forward + backward, median of ``steps`` (at most 5) after one
    warm-up each, interleaved; and the largest |logit| difference of each kernel to ``eager`` (student, fp32)."""
    import torch

    teacher, student, windows = _load(setup, device)
    batch = next(_batches(windows, p["batch_size"], 1))
    ids = batch["input_ids"].to(device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda")

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def one(kernel: str) -> tuple[float, float]:
        teacher.set_experts_implementation(kernel)
        student.set_experts_implementation(kernel)
        sync()
        t0 = time.perf_counter()
        with autocast, torch.inference_mode():
            teacher.model(input_ids=ids, use_cache=False)
        sync()
        t1 = time.perf_counter()
        with autocast:
            hidden = student.model(input_ids=ids, use_cache=False).last_hidden_state
        hidden.float().square().mean().backward()
        sync()
        student.zero_grad(set_to_none=True)
        return t1 - t0, time.perf_counter() - t1

    # batched_mm gathers every routed token's expert weights ([tokens * top_k, 2I, H] and [.., H, I]): a decoding
    # kernel; at a training batch of a big model that is hundreds of GB, so it is left out beyond a few GB.
    cfg = teacher.config
    width = getattr(cfg, "moe_intermediate_size", None) or cfg.intermediate_size
    gathered = ids.numel() * cfg.num_experts_per_tok * 3 * width * cfg.hidden_size * (2 if device == "cuda" else 4)
    kernels = [k for k in EXPERT_KERNELS if k != "batched_mm" or gathered <= 4 * 2**30]
    skipped = {} if "batched_mm" in kernels else {
        "batched_mm": f"would gather {gathered / 2**30:,.0f} GiB of expert weights for {ids.numel():,} tokens"}
    times = {k: [] for k in kernels}
    for kernel in kernels:
        one(kernel)
    for _ in range(min(5, p["steps"])):
        for kernel in kernels:
            times[kernel].append(one(kernel))
    logits = {}
    with torch.no_grad():
        for kernel in ("eager", *kernels):
            student.set_experts_implementation(kernel)
            logits[kernel] = student(input_ids=ids[:2], use_cache=False).logits.float()
    tokens = ids.numel()
    out = {}
    for kernel, runs in times.items():
        teacher_s = sorted(t for t, _ in runs)[len(runs) // 2]
        student_s = sorted(s for _, s in runs)[len(runs) // 2]
        out[kernel] = {"teacher_forward_s": teacher_s, "student_forward_backward_s": student_s,
                       "tokens_per_s": tokens / (teacher_s + student_s),
                       "max_abs_logit_diff_vs_eager": float((logits[kernel] - logits["eager"]).abs().max())}
    fastest = max(out, key=lambda k: out[k]["tokens_per_s"])
    from lightning_slimmoe.module import choose_experts_implementation

    return {"kernels": out, "fastest": fastest, "automatic": choose_experts_implementation(device),
            "tokens": tokens, "repeats": len(times[fastest]), "skipped": skipped}


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
                if device == "cuda":
                    torch.cuda.synchronize()
                marks["t0"], marks["cpu0"] = time.perf_counter(), time.process_time()
            if state.global_step == n:
                if device == "cuda":
                    torch.cuda.synchronize()
                marks["t1"], marks["cpu1"] = time.perf_counter(), time.process_time()

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
            "step_cpu_s": (marks["cpu1"] - marks["cpu0"]) / p["steps"],
            "loss_tokens": marks["loss_tokens"], **_mem_report(device, marks["base_rss"])}


def split_kernel(name: str) -> tuple[str, str | None]:
    """``ours_topk:eager`` -> (``ours_topk``, ``eager``); no suffix -> (name, None) = automatic."""
    base, _, kernel = name.partition(":")
    return base, kernel or None


def run_worker(name: str, setup: dict, p: dict, device: str) -> dict:
    import torch

    torch.manual_seed(0)
    base, kernel = split_kernel(name)
    if base == "ours_topk":
        result = worker_ours(setup, p, device, top_k=8, kernel=kernel)
    elif base == "ours_topk_ckpt":
        _checkpointed_loss()
        result = worker_ours(setup, p, device, top_k=8, kernel=kernel)
    elif base == "bare_topk":
        result = worker_bare(setup, p, device, kernel=kernel)
    elif base == "ours_topk_cached":
        result = worker_ours(setup, p, device, top_k=8, cached=True)
    elif base == "ours_topk_8bit":
        result = worker_ours(setup, p, device, top_k=8, teacher_8bit=True)
    elif base == "ours_fullkl":
        result = worker_ours(setup, p, device, top_k=None)
    elif base == "ours_topk_flash":
        result = worker_ours(setup, p, device, top_k=8, attn="flash_attention_2")
    elif base == "floor":
        result = worker_floor(setup, p, device)
    elif base == "scoring":
        result = worker_scoring(setup, p, device, kernel=kernel)
    elif base == "trl_gkd":
        result = worker_trl(setup, p, device)
    elif base == "experts_kernels":
        result = worker_kernels(setup, p, device)
    else:
        raise ValueError(name)
    result["torch_threads"] = torch.get_num_threads()
    return result


# ---------------------------------------------------------------------------------------------------
def active_params(path: str) -> int:
    from transformers import AutoConfig

    from lightning_slimmoe.params import count_config_params

    return count_config_params(AutoConfig.from_pretrained(path)).active


def matmul_params(path: str) -> int:
    """Active parameters that take part in a matmul: all active ones but the input embedding (a lookup)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    return active_params(path) - config.vocab_size * config.hidden_size


def available(name: str, device: str) -> str | None:
    """None if the configuration can run here, else why not."""
    import importlib.util

    base, kernel = split_kernel(name)
    if base not in CONFIGS and base != "experts_kernels":
        return f"unknown configuration (one of {CONFIGS + ['experts_kernels']})"
    if kernel is not None and (base not in KERNEL_CONFIGS or kernel not in EXPERT_KERNELS):
        return f"a ':<kernel>' suffix is for {list(KERNEL_CONFIGS)}, kernels {list(EXPERT_KERNELS)}"
    if base == "trl_gkd" and importlib.util.find_spec("trl") is None:
        return "trl not installed (pip install -r bench/requirements.txt)"
    if base == "ours_topk_flash":
        if device != "cuda":
            return "flash-attn needs CUDA"
        if importlib.util.find_spec("flash_attn") is None:
            return "flash-attn not installed"
    if base == "ours_topk_8bit":
        if device != "cuda":
            return "the 8-bit teacher is benchmarked on CUDA (bitsandbytes' CPU int8 matmul is a slow fallback)"
        if importlib.util.find_spec("bitsandbytes") is None:
            return "bitsandbytes not installed"
    return None


RATIO_PAIRS = [  # (numerator, denominator): tokens/s and memory ratios when both ran
    ("ours_topk", "trl_gkd"), ("ours_topk", "floor"), ("ours_fullkl", "trl_gkd"), ("ours_fullkl", "floor"),
    ("ours_topk_ckpt", "trl_gkd"), ("ours_topk", "ours_topk_ckpt"), ("ours_topk", "bare_topk"),
    ("ours_topk_8bit", "ours_topk"),
]


def compute_ratios(results: dict, device: str) -> dict:
    """Ratios of one round's results (one fresh process per configuration)."""
    ratios = {}
    mem_key = "cuda_peak_allocated_mb" if device == "cuda" else "peak_rss_mb"
    for ours, peer in RATIO_PAIRS:
        if ours in results and peer in results:
            a, b = results[ours], results[peer]
            ratios[f"{ours}/{peer}_tokens_per_s"] = a["tokens_per_s"] / b["tokens_per_s"]
            ratios[f"{ours}/{peer}_peak_memory"] = a[mem_key] / b[mem_key]
            if device != "cuda" and b["peak_rss_over_setup_mb"] > 0:
                ratios[f"{ours}/{peer}_peak_rss_over_setup"] = a["peak_rss_over_setup_mb"] / b["peak_rss_over_setup_mb"]
            if a.get("step_cpu_s") and b.get("step_cpu_s"):
                ratios[f"{ours}/{peer}_step_cpu_s"] = a["step_cpu_s"] / b["step_cpu_s"]
    if "scoring" in results and "ours_topk" in results:
        ratios["scoring/ours_topk_tokens_per_s"] = results["scoring"]["tokens_per_s"] / results["ours_topk"]["tokens_per_s"]
        # time per token of the scoring pass over a KD step's (the target: <= 1.5)
        ratios["scoring/ours_topk_s_per_token"] = results["ours_topk"]["tokens_per_s"] / results["scoring"]["tokens_per_s"]
    if "ours_topk_cached" in results and "ours_topk" in results:
        cached, live = results["ours_topk_cached"], results["ours_topk"]
        ratios["ours_topk_cached/ours_topk_step_s"] = cached["step_s"] / live["step_s"]
        ratios["ours_topk_cached/ours_topk_tokens_per_s"] = cached["tokens_per_s"] / live["tokens_per_s"]
        ratios["ours_topk_cached/ours_topk_step_cpu_s"] = cached["step_cpu_s"] / live["step_cpu_s"]
        # The build pass runs the teacher once per block; every later read of the block saves (live - cached).
        ratios["cache_build/ours_topk_tokens_per_s"] = cached["cache_build_tokens_per_s"] / live["tokens_per_s"]
    if "ours_topk_flash" in results and "ours_topk" in results:
        ratios["flash/sdpa_tokens_per_s"] = results["ours_topk_flash"]["tokens_per_s"] / results["ours_topk"]["tokens_per_s"]
    for name in results:  # a kernel variant against the automatic choice
        base, kernel = split_kernel(name)
        if kernel is not None and base in results:
            ratios[f"{name}/{base}_tokens_per_s"] = results[name]["tokens_per_s"] / results[base]["tokens_per_s"]
    return ratios


def _median(values: list) -> float:
    values = sorted(values)
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else 0.5 * (values[mid - 1] + values[mid])


MEDIAN_KEYS = ("tokens_per_s", "step_s", "step_cpu_s", "peak_rss_mb", "rss_before_steps_mb", "peak_rss_over_setup_mb",
               "cuda_peak_allocated_mb", "cache_build_s", "cache_build_tokens_per_s", "process_wall_s")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None, help="default: cpu / gpu by --device")
    parser.add_argument("--configs", default="", help=f"comma-separated subset of {CONFIGS} (+ experts_kernels)")
    parser.add_argument("--text", default=None, help="text file for the token windows (default: stdlib sources)")
    parser.add_argument("--vocab", type=int, default=None, help="vocabulary size of both models (default: the preset's)")
    parser.add_argument("--hidden", type=int, default=None, help="hidden size of both models (default: the preset's)")
    parser.add_argument("--experts", type=int, default=None, help="experts per layer (default: the preset's)")
    parser.add_argument("--expert-width", type=int, default=None,
                        help="the teacher's expert width (the student keeps 25%%; default: the preset's)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="run the configuration list this many times, interleaved; report medians")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    preset_name = args.preset or ("gpu" if args.device == "cuda" else "cpu")
    p = PRESETS[preset_name]
    out = Path(args.out).resolve()

    if args.worker:  # child process: one configuration, result as JSON on the last stdout line
        setup = json.loads((out / "work" / "setup.json").read_text())
        print("RESULT " + json.dumps(run_worker(args.worker, setup, p, args.device)), flush=True)
        return {}

    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device visible to torch (torch.cuda.is_available() is False)")
    shape = model_shape(p, {"vocab": args.vocab, "hidden": args.hidden, "experts": args.experts,
                            "expert_width": args.expert_width})
    out.mkdir(parents=True, exist_ok=True)
    setup = prepare(out, p, args.text, shape, args.device)
    wanted = [c for c in args.configs.split(",") if c] or CONFIGS
    rounds, skipped, kernels = [], {}, None
    for round_index in range(max(1, args.repeats)):
        results = {}
        for name in wanted:
            why = available(name, args.device)
            if why:
                skipped[name] = why
                continue
            cmd = [sys.executable, str(Path(__file__).resolve()), "--out", str(out), "--device", args.device,
                   "--preset", preset_name, "--worker", name]
            started, load_before = time.time(), os.getloadavg()[0]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=str(ROOT))
            lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                skipped[name] = f"failed (rc {proc.returncode}): " + (proc.stderr.strip().splitlines() or ["?"])[-1][:300]
                (out / f"{name.replace(':', '_')}.stderr.txt").write_text(proc.stderr)
                print(f"{name}: {skipped[name]}", flush=True)
                continue
            result = json.loads(lines[-1][len("RESULT "):])
            if name == "experts_kernels":  # not a training step: a section of its own
                kernels = result
                print(f"experts_kernels: fastest {result['fastest']}, automatic {result['automatic']}", flush=True)
                continue
            results[name] = result
            result["process_wall_s"] = round(time.time() - started, 1)
            result["load_before"], result["load_after"] = round(load_before, 2), round(os.getloadavg()[0], 2)
            print(f"[{round_index + 1}/{args.repeats}] {name}: {result['tokens_per_s']:,.0f} tok/s, peak RSS "
                  f"{result['peak_rss_mb']:,.0f} MB (over setup {result['peak_rss_over_setup_mb']:,.0f}), load "
                  f"{result['load_before']} -> {result['load_after']}", flush=True)
            # what ran so far, for a run cut short by a time limit (bench/gpu_check.sh reads it then)
            (out / "speed.partial.json").write_text(json.dumps(
                {"round": round_index + 1, "results": results, "earlier_rounds": rounds, "skipped": skipped,
                 "experts_kernels": kernels}, indent=2))
        rounds.append(results)

    ratio_runs: dict[str, list] = {}
    for results in rounds:
        for key, value in compute_ratios(results, args.device).items():
            ratio_runs.setdefault(key, []).append(value)
    ratios = {key: _median(values) for key, values in ratio_runs.items()}
    results = {}
    for name in [n for n in wanted if any(n in r for r in rounds)]:
        runs = [r[name] for r in rounds if name in r]
        merged = dict(runs[-1])
        for key in MEDIAN_KEYS:
            if all(key in r for r in runs):
                merged[key] = _median([r[key] for r in runs])
        if len(runs) > 1:
            merged["runs"] = runs
        results[name] = merged
    if args.device == "cuda":
        import torch

        name = torch.cuda.get_device_name()
        peak = next((v for k, v in PEAK_FLOPS.items() if k in name), None)
        student_flops, teacher_flops = 6 * matmul_params(setup["student"]), 2 * matmul_params(setup["teacher"])
        for config, r in results.items():
            if peak and not config.startswith("scoring"):  # the cached step runs no teacher forward
                flops_per_token = student_flops + (0 if config == "ours_topk_cached" else teacher_flops)
                r["mfu"] = r["tokens_per_s"] * flops_per_token / peak
    import torch

    summary = {"device": args.device, "preset": preset_name, "batch_size": p["batch_size"], "seq_len": p["seq_len"],
               "warmup_steps": p["warmup"], "measured_steps": p["steps"], "torch_threads": torch.get_num_threads(),
               "teacher_active_params": active_params(setup["teacher"]),
               "student_active_params": active_params(setup["student"]), "vocab_size": setup["vocab_size"],
               "shape": {k: v for k, v in shape.items() if k in SHAPE_KEYS}, "repeats": max(1, args.repeats),
               "load_avg_at_end": [round(x, 2) for x in os.getloadavg()],
               "memory_method": ("torch.cuda.max_memory_allocated from the first measured step" if args.device == "cuda"
                                 else "ru_maxrss of a fresh process per configuration (whole process: interpreter, "
                                      "libraries, both models, optimizer state, activations); *over setup* subtracts "
                                      "VmRSS right before the first (warm-up) step, models loaded"),
               "results": results, "ratios": ratios, "skipped": skipped}
    if len(rounds) > 1:
        summary["ratio_runs"] = ratio_runs
    if kernels is not None:
        summary["experts_kernels"] = kernels
    if args.device == "cuda":
        summary["gpu"] = torch.cuda.get_device_name()
        summary["mfu_flops_per_token"] = {"student_train": 6 * matmul_params(setup["student"]),
                                          "teacher_forward": 2 * matmul_params(setup["teacher"])}
    (out / "speed.json").write_text(json.dumps(summary, indent=2))
    (out / "speed.md").write_text(markdown(summary))
    print(markdown(summary))
    return summary


def markdown(s: dict) -> str:
    cuda = s["device"] == "cuda"
    head = ("| configuration | tokens/s | s/step | CPU s/step | peak RSS MB | peak RSS over setup MB | load |"
            + (" CUDA peak MB | MFU |" if cuda else ""))
    repeats = f", median of {s['repeats']} interleaved runs" if s.get("repeats", 1) > 1 else ""
    lines = [f"{s['device']}, batch {s['batch_size']} x seq {s['seq_len']}, vocab {s['vocab_size']:,}, teacher "
             f"{s['teacher_active_params']:,} / student {s['student_active_params']:,} active params, "
             f"{s['measured_steps']} measured steps after {s['warmup_steps']} warm-up, {s['torch_threads']} threads"
             f"{repeats}.",
             f"Memory: {s['memory_method']}.", "", head, "|---" * (head.count("|") - 1) + "|"]
    for name, r in s["results"].items():
        cpu = f"{r['step_cpu_s']:.3f}" if r.get("step_cpu_s") else "-"
        load = f"{r.get('load_before', '?')}-{r.get('load_after', '?')}"
        row = (f"| {name} | {r['tokens_per_s']:,.0f} | {r['step_s']:.3f} | {cpu} | {r['peak_rss_mb']:,.0f} | "
               f"{r['peak_rss_over_setup_mb']:,.0f} | {load} |")
        if cuda:
            row += f" {r.get('cuda_peak_allocated_mb', 0):,.0f} | {r.get('mfu', float('nan')):.3f} |"
        lines.append(row)
    if s["ratios"]:
        lines += ["", "| ratio | value |", "|---|---:|"] + [f"| {k} | {v:.2f} |" for k, v in s["ratios"].items()]
    kernels = s.get("experts_kernels")
    if kernels:
        lines += ["", f"Experts kernels (teacher forward + student forward/backward, {kernels['tokens']} tokens, median "
                      f"of {kernels['repeats']}): fastest {kernels['fastest']}, automatic choice {kernels['automatic']}.",
                  "", "| kernel | teacher fwd s | student fwd+bwd s | tokens/s | max abs logit diff vs eager |",
                  "|---|---:|---:|---:|---:|"]
        for k, r in kernels["kernels"].items():
            lines.append(f"| {k} | {r['teacher_forward_s']:.4f} | {r['student_forward_backward_s']:.4f} | "
                         f"{r['tokens_per_s']:,.0f} | {r['max_abs_logit_diff_vs_eager']:.2e} |")
        for k, why in kernels.get("skipped", {}).items():
            lines.append(f"| {k} | - | - | - | not run: {why} |")
    for name, why in s["skipped"].items():
        lines.append(f"\n* {name}: not run ({why})")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
