"""Greedy decoding of token-id prompts in vLLM, for ``slimmoe check-serving --engine vllm`` (engine_check.py).

Run by the vLLM environment's interpreter: ``python vllm_runner.py --model DIR --request REQ.json --out OUT.json``.
``REQ.json``: ``{"prompts": [[ids...], ...], "max_new_tokens": 16, "top_k": 5, "dtype": "float32",
"max_model_len": 256}``. ``OUT.json``: ``{"loaded": true, "tokens": [[ids...]], "logprobs": [[{id: logprob}]],
"version": "0.32.0"}``, or ``{"loaded": false, "error": "..."}`` when vLLM refuses the model. One process per model,
and it ends normally (``os._exit`` would orphan vLLM's engine processes).
"""

import argparse
import json
import traceback


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--request", required=True)
    parser.add_argument("--out", required=True)
    opts = parser.parse_args()
    with open(opts.request) as f:
        request = json.load(f)
    result = {"engine": "vllm", "loaded": False}
    try:
        import vllm
        from vllm import LLM, SamplingParams

        result["version"] = vllm.__version__
        llm = LLM(model=opts.model, dtype=request.get("dtype", "float32"),
                  max_model_len=int(request.get("max_model_len", 256)), enforce_eager=True, seed=0)
    except BaseException as err:  # noqa: BLE001 - what the engine said is the result
        result["error"] = f"{type(err).__name__}: {err}"
        result["traceback"] = traceback.format_exc()[-4000:]
        with open(opts.out, "w") as f:
            json.dump(result, f)
        return 1
    result["loaded"] = True
    try:
        params = SamplingParams(temperature=0.0, max_tokens=int(request["max_new_tokens"]), ignore_eos=True,
                                logprobs=int(request.get("top_k", 5)))
        outputs = llm.generate([{"prompt_token_ids": ids} for ids in request["prompts"]], params, use_tqdm=False)
        result["tokens"] = [list(o.outputs[0].token_ids) for o in outputs]
        result["logprobs"] = [[{str(t): float(lp.logprob) for t, lp in step.items()} for step in o.outputs[0].logprobs]
                              for o in outputs]
    except BaseException as err:  # noqa: BLE001
        result["error"] = f"{type(err).__name__}: {err}"
        result["traceback"] = traceback.format_exc()[-4000:]
    with open(opts.out, "w") as f:
        json.dump(result, f)
    return 0 if "error" not in result else 1


if __name__ == "__main__":
    raise SystemExit(main())
