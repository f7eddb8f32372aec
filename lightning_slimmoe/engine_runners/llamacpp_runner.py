"""Greedy decoding of token-id prompts in llama.cpp (its C API through llama-cpp-python's ctypes bindings), for
``slimmoe check-serving --engine llamacpp`` (engine_check.py).

``python llamacpp_runner.py --gguf MODEL.gguf --lib BUILD/bin --bindings DIR --request REQ.json --out OUT.json``:
``--lib`` holds ``libllama.so``; ``--bindings`` is a directory holding the ``llama_cpp`` package of the same release
(the llama-cpp-python source tree that vendors the build's llama.cpp), else an installed ``llama_cpp`` is used. Only
the low-level module ``llama_cpp.llama_cpp`` is imported (it needs nothing but ctypes). The KV cache is kept in f32,
so that logits compare with transformers' fp32 ones. Writes ``{"loaded": true, "tokens": [[ids]], "logprobs":
[[{id: logprob}]], "engine_tokens": [[ids]] (llama.cpp's own tokenization of the prompts' text, when given)}``.
"""

import argparse
import ctypes
import json
import math
import os
import sys
import traceback
import types


def bindings(lib_dir: str, package_parent: str | None):
    os.environ["LLAMA_CPP_LIB_PATH"] = lib_dir
    if package_parent and os.path.isdir(os.path.join(package_parent, "llama_cpp")):
        package = types.ModuleType("llama_cpp")  # skip the package's __init__ (its high-level API needs more)
        package.__path__ = [os.path.join(package_parent, "llama_cpp")]
        sys.modules["llama_cpp"] = package
    from llama_cpp import llama_cpp as ll

    return ll


def top_logprobs(logits, n_vocab: int, k: int) -> dict:
    """The ``k`` largest log-probabilities of one row of logits, by token id (numpy where there is one)."""
    try:
        import numpy as np
    except ImportError:
        np = None
    if np is not None:
        row = np.ctypeslib.as_array(logits, shape=(n_vocab,)).astype(np.float64)
        norm = row.max() + np.log(np.exp(row - row.max()).sum())
        best = np.argsort(-row, kind="stable")[:k]
        return {str(int(i)): float(row[i] - norm) for i in best}
    values = [logits[i] for i in range(n_vocab)]
    peak = max(values)
    norm = peak + math.log(sum(math.exp(v - peak) for v in values))
    best = sorted(range(n_vocab), key=lambda i: -values[i])[:k]
    return {str(i): values[i] - norm for i in best}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gguf", required=True)
    parser.add_argument("--lib", required=True)
    parser.add_argument("--bindings", default=None)
    parser.add_argument("--request", required=True)
    parser.add_argument("--out", required=True)
    opts = parser.parse_args()
    with open(opts.request) as f:
        request = json.load(f)
    result = {"engine": "llamacpp", "loaded": False}

    def finish(code: int) -> int:
        with open(opts.out, "w") as f:
            json.dump(result, f)
        return code

    try:
        ll = bindings(opts.lib, opts.bindings)
        ll.llama_backend_init()
        model = ll.llama_model_load_from_file(opts.gguf.encode(), ll.llama_model_default_params())
        if not model:
            raise RuntimeError("llama_model_load_from_file returned NULL (see the engine's log above)")
        cparams = ll.llama_context_default_params()
        cparams.n_ctx = int(request.get("max_model_len", 256))
        cparams.n_batch = cparams.n_ctx
        cparams.type_k = 0  # GGML_TYPE_F32
        cparams.type_v = 0
        cparams.n_threads = cparams.n_threads_batch = int(request.get("threads", 2))
        ctx = ll.llama_init_from_model(model, cparams)
        if not ctx:
            raise RuntimeError("llama_init_from_model returned NULL")
        vocab = ll.llama_model_get_vocab(model)
        n_vocab = ll.llama_vocab_n_tokens(vocab)
    except BaseException as err:  # noqa: BLE001 - what the engine said is the result
        result["error"] = f"{type(err).__name__}: {err}"
        result["traceback"] = traceback.format_exc()[-4000:]
        return finish(1)
    result["loaded"] = True
    result["tokens"], result["logprobs"], result["engine_tokens"] = [], [], []
    k = int(request.get("top_k", 5))
    try:
        for n, ids in enumerate(request["prompts"]):
            mem = ll.llama_get_memory(ctx)
            ll.llama_memory_clear(mem, True)
            out, steps = [], []
            batch_ids = list(ids)
            for _ in range(int(request["max_new_tokens"])):
                array = (ll.llama_token * len(batch_ids))(*batch_ids)
                if ll.llama_decode(ctx, ll.llama_batch_get_one(array, len(batch_ids))) != 0:
                    raise RuntimeError("llama_decode failed")
                logits = ll.llama_get_logits_ith(ctx, -1)
                step = top_logprobs(logits, n_vocab, k)
                token = int(max(step, key=step.get))
                out.append(token)
                steps.append(step)
                batch_ids = [token]
            result["tokens"].append(out)
            result["logprobs"].append(steps)
            texts = request.get("texts") or []
            if n < len(texts):
                text = texts[n].encode()
                buf = (ll.llama_token * (len(text) + 8))()
                got = ll.llama_tokenize(vocab, text, len(text), buf, len(buf), False, False)
                result["engine_tokens"].append([buf[i] for i in range(max(got, 0))])
        ll.llama_free(ctx)
        ll.llama_model_free(model)
    except BaseException as err:  # noqa: BLE001
        result["error"] = f"{type(err).__name__}: {err}"
        result["traceback"] = traceback.format_exc()[-4000:]
        return finish(1)
    return finish(0)


if __name__ == "__main__":
    raise SystemExit(main())
