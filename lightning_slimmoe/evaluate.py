"""Held-out evaluation: perplexity over non-overlapping windows, top-1 agreement with a teacher, and a
thin offline wrapper around EleutherAI lm-evaluation-harness.

Perplexity follows the pruning papers (LLM-Pruner, Wanda, SliceGPT) on WikiText-2: the whole text is
tokenized once (no special tokens), cut into ``len // seq_len`` non-overlapping windows of ``seq_len``
tokens (the tail that does not fill a window is dropped), each window is scored on its own from its
first token, and the perplexity is ``exp(total NLL / predicted tokens)`` with ``seq_len - 1``
predictions per window. Pass the file's raw text (``Path.read_text()``) to score a corpus file as is.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class PerplexityResult:
    ppl: float
    nll: float  # total negative log-likelihood (nats) over the predicted tokens
    tokens: int  # predicted tokens
    windows: int
    seq_len: int

    def to_dict(self) -> dict:
        return asdict(self)


def tokenize_windows(tokenizer, text: str, seq_len: int, max_windows: int | None = None) -> Tensor:
    """``[num_windows, seq_len]`` non-overlapping windows of the tokenized text (tail dropped)."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2 (a window predicts seq_len - 1 tokens), got {seq_len}")
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
    ids = torch.as_tensor(ids, dtype=torch.long)
    num = ids.numel() // seq_len
    if max_windows is not None:
        num = min(num, max_windows)
    if num < 1:
        raise ValueError(f"the text has {ids.numel()} tokens: fewer than one window of seq_len={seq_len}")
    return ids[: num * seq_len].view(num, seq_len)


def _model_device(model: nn.Module, device) -> torch.device:
    return torch.device(device) if device is not None else next(model.parameters()).device


@torch.no_grad()
def _score_windows(model: nn.Module, windows: Tensor, batch_size: int, device, reference_top1: Tensor | None = None):
    """(total NLL, predicted tokens, argmax [W, T-1], agreeing tokens) of ``model`` on the windows."""
    was_training = model.training
    model.eval()
    nll, tokens, agree, argmax = 0.0, 0, 0, []
    try:
        for start in range(0, windows.shape[0], batch_size):
            batch = windows[start : start + batch_size].to(device)
            logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
            targets = batch[:, 1:]
            nll += F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum").item()
            tokens += targets.numel()
            top1 = logits.argmax(-1).cpu()
            argmax.append(top1)
            if reference_top1 is not None:
                agree += (top1 == reference_top1[start : start + batch_size]).sum().item()
    finally:
        model.train(was_training)
    return nll, tokens, torch.cat(argmax), agree


def perplexity(model: nn.Module, tokenizer, text: str, seq_len: int = 512, batch_size: int = 8, device=None,
               max_windows: int | None = None) -> PerplexityResult:
    """Perplexity of ``model`` on ``text`` over non-overlapping ``seq_len`` windows (see module docstring)."""
    device = _model_device(model, device)
    windows = tokenize_windows(tokenizer, text, seq_len, max_windows)
    nll, tokens, _, _ = _score_windows(model, windows, batch_size, device)
    return PerplexityResult(ppl=math.exp(nll / tokens), nll=nll, tokens=tokens, windows=windows.shape[0],
                            seq_len=seq_len)


def teacher_agreement(student: nn.Module, teacher: nn.Module, tokenizer, text: str, seq_len: int = 512,
                      batch_size: int = 8, device=None, max_windows: int | None = None) -> float:
    """Fraction of predicted positions where the student's argmax equals the teacher's (same windows as
    :func:`perplexity`)."""
    device = _model_device(student, device)
    windows = tokenize_windows(tokenizer, text, seq_len, max_windows)
    _, _, teacher_top1, _ = _score_windows(teacher, windows, batch_size, device)
    _, tokens, _, agree = _score_windows(student, windows, batch_size, device, reference_top1=teacher_top1)
    return agree / tokens


class HeldOutEval:
    """Perplexity + teacher agreement of many students on one text, with the teacher scored once.

    Used by the benchmarks: the text is tokenized once and the teacher's top-1 predictions are cached.
    """

    def __init__(self, teacher: nn.Module, tokenizer, text: str, seq_len: int = 512, batch_size: int = 8,
                 device=None, max_windows: int | None = None):
        self.device = _model_device(teacher, device)
        self.windows = tokenize_windows(tokenizer, text, seq_len, max_windows)
        self.batch_size, self.seq_len = batch_size, seq_len
        nll, tokens, self.teacher_top1, _ = _score_windows(teacher, self.windows, batch_size, self.device)
        self.teacher = PerplexityResult(math.exp(nll / tokens), nll, tokens, self.windows.shape[0], seq_len)

    def __call__(self, student: nn.Module) -> dict:
        student = student.to(self.device)
        nll, tokens, _, agree = _score_windows(student, self.windows, self.batch_size, self.device,
                                               reference_top1=self.teacher_top1)
        return {"ppl": math.exp(nll / tokens), "nll": nll, "tokens": tokens, "teacher_agreement": agree / tokens}


# ---------------------------------------------------------------------------------------------------
# lm-evaluation-harness (optional extra)
# ---------------------------------------------------------------------------------------------------
LM_EVAL_MISSING = ("lm-evaluation-harness is not installed; it is an optional extra: "
                   "pip install -r bench/requirements.txt  (or: pip install lm-eval accelerate)")


def _require_lm_eval():
    try:
        import lm_eval  # noqa: F401
    except ImportError as err:
        raise ImportError(LM_EVAL_MISSING) from err
    return lm_eval


def write_ppl_task(text_file: str, task_dir: str, name: str = "slimmoe_ppl") -> str:
    """A wikitext-style ``loglikelihood_rolling`` task over one local text file (one document: the raw
    file text), for lm-eval's ``include_path``. Returns the task name."""
    task_dir = Path(task_dir)
    task_dir.mkdir(parents=True, exist_ok=True)
    data = task_dir / f"{name}.jsonl"
    data.write_text(json.dumps({"text": Path(text_file).read_text(encoding="utf-8")}) + "\n")
    (task_dir / f"{name}.yaml").write_text("\n".join([
        f"task: {name}",
        "dataset_path: json",
        f"dataset_kwargs: {{data_files: {{test: {json.dumps(str(data))}}}}}",
        "test_split: test",
        "output_type: loglikelihood_rolling",
        "doc_to_text: ''",
        "doc_to_target: '{{text}}'",
        "should_decontaminate: false",
        "metric_list:",
        "  - metric: word_perplexity",
        "  - metric: byte_perplexity",
        "  - metric: bits_per_byte",
        "metadata: {version: 1.0}",
        "",
    ]))
    return name


def run_lm_eval(model_dir: str, tasks: list[str] | str = (), ppl_file: str | None = None, batch_size: int = 8,
                device: str = "cpu", dtype: str = "float32", max_length: int | None = None,
                limit: int | float | None = None, num_fewshot: int | None = None,
                include_path: str | None = None) -> dict:
    """``lm_eval.simple_evaluate(model="hf", ...)`` on a local HF dir, fully offline.

    ``tasks``: lm-eval task names (their datasets must already be in the local HF cache when offline) or
    paths of task YAML files / directories. ``ppl_file``: also score this local text file as a rolling
    log-likelihood task (``slimmoe_ppl``: word/byte perplexity, bits per byte). Returns
    ``{"results": {task: {metric: value}}, "config": {...}}``.
    """
    _require_lm_eval()
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import lm_eval
    from lm_eval.tasks import TaskManager

    tasks = [tasks] if isinstance(tasks, str) else list(tasks)
    include = [include_path] if include_path else []
    names = []
    for task in tasks:
        if os.path.exists(task):  # a YAML file or a directory of task YAMLs
            include.append(str(Path(task).parent if task.endswith((".yaml", ".yml")) else task))
            if task.endswith((".yaml", ".yml")):
                import yaml
                names.append(yaml.safe_load(Path(task).read_text())["task"])
        else:
            names.append(task)
    with tempfile.TemporaryDirectory() as tmp:
        if ppl_file:
            include.append(tmp)
            names.append(write_ppl_task(ppl_file, tmp))
        if not names:
            raise ValueError("run_lm_eval: no tasks; give task names/YAML paths or ppl_file")
        manager = TaskManager(include_path=include or None)
        model_args = f"pretrained={model_dir},dtype={dtype}"
        if max_length:
            model_args += f",max_length={max_length}"
        out = lm_eval.simple_evaluate(model="hf", model_args=model_args, tasks=names, device=device,
                                      batch_size=batch_size, limit=limit, num_fewshot=num_fewshot,
                                      task_manager=manager, log_samples=False)
    results = {task: {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
               for task, metrics in out["results"].items()}
    return {"results": results, "config": {"model_dir": model_dir, "tasks": names, "batch_size": batch_size,
                                           "device": device, "dtype": dtype, "max_length": max_length}}


DEFAULT_SEQ_LEN = 512  # the window of a model whose training seq_len is not recorded (capped by its context)


def default_seq_len(model_dir: str) -> tuple[int, str]:
    """The window ``eval`` scores with when none is given, and where it comes from: the seq_len the model was trained
    at (perplexity depends on the window: a model trained at 128 and scored at 512 reads much worse), from the
    ``slimmoe.json`` every export carries, else from ``run.json`` when the dir still sits in its run (``final/``,
    ``stage_<k>_<name>/hf/`` of a run exported before that file existed); else ``min(512,
    max_position_embeddings)``."""
    from transformers import AutoConfig

    from lightning_slimmoe.export import TRAINING_FILE

    directory = Path(model_dir)
    record = directory / TRAINING_FILE
    if record.is_file():
        seq_len = json.loads(record.read_text()).get("seq_len")
        if seq_len:
            return int(seq_len), f"the seq_len it was trained at ({record})"
    run_dir = (directory.parent if directory.name == "final"
               else directory.parent.parent if directory.name == "hf" and directory.parent.name.startswith("stage_")
               else None)
    if run_dir is not None and (run_dir / "run.json").is_file():
        seq_len = json.loads((run_dir / "run.json").read_text()).get("batch", {}).get("seq_len")
        if seq_len:
            return int(seq_len), f"the seq_len its run trained at ({run_dir / 'run.json'})"
    context = getattr(AutoConfig.from_pretrained(model_dir).get_text_config(), "max_position_embeddings", None)
    seq_len = min(DEFAULT_SEQ_LEN, context) if context else DEFAULT_SEQ_LEN
    return seq_len, (f"min({DEFAULT_SEQ_LEN}, max_position_embeddings={context}): the training seq_len is not "
                     f"recorded (no {TRAINING_FILE} in {model_dir}); give --seq-len to choose")


def evaluate_dir(model_dir: str, ppl_file: str, seq_len: int = 512, batch_size: int = 8, device: str = "cpu",
                 max_windows: int | None = None, teacher_dir: str | None = None) -> dict:
    """Our perplexity (and optional teacher agreement) of a local HF dir on a text file."""
    from transformers import AutoTokenizer

    from lightning_slimmoe.sources import load_model  # from_pretrained, or a block-FP8 teacher dequantized

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = load_model(model_dir, torch.float32).to(device)
    text = Path(ppl_file).read_text(encoding="utf-8")
    result = perplexity(model, tokenizer, text, seq_len, batch_size, device, max_windows).to_dict()
    if teacher_dir:
        teacher = load_model(teacher_dir, torch.float32).to(device)
        result["teacher_agreement"] = teacher_agreement(model, teacher, tokenizer, text, seq_len, batch_size, device,
                                                        max_windows)
    return result
