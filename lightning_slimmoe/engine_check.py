"""``slimmoe check-serving``: run a real inference engine on an export and compare it with transformers, token for token.

The engine runs in its own environment, as a child process (``engine_runners/``): ``--python`` names the interpreter
of a vLLM environment; ``--llama-cpp`` names a llama.cpp build directory (its ``libllama.so``; the source tree it was
built from, read from its ``CMakeCache.txt``, gives ``convert_hf_to_gguf.py``, which converts the export to GGUF
first, in f32). Both get the same prompts as token ids (the export's own tokenizer), decode greedily
``max_new_tokens`` tokens without stopping at EOS, and report their top-k log-probabilities per step, which are
compared with transformers' fp32 forward (this interpreter) over the same ids.

The verdict is one of: ``serves`` (every prompt decodes to the same tokens), ``differs`` (the engine loads the export
and decodes other tokens: the first divergence is named) or ``refuses`` (the conversion or the engine's load fails:
its last error line is named). One line says it, then the whole result as JSON. Exit status 0 / 1 / 2.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

RUNNERS = Path(__file__).resolve().parent / "engine_runners"
PROMPTS = ("The quick brown fox jumps over", "def fibonacci(n):\n    ", "In 1905, Albert Einstein published")
VERDICT_STATUS = {"serves": 0, "differs": 1, "refuses": 2}


class EngineSetupError(RuntimeError):
    """The engine named cannot be run as given (no such interpreter, no build, no converter)."""


# ---------------------------------------------------------------------------------------------------
# transformers, the reference
# ---------------------------------------------------------------------------------------------------
@torch.no_grad()
def reference_decode(model_dir: str | Path, prompts: list[list[int]], max_new_tokens: int, top_k: int) -> dict:
    """Greedy decoding with stock ``from_pretrained`` in fp32 (argmax of each step's logits, its own KV cache, no
    stop at EOS): ``{"tokens": [[ids]], "logprobs": [[{id: logprob}]]}`` with each step's ``top_k``."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokens, logprobs = [], []
    for ids in prompts:
        out = model(input_ids=torch.tensor([ids]), use_cache=True)
        got, steps = [], []
        for _ in range(max_new_tokens):
            row = torch.log_softmax(out.logits[0, -1].double(), dim=-1)
            values, index = row.topk(top_k)
            token = int(torch.argmax(out.logits[0, -1]))
            steps.append({str(int(i)): float(v) for v, i in zip(values, index)})
            got.append(token)
            out = model(input_ids=torch.tensor([[token]]), past_key_values=out.past_key_values, use_cache=True)
        tokens.append(got)
        logprobs.append(steps)
    return {"tokens": tokens, "logprobs": logprobs}


def prompt_ids(model_dir: str | Path, texts: list[str]) -> list[list[int]]:
    """The prompts as the export's own tokenizer encodes them (no special tokens added)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return [tokenizer.encode(t, add_special_tokens=False) for t in texts]


# ---------------------------------------------------------------------------------------------------
# the engines
# ---------------------------------------------------------------------------------------------------
def _run(cmd: list[str], env: dict, timeout: float, cwd: Path) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        return subprocess.CompletedProcess(cmd, 124, err.stdout or "", f"timed out after {timeout:.0f}s")
    except OSError as err:
        raise EngineSetupError(f"cannot run {cmd[0]}: {err}") from err


def _last_error(text: str) -> str:
    """The most telling line of an engine's log: its last exception line, else its last non-empty line."""
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    errors = [line for line in lines if re.search(r"(Error|Exception|error:|failed|assert)", line)]
    return (errors or lines or ["(no output)"])[-1][:500]


def _runner_result(done: subprocess.CompletedProcess, out: Path) -> dict:
    result = json.loads(out.read_text()) if out.exists() else {"loaded": False}
    if "error" not in result and done.returncode != 0:
        result["error"] = _last_error(done.stderr) + f" (exit status {done.returncode})"
    if "error" in result:
        log = (done.stdout or "") + "\n" + (done.stderr or "")  # an engine's worker processes log to either
        result["log_tail"] = log[-4000:]
        # the root cause, where the engine names it (vLLM's EngineCore raises a generic one at the end)
        causes = [line.strip() for line in log.splitlines() if re.match(r"\s*(\w+Error|AssertionError|"
                                                                        r"NotImplementedError)\b", line)]
        result["reason"] = (causes[-1][:500] if causes else
                            _last_error(result.get("traceback", "") + "\n" + log) if not result.get("loaded")
                            else result["error"])
    return result


def run_vllm(model_dir: Path, request: dict, python: str, work: Path, timeout: float) -> dict:
    """vLLM on ``model_dir`` in the interpreter ``python`` (engine_runners/vllm_runner.py)."""
    req, out = work / "request.json", work / "vllm.json"
    req.write_text(json.dumps(request))
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    env.pop("PYTHONPATH", None)  # the engine's environment, not ours
    done = _run([python, str(RUNNERS / "vllm_runner.py"), "--model", str(model_dir), "--request", str(req),
                 "--out", str(out)], env, timeout, work)
    return _runner_result(done, out)


def llama_cpp_paths(build_dir: str | Path) -> dict:
    """Where a llama.cpp build keeps what is needed: ``lib`` (the dir of libllama), ``source`` (the tree it was built
    from, from ``CMakeCache.txt``), ``converter`` (``convert_hf_to_gguf.py``) and ``bindings`` (the dir holding a
    ``llama_cpp`` Python package of the same release, llama-cpp-python's source tree, or None)."""
    build = Path(build_dir)
    libs = [d for d in (build / "bin", build / "src", build / "lib", build) if any(d.glob("libllama.*"))]
    if not libs:
        raise EngineSetupError(f"--llama-cpp {build}: no libllama.so under bin/, src/ or lib/ (build it with "
                               "cmake -DBUILD_SHARED_LIBS=ON; bench/serving.py does)")
    cache = build / "CMakeCache.txt"
    match = re.search(r"^CMAKE_HOME_DIRECTORY:INTERNAL=(.*)$", cache.read_text(), re.M) if cache.exists() else None
    source = Path(match.group(1)) if match else build.parent
    converter = source / "convert_hf_to_gguf.py"
    if not converter.exists():
        raise EngineSetupError(f"--llama-cpp {build}: no convert_hf_to_gguf.py in its source tree {source}")
    bindings = next((p for p in (source.parent.parent, source.parent, source) if (p / "llama_cpp" / "llama_cpp.py")
                     .exists()), None)
    return {"lib": libs[0], "source": source, "converter": converter, "bindings": bindings}


def convert_gguf(model_dir: Path, paths: dict, python: str, work: Path, timeout: float) -> tuple[Path | None, dict]:
    """llama.cpp's own converter, in f32: (the GGUF path, or None and what it said)."""
    gguf = work / "model-f32.gguf"
    env = {**os.environ}
    env.pop("NO_LOCAL_GGUF", None)  # the converter uses the gguf-py beside it
    done = _run([python, str(paths["converter"]), str(model_dir), "--outfile", str(gguf), "--outtype", "f32"],
                env, timeout, work)
    if done.returncode != 0 or not gguf.exists():
        return None, {"loaded": False, "stage": "convert_hf_to_gguf.py", "error": _last_error(done.stderr),
                      "reason": "convert_hf_to_gguf.py: " + _last_error(done.stderr),
                      "log_tail": (done.stderr or "")[-3000:]}
    return gguf, {}


def run_llamacpp(model_dir: Path, request: dict, build_dir: str, python: str, work: Path, timeout: float) -> dict:
    """llama.cpp on ``model_dir``: convert to GGUF, then decode (engine_runners/llamacpp_runner.py)."""
    paths = llama_cpp_paths(build_dir)
    gguf, failed = convert_gguf(model_dir, paths, python, work, timeout)
    if gguf is None:
        return {"engine": "llamacpp", **failed}
    req, out = work / "request.json", work / "llamacpp.json"
    req.write_text(json.dumps(request))
    cmd = [python, str(RUNNERS / "llamacpp_runner.py"), "--gguf", str(gguf), "--lib", str(paths["lib"]),
           "--request", str(req), "--out", str(out)]
    if paths["bindings"] is not None:
        cmd += ["--bindings", str(paths["bindings"])]
    result = _runner_result(_run(cmd, {**os.environ}, timeout, work), out)
    result["gguf_bytes"] = gguf.stat().st_size
    gguf.unlink()
    return result


# ---------------------------------------------------------------------------------------------------
# the comparison and the verdict
# ---------------------------------------------------------------------------------------------------
def compare(reference: dict, engine: dict, tie: float = 1e-4) -> dict:
    """Verdict of ``engine``'s decode against ``reference``'s: ``verdict``, ``reason``, ``identical`` prompts, the
    ``first_divergence``, ``near_ties`` and the largest |difference| of the reference's top-k log-probabilities that
    the engine also reports, over the steps both decoded from the same prefix.

    Greedy decoding is ill-posed at a tie: where the engine picks another token whose reference log-probability is
    within ``max(tie, 2 x the largest log-prob difference at the steps where both agree)`` of the reference's pick, the two disagree by no more
    than their measured numerical difference. Such a prompt is a near tie (not compared past it: the prefixes differ
    from there on), not a divergence; every other differing token is."""
    if not engine.get("loaded") or "tokens" not in engine:
        return {"verdict": "refuses", "reason": engine.get("reason") or engine.get("error", "did not load")}
    identical, first, worst, agreeing, ties, split = 0, None, 0.0, 0.0, [], []
    for p, (want, got) in enumerate(zip(reference["tokens"], engine["tokens"])):
        for step, (ref_step, eng_step) in enumerate(zip(reference["logprobs"][p], engine["logprobs"][p])):
            shared = ref_step.keys() & eng_step.keys()
            gaps = [abs(ref_step[t] - eng_step[t]) for t in shared]
            worst = max([worst, *gaps])
            if step >= len(got) or want[step] != got[step]:
                split.append((p, step))
                break
            agreeing = max([agreeing, *gaps])  # the numerical difference, where both still pick alike
        if want == got:
            identical += 1
    for p, step in split:
        want, got = reference["tokens"][p], engine["tokens"][p]
        theirs = got[step] if step < len(got) else None
        ref_step = reference["logprobs"][p][step]
        gap = (ref_step[str(want[step])] - ref_step[str(theirs)]) if str(theirs) in ref_step else None
        if gap is not None and gap <= max(tie, 2 * agreeing):
            ties.append({"prompt": p, "step": step, "transformers": want[step], "engine": theirs, "gap": gap})
        elif first is None:
            first = {"prompt": p, "step": step, "transformers": want[step], "engine": theirs, "gap": gap}
    result = {"identical": identical, "prompts": len(reference["tokens"]), "max_logprob_diff": worst,
              "first_divergence": first, "near_ties": ties}
    if first is None:
        return {"verdict": "serves", "reason": "", **result}
    return {"verdict": "differs", "reason": (f"prompt {first['prompt']} step {first['step']}: transformers "
                                             f"{first['transformers']}, engine {first['engine']}"), **result}


def check_served(model_dir: str | Path, engine: str, python: str | None = None, llama_cpp: str | None = None,
                 texts: tuple[str, ...] = PROMPTS, max_new_tokens: int = 16, top_k: int = 5,
                 dtype: str = "float32", work_dir: str | None = None, timeout: float = 1800) -> dict:
    """Run ``engine`` (vllm | llamacpp) on the export ``model_dir`` and compare it with transformers; the result dict
    (``verdict`` serves | differs | refuses, ``reason``, details, the engine's own report under ``engine_result``)."""
    model_dir = Path(model_dir).resolve()
    if engine not in ("vllm", "llamacpp"):
        raise EngineSetupError(f"--engine {engine!r}: check-serving runs vllm or llamacpp")
    if engine == "llamacpp" and not llama_cpp:
        raise EngineSetupError("--engine llamacpp needs --llama-cpp BUILD_DIR (a CMake build with libllama.so)")
    python = python or sys.executable
    prompts = prompt_ids(model_dir, list(texts))
    request = {"prompts": prompts, "texts": list(texts), "max_new_tokens": max_new_tokens, "top_k": top_k,
               "dtype": dtype, "max_model_len": 256}
    reference = reference_decode(model_dir, prompts, max_new_tokens, top_k)
    with tempfile.TemporaryDirectory(prefix="slimmoe-check-", dir=work_dir) as tmp:
        work = Path(tmp)
        got = (run_vllm(model_dir, request, python, work, timeout) if engine == "vllm"
               else run_llamacpp(model_dir, request, llama_cpp, python, work, timeout))
    result = {"model": str(model_dir), "engine": engine, "engine_version": got.get("version"),
              "max_new_tokens": max_new_tokens, "top_k": top_k, "dtype": dtype, **compare(reference, got)}
    if got.get("engine_tokens"):
        result["tokenizer_agrees"] = got["engine_tokens"] == prompts
    result["engine_result"] = {k: v for k, v in got.items() if k not in ("tokens", "logprobs", "engine_tokens")}
    result["tokens"] = {"transformers": reference["tokens"], "engine": got.get("tokens")}
    return result


def verdict_line(result: dict) -> str:
    name = {"vllm": "vLLM", "llamacpp": "llama.cpp"}[result["engine"]]
    where = f"{name} {result['verdict']} {result['model']}"
    if result["verdict"] == "serves":
        ties = result.get("near_ties") or []
        tie = (f"; {len(ties)} stopped at a near tie (log-prob gap {max(t['gap'] for t in ties):.1e})" if ties
               else "")
        return (f"check-serving: {where}: {result['identical']}/{result['prompts']} prompts x "
                f"{result['max_new_tokens']} tokens identical to transformers{tie} (top-{result['top_k']} log-probs "
                f"max |diff| {result['max_logprob_diff']:.2e})")
    if result["verdict"] == "differs":
        return (f"check-serving: {where}: {result['identical']}/{result['prompts']} prompts identical; "
                f"{result['reason']} (top-{result['top_k']} log-probs max |diff| {result['max_logprob_diff']:.2e})")
    return f"check-serving: {where}: {result['reason']}"


def command(args: list[str]) -> dict:
    """``slimmoe check-serving --model DIR --engine vllm|llamacpp [--python PY] [--llama-cpp BUILD]``."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(prog="slimmoe check-serving", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="an exported HF dir (stage_<k>_<name>/hf or final/)")
    parser.add_argument("--engine", required=True, choices=["vllm", "llamacpp"])
    parser.add_argument("--python", default=None, help="interpreter of the engine's environment (default: this one); "
                        "llamacpp: the one that runs convert_hf_to_gguf.py (torch, numpy, transformers that read the "
                        "export's config, and sentencepiece for Llama / Mixtral / PhiMoE vocabularies)")
    parser.add_argument("--llama-cpp", default=None, help="llama.cpp CMake build dir (libllama.so)")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--top-k", type=int, default=5, help="log-probabilities compared per step")
    parser.add_argument("--dtype", default="float32", help="vLLM's dtype (float32 | bfloat16 | float16)")
    parser.add_argument("--work-dir", default=None, help="where the GGUF and the runners' files go (temporary)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds for each engine process")
    parser.add_argument("--json-out", default=None, help="also write the result JSON here")
    opts = parser.parse_args(args)
    try:
        result = check_served(opts.model, opts.engine, opts.python, opts.llama_cpp, max_new_tokens=opts.max_new_tokens,
                              top_k=opts.top_k, dtype=opts.dtype, work_dir=opts.work_dir, timeout=opts.timeout)
    except EngineSetupError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print(verdict_line(result))
    print(json.dumps(result, indent=2))
    if opts.json_out:
        Path(opts.json_out).write_text(json.dumps(result, indent=2))
    if VERDICT_STATUS[result["verdict"]]:
        sys.exit(VERDICT_STATUS[result["verdict"]])
    return result
