"""On a CUDA device: slicing, the KD loss and the expert kernels give what they give on the CPU.

Every test here is marked ``gpu``: a CUDA machine runs them with ``python -m pytest -q -m gpu``; elsewhere
conftest.py skips them ("needs a CUDA device"). They are small (tiny models, a few milliseconds of GPU work).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from helpers import random_batch, random_keep, tiny_model

pytestmark = pytest.mark.gpu

CUDA = "cuda"


def logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids=input_ids).logits.float()


def test_slimmed_model_on_cuda_matches_cpu():
    """``slim_model_`` on a model that lives on the GPU (keep indices on the CPU, as ``keep.pt`` is loaded) gives
    the same logits in fp32 as slicing and running on the CPU, within 1e-4."""
    from lightning_slimmoe.slimming import slim_model_

    cpu_model = tiny_model("qwen3_moe")
    keep = random_keep(cpu_model, width=8, groups=1, seed=3)
    gpu_model = copy.deepcopy(cpu_model).to(CUDA)
    slim_model_(cpu_model, keep)
    slim_model_(gpu_model, keep)
    assert gpu_model.config.moe_intermediate_size == cpu_model.config.moe_intermediate_size == 8
    assert all(p.device.type == "cuda" for p in gpu_model.parameters())
    input_ids = random_batch(batch_size=2, seq_len=16, seed=1)["input_ids"]
    expected = logits(cpu_model, input_ids)
    torch.testing.assert_close(logits(gpu_model, input_ids.to(CUDA)).cpu(), expected, rtol=0, atol=1e-4)


def kd_inputs(seed: int = 0, tokens: int = 96, hidden: int = 32, vocab: int = 96, top_k: int = 8):
    """Student hidden states, an lm_head with bias, labels with ignored tokens, a teacher's top-k (CPU, fp32)."""
    gen = torch.Generator().manual_seed(seed)
    student_hidden = torch.randn(tokens, hidden, generator=gen)
    head = nn.Linear(hidden, vocab, bias=True)
    with torch.no_grad():
        head.weight.copy_(0.3 * torch.randn(vocab, hidden, generator=gen))
        head.bias.copy_(0.1 * torch.randn(vocab, generator=gen))
    labels = torch.randint(0, vocab, (tokens,), generator=gen)
    labels[::7] = -100
    teacher_values, teacher_ids = (3.0 * torch.randn(tokens, vocab, generator=gen)).topk(top_k, dim=-1)
    return student_hidden, head, labels, teacher_values, teacher_ids


def run_kd(student_hidden, head, labels, teacher_values, teacher_ids, device, autocast_dtype=None):
    """distill_loss on ``device`` (optionally under autocast) and backward: outputs and gradients, on the CPU."""
    from lightning_slimmoe.distill import KDConfig, distill_loss

    cfg = KDConfig(top_k=teacher_values.shape[-1], temperature=2.0, lm_weight=0.3, chunk_tokens=40)
    head = copy.deepcopy(head).to(device)
    hidden = student_hidden.to(device).requires_grad_(True)
    with torch.autocast(device_type=torch.device(device).type, dtype=autocast_dtype or torch.bfloat16,
                        enabled=autocast_dtype is not None):
        out = distill_loss(hidden, head, labels.to(device), teacher_values.to(device), teacher_ids.to(device), cfg)
    out.loss.backward()
    values = {name: getattr(out, name).detach().float().cpu() for name in ("loss", "kd_loss", "lm_loss")}
    grads = {"hidden": hidden.grad, "weight": head.weight.grad, "bias": head.bias.grad}
    return values, {name: g.float().cpu() for name, g in grads.items()}


def test_distill_loss_on_cuda_matches_cpu_in_fp32():
    """Value (loss, KD and LM terms) and gradients (hidden states, lm_head weight and bias) within 1e-5."""
    inputs = kd_inputs()
    cpu_values, cpu_grads = run_kd(*inputs, device="cpu")
    gpu_values, gpu_grads = run_kd(*inputs, device=CUDA)
    assert cpu_values["kd_loss"] > 0 and cpu_values["lm_loss"] > 0
    for name, value in cpu_values.items():
        torch.testing.assert_close(gpu_values[name], value, rtol=0, atol=1e-5, msg=name)
    for name, grad in cpu_grads.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(gpu_grads[name], grad, rtol=0, atol=1e-5, msg=name)


def test_distill_loss_runs_under_bf16_autocast():
    """Under bf16 autocast on CUDA the loss and every gradient are finite and close to the fp32 ones."""
    inputs = kd_inputs(seed=1)
    ref_values, ref_grads = run_kd(*inputs, device=CUDA)
    values, grads = run_kd(*inputs, device=CUDA, autocast_dtype=torch.bfloat16)
    for name, value in ref_values.items():
        assert torch.isfinite(values[name]), name
        torch.testing.assert_close(values[name], value, rtol=5e-2, atol=5e-2, msg=name)
    for name, grad in ref_grads.items():
        assert torch.isfinite(grads[name]).all(), name
        torch.testing.assert_close(grads[name], grad, rtol=5e-2, atol=5e-2 * float(grad.abs().max()), msg=name)


@pytest.mark.parametrize("width", [None, 16], ids=["unsliced", "sliced"])
def test_grouped_mm_experts_equal_eager_on_cuda(width):
    """transformers' ``grouped_mm`` expert kernel (the default) and the ``eager`` per-expert loop agree on CUDA
    in bf16 (within bf16 tolerance, and both near the fp32 eager reference), sliced or not."""
    from lightning_slimmoe.slimming import slim_model_

    model = tiny_model("qwen3_moe")
    if width is not None:
        slim_model_(model, random_keep(model, width=width, groups=2, seed=5))
    input_ids = random_batch(batch_size=2, seq_len=16, seed=2)["input_ids"].to(CUDA)
    reference = copy.deepcopy(model).to(CUDA)
    reference.set_experts_implementation("eager")
    expected = logits(reference, input_ids)
    assert expected.abs().max() > 0.1  # a meaningful comparison, not of near-zero logits
    out = {}
    for impl in ("grouped_mm", "eager"):
        candidate = copy.deepcopy(model).to(CUDA, torch.bfloat16)
        candidate.set_experts_implementation(impl)
        assert candidate.config._experts_implementation == impl
        out[impl] = logits(candidate, input_ids)
        torch.testing.assert_close(out[impl], expected, rtol=0, atol=3e-2, msg=impl)
    torch.testing.assert_close(out["grouped_mm"], out["eager"], rtol=1.6e-2, atol=1e-2)
