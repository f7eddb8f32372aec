"""KD-loss drift of an 8-bit (bitsandbytes LLM.int8) teacher vs the fp32 teacher, on the same batches.

    python -m bench.teacher_8bit [--teacher DIR] [--student DIR] [--text FILE] [--out bench/out/teacher-8bit.json]

Defaults: the quality benchmark's trained teacher and its SlimMoE student (bench/out/quality-wikitext), on
windows of the WikiText-2 validation text. For each batch it computes the student's KD loss (the run's own
``teacher_targets`` + ``distill_loss``, top-k 8) against either teacher, and the top-1 agreement of the 8-bit
teacher's logits with the fp32 teacher's; and the teacher's bytes both ways (lightning_slimmoe.quantize).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

Q = Path("bench/out/quality-wikitext")


def main() -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lightning_slimmoe.distill import KDConfig, distill_loss
    from lightning_slimmoe.module import StageModule
    from lightning_slimmoe.quantize import load_teacher_8bit, quantized_bytes

    parser = argparse.ArgumentParser()
    parser.add_argument("--teacher", default=str(Q / "runs/teacher/final"))
    parser.add_argument("--student", default=str(Q / "runs/slimmoe/final"))
    parser.add_argument("--text", default=str(Q / "data/wiki.valid.raw.txt"))
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--out", default="bench/out/teacher-8bit.json")
    opts = parser.parse_args()
    torch.manual_seed(0)
    kd = KDConfig(top_k=8)
    tok = AutoTokenizer.from_pretrained(opts.teacher)
    ids = tok(Path(opts.text).read_text()[:2_000_000], return_tensors="pt")["input_ids"][0]
    n = opts.batches * opts.batch_size
    windows = ids[: n * opts.seq_len].view(n, opts.seq_len)
    fp32 = AutoModelForCausalLM.from_pretrained(opts.teacher, dtype=torch.float32).eval()
    teachers = {"fp32": fp32, "int8_linear_only": load_teacher_8bit(opts.teacher, torch.float32, experts=False).eval(),
                "int8": load_teacher_8bit(opts.teacher, torch.float32).eval()}  # int8 = what teacher_8bit loads
    student = AutoModelForCausalLM.from_pretrained(opts.student, dtype=torch.float32).eval()
    modules = {name: StageModule(student, t, kd=kd) for name, t in teachers.items()}
    kd_sum = {name: 0.0 for name in teachers}
    worst = {name: 0.0 for name in teachers}
    agree = {name: 0 for name in teachers}
    count, secs = 0, {name: 0.0 for name in teachers}
    with torch.no_grad():
        s_hidden = [student.model(input_ids=b, use_cache=False).last_hidden_state.flatten(0, 1)
                    for b in windows.split(opts.batch_size)]
        for i, batch in enumerate(windows.split(opts.batch_size)):
            labels = torch.cat([batch[:, 1:], torch.full_like(batch[:, :1], -100)], 1).flatten()
            row = {}
            for name, module in modules.items():
                started = time.time()
                t_vals, t_ids = module.teacher_targets(batch)
                secs[name] += time.time() - started
                row[name] = float(distill_loss(s_hidden[i], student.get_output_embeddings(), labels, t_vals, t_ids,
                                               kd).kd_loss)
                row[name + "_top1"] = t_ids[:, 0]
            count += row["fp32_top1"].numel()
            for name in teachers:
                kd_sum[name] += row[name]
                worst[name] = max(worst[name], abs(row[name] - row["fp32"]) / row["fp32"])
                agree[name] += int((row["fp32_top1"] == row[name + "_top1"]).sum())
    n_batches = len(s_hidden)
    kd_mean = {name: kd_sum[name] / n_batches for name in teachers}
    variants = {}
    for name in teachers:
        b = quantized_bytes(teachers[name])
        variants[name] = {
            "kd_loss": round(kd_mean[name], 6),
            "kd_loss_relative_drift": round((kd_mean[name] - kd_mean["fp32"]) / kd_mean["fp32"], 6),
            "max_batch_relative_drift": round(worst[name], 6),
            "teacher_top1_agreement_vs_fp32": round(agree[name] / count, 6),
            "teacher_bytes": b["total_bytes"], "int8_bytes": b["int8_bytes"], "int8_fraction": b["int8_fraction"],
            "full_precision_expert_bytes": b["fused_expert_bytes"], "teacher_forward_s": round(secs[name], 3)}
    result = {
        "teacher": opts.teacher, "student": opts.student, "tokens": count, "seq_len": opts.seq_len, "kd_top_k": kd.top_k,
        "variants": variants,
        "note": "int8 = teacher_8bit: true (Linear8bitLt attention + int8 fused experts); int8_linear_only = "
                "transformers BitsAndBytesConfig(load_in_8bit=True) alone, which leaves the fused experts fp32",
        "stack": {"torch": torch.__version__, "transformers": __import__("transformers").__version__,
                  "bitsandbytes": __import__("bitsandbytes").__version__, "device": "cpu"},
    }
    Path(opts.out).parent.mkdir(parents=True, exist_ok=True)
    Path(opts.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
