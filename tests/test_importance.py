"""Importance criteria against brute-force references; score files round-trip and refuse foreign models."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from helpers import VOCAB, random_batch, tiny_model
from lightning_slimmoe.distill import KDConfig
from lightning_slimmoe.families import get_family
from lightning_slimmoe.importance import ImportanceScores, compute_scores, expert_saliency
from lightning_slimmoe.slimming import expert_weights


def naive_kd_loss(student, teacher, batch, top_k, temperature):
    """Full-logits top-k KD written out plainly (no chunks, no shared helpers)."""
    s = student(input_ids=batch["input_ids"]).logits.flatten(0, 1).double()
    with torch.no_grad():
        t = teacher(input_ids=batch["input_ids"]).logits.flatten(0, 1).double()
    t_vals, t_ids = t.topk(top_k, dim=-1)
    p = torch.softmax(t_vals / temperature, dim=-1)
    log_q = torch.log_softmax(s / temperature, dim=-1).gather(-1, t_ids)
    return temperature**2 * (p * (p.log() - log_q)).sum(-1).mean()


def brute_force_kd_taylor(student, teacher, batches, top_k, temperature):
    family = get_family(student)
    config = student.config
    groups = config.num_key_value_heads
    per_group = config.num_attention_heads // groups
    dim = config.head_dim
    experts_ref, groups_ref, shared_ref = {}, {}, {}
    for batch in batches:
        loss = naive_kd_loss(student, teacher, batch, top_k, temperature)
        params = list(student.parameters())
        grads = dict(zip(params, torch.autograd.grad(loss, params, allow_unused=True)))

        def c(p):  # per-parameter |θ ⊙ g|
            return (p.detach().double() * grads[p].double()).abs()

        for layer, block in family.moe_blocks(student):
            gu, dn = c(block.experts.gate_up_proj), c(block.experts.down_proj)
            num_experts, two_width, _ = gu.shape
            width = two_width // 2
            table = torch.zeros(num_experts, width, dtype=torch.float64)
            for e in range(num_experts):
                for j in range(width):
                    table[e, j] = gu[e, j, :].sum() + gu[e, width + j, :].sum() + dn[e, :, j].sum()
            experts_ref[layer] = experts_ref.get(layer, 0) + table
        for layer, mlp in family.shared_experts(student):
            if hasattr(mlp, "input_linear"):  # Granite: gate rows then up rows of one fused weight
                gu, d = c(mlp.input_linear.weight), c(mlp.output_linear.weight)
                g, u = gu[:gu.shape[0] // 2], gu[gu.shape[0] // 2:]
            else:
                g, u, d = c(mlp.gate_proj.weight), c(mlp.up_proj.weight), c(mlp.down_proj.weight)
            shared_ref[layer] = shared_ref.get(layer, 0) + torch.stack(
                [g[j].sum() + u[j].sum() + d[:, j].sum() for j in range(g.shape[0])])
        for layer, attn in family.attention_modules(student):
            table = torch.zeros(groups, dtype=torch.float64)
            for grp in range(groups):
                for head in range(grp * per_group, (grp + 1) * per_group):
                    rows = slice(head * dim, (head + 1) * dim)
                    table[grp] += c(attn.q_proj.weight)[rows].sum() + c(attn.o_proj.weight)[:, rows].sum()
                    if attn.q_proj.bias is not None:
                        table[grp] += c(attn.q_proj.bias)[rows].sum()
                kv = slice(grp * dim, (grp + 1) * dim)
                for lin in (attn.k_proj, attn.v_proj):
                    table[grp] += c(lin.weight)[kv].sum()
                    if lin.bias is not None:
                        table[grp] += c(lin.bias)[kv].sum()
            groups_ref[layer] = groups_ref.get(layer, 0) + table
    return experts_ref, shared_ref, groups_ref


@pytest.mark.parametrize("family_name", ["phimoe", "qwen2_moe", "qwen3_moe"])
def test_kd_taylor_equals_brute_force(family_name):
    student = tiny_model(family_name, seed=1)
    teacher = tiny_model(family_name, seed=2)
    batches = [random_batch(seed=s) for s in range(2)]
    kd = KDConfig(top_k=5, temperature=2.0, chunk_tokens=5)
    scores = compute_scores(student, batches, "kd_taylor", teacher=teacher, kd=kd)
    experts_ref, shared_ref, groups_ref = brute_force_kd_taylor(student, teacher, batches, top_k=5, temperature=2.0)
    for layer in experts_ref:
        torch.testing.assert_close(scores.experts[layer].double(), experts_ref[layer], rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(scores.groups[layer].double(), groups_ref[layer], rtol=1e-4, atol=1e-7)
        if shared_ref:
            torch.testing.assert_close(scores.shared[layer].double(), shared_ref[layer], rtol=1e-4, atol=1e-7)
    assert scores.num_tokens == 2 * 2 * 8
    # Scoring leaves the student as it was: trainable, no stale grads.
    assert all(p.requires_grad and p.grad is None for p in student.parameters())


@pytest.mark.parametrize("criterion", ["kd_taylor", "kd_fisher"])
@pytest.mark.parametrize("family_name", ["phimoe", "qwen3_next"])
def test_checkpointed_scoring_holds_less_for_backward_and_scores_the_same(criterion, family_name):
    """``checkpoint_layers`` (``parallel.activation_checkpointing``, what memory.py plans for the score phase): the
    scoring backward keeps only each layer's input and recomputes the layer (its MLP starts twice), so the tensors
    held for backward outside the recompute shrink to a fraction; the scores are bit for bit the same."""
    student, teacher = tiny_model(family_name, seed=1), tiny_model(family_name, seed=2)
    batches = [random_batch(seed=s) for s in range(2)]
    kd = KDConfig(top_k=5, temperature=2.0, chunk_tokens=5)
    results = {}
    for checkpointed in (False, True):
        held, mlp_calls = [0], [0]

        def pack(t):
            held[0] += t.numel() * t.element_size()
            return t

        hooks = [layer.mlp.register_forward_pre_hook(lambda *_: mlp_calls.__setitem__(0, mlp_calls[0] + 1))
                 for layer in get_family(student).decoder_layers(student)]
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            results[checkpointed] = compute_scores(student, batches, criterion, teacher=teacher, kd=kd,
                                                   checkpoint_layers=checkpointed)
        for hook in hooks:
            hook.remove()
        results[checkpointed] = (results[checkpointed], held[0], mlp_calls[0])
    (plain, plain_held, plain_calls), (ckpt, ckpt_held, ckpt_calls) = results[False], results[True]
    for kind in ("experts", "shared", "groups"):
        ours, reference = getattr(ckpt, kind), getattr(plain, kind)
        assert ours.keys() == reference.keys()
        assert all(torch.equal(ours[k], reference[k]) for k in ours), kind
    assert ckpt_held < plain_held / 2, (ckpt_held, plain_held)
    assert ckpt_calls == 2 * plain_calls  # each layer's MLP starts again in backward
    assert "forward" not in vars(get_family(student).decoder_layers(student)[0])  # the class's forward again


def test_activation_scores_match_manual_mean():
    model = tiny_model("mixtral")
    batch = random_batch()
    scores = compute_scores(model, [batch], "activation")
    block = model.model.layers[0].mlp
    captured = {}
    block.experts.register_forward_hook(lambda m, a, o: captured.update(x=a[0], idx=a[1]))
    with torch.no_grad():
        model(input_ids=batch["input_ids"])
        gate, up, _ = expert_weights(block.experts)
        for e in range(4):
            routed = (captured["idx"] == e).any(-1)
            x = captured["x"][routed]
            expected = (block.experts.act_fn(x @ gate[e].T) * (x @ up[e].T)).abs().mean(0)
            torch.testing.assert_close(scores.experts[0][e], expected)


def test_magnitude_and_random():
    model = tiny_model("qwen2_moe")
    mag = compute_scores(model, [], "magnitude")
    gate, up, down = expert_weights(model.model.layers[1].mlp.experts)
    expected = (gate[2, 5].pow(2).sum() + up[2, 5].pow(2).sum() + down[2, :, 5].pow(2).sum()).sqrt()
    torch.testing.assert_close(mag.experts[1][2, 5], expected)
    assert set(mag.shared) == {0, 1}
    r1, r2 = compute_scores(model, [], "random", seed=3), compute_scores(model, [], "random", seed=3)
    assert torch.equal(r1.experts[0], r2.experts[0])
    assert not torch.equal(r1.experts[0], compute_scores(model, [], "random", seed=4).experts[0])


def test_expert_saliency_shape_and_positive():
    model = tiny_model("olmoe")
    sal = expert_saliency(model, [random_batch()])
    assert set(sal) == {0, 1} and sal[0].shape == (4,) and (sal[0] >= 0).all()


@pytest.mark.parametrize("family, renormalise", [("mixtral", True), ("qwen3_moe", False), ("qwen3_moe", True)])
def test_expert_saliency_equals_a_brute_force_reference(family, renormalise):
    """REAP's saliency written out token by token from the weights alone: each layer's router softmax, its top-k
    (renormalised as the family does), every routed token's expert output down(silu(gate x) * (up x)), and per expert
    the mean over the tokens routed to it of routing weight x ||output||."""
    model = tiny_model(family, **({} if family == "mixtral" else {"norm_topk_prob": renormalise}))
    batches = [random_batch(seed=0), random_batch(seed=1)]
    inputs = {}  # layer -> the MoE block's input of every batch, (N, H)
    hooks = [layer.mlp.register_forward_pre_hook(
        lambda module, args, i=i: inputs.setdefault(i, []).append(args[0].detach().flatten(0, 1)))
        for i, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        for batch in batches:
            model.model(input_ids=batch["input_ids"])
    for hook in hooks:
        hook.remove()
    got = expert_saliency(model, batches)
    top_k = model.config.num_experts_per_tok
    for i, layer in enumerate(model.model.layers):
        mlp, x_NH = layer.mlp, torch.cat(inputs[i]).double()
        gate_up_EJH, down_EHI = mlp.experts.gate_up_proj.double(), mlp.experts.down_proj.double()
        width = down_EHI.shape[-1]
        probs_NE = torch.softmax(x_NH @ mlp.gate.weight.double().T, dim=-1)
        sums, counts = torch.zeros(probs_NE.shape[1], dtype=torch.float64), torch.zeros(probs_NE.shape[1])
        for n in range(x_NH.shape[0]):
            weights, experts = probs_NE[n].topk(top_k)
            if renormalise:
                weights = weights / weights.sum()
            for w, e in zip(weights, experts):
                gate_IH, up_IH = gate_up_EJH[e, :width], gate_up_EJH[e, width:]
                y_H = down_EHI[e] @ (torch.nn.functional.silu(gate_IH @ x_NH[n]) * (up_IH @ x_NH[n]))
                sums[e] += w * y_H.norm()
                counts[e] += 1
        assert counts.sum() == x_NH.shape[0] * top_k and (counts > 0).all()
        torch.testing.assert_close(got[i].double(), sums / counts, rtol=1e-4, atol=1e-6)


def test_scores_roundtrip_and_foreign_model(tmp_path):
    model = tiny_model("phimoe")
    scores = compute_scores(model, [random_batch()], "activation")
    path = str(tmp_path / "scores.pt")
    scores.save(path)
    loaded = ImportanceScores.load(path, model)
    assert torch.equal(loaded.experts[1], scores.experts[1]) and loaded.criterion == "activation"
    other = tiny_model("phimoe", intermediate_size=32)
    with pytest.raises(ValueError, match="computed for another model.*expert_width"):
        ImportanceScores.load(path, other)
    with pytest.raises(ValueError, match="model_type 'phimoe' vs 'mixtral'"):
        ImportanceScores.load(path, tiny_model("mixtral"))
    with pytest.raises(FileNotFoundError, match="scores file not found"):
        ImportanceScores.load(str(tmp_path / "missing.pt"))


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_malicious_pickle_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"format": "lightning_slimmoe.scores/1", "x": _Exploit()}, f)
    with pytest.raises(pickle.UnpicklingError):
        ImportanceScores.load(str(path))


def test_unknown_criterion_and_missing_teacher():
    model = tiny_model("mixtral")
    with pytest.raises(ValueError, match="criterion='taylor'"):
        compute_scores(model, [], "taylor")
    with pytest.raises(ValueError, match="needs a teacher"):
        compute_scores(model, [random_batch()], "kd_taylor")


def test_kd_taylor_scores_the_papers_loss_even_with_tail_bucket():
    """At a stage that starts from the teacher (student == teacher) the tail-bucket KL has zero gradient, so
    scoring with it would make every score 0 and prune a fixed block of indices (found by bench/quality.py).
    kd_taylor always scores the renormalised top-k loss: the same scores with or without tail_bucket, non-zero."""
    teacher = tiny_model("qwen3_moe", seed=2)
    student = tiny_model("qwen3_moe", seed=2)  # the first prune: the student is the teacher
    batches = [random_batch(seed=s) for s in range(2)]
    plain = compute_scores(student, batches, "kd_taylor", teacher=teacher, kd=KDConfig(top_k=5))
    tail = compute_scores(student, batches, "kd_taylor", teacher=teacher, kd=KDConfig(top_k=5, tail_bucket=True))
    for layer, values in plain.experts.items():
        assert torch.equal(values, tail.experts[layer]) and torch.equal(plain.groups[layer], tail.groups[layer])
        assert values.abs().max() > 0 and plain.groups[layer].abs().max() > 0


def _spearman(a, b) -> float:
    rank_a, rank_b = (x.flatten().argsort().argsort().double() for x in (a, b))
    return torch.corrcoef(torch.stack([rank_a, rank_b]))[0, 1].item()


def _naive_kd(s_logits, t_logits, top_k, tail_bucket):
    """Mean KD loss (T = 1) written out plainly: full KL when top_k = V, else the tail-bucket KL over the teacher's
    top-k ids plus one rest bucket."""
    log_p, log_q = t_logits.log_softmax(-1), s_logits.log_softmax(-1)
    if not tail_bucket:
        return (log_p.exp() * (log_p - log_q)).sum(-1).mean()
    ids = t_logits.topk(top_k, dim=-1).indices
    p, q = log_p.exp().gather(-1, ids), log_q.exp().gather(-1, ids)
    p = torch.cat([p, 1 - p.sum(-1, keepdim=True)], -1)
    q = torch.cat([q, 1 - q.sum(-1, keepdim=True)], -1)
    return (p * (p.log() - q.log())).sum(-1).mean()


@pytest.mark.parametrize("top_k,tail_bucket", [(VOCAB, False), (5, True)])
def test_kd_fisher_ranks_by_the_measured_kd_rise_at_student_equal_teacher(top_k, tail_bucket):
    """At a stage's first prune (student = teacher) an exact divergence has zero gradient, so what removing a
    structure costs is second order. Brute force: zero each expert neuron (its down column: the same function as
    removing its gate/up rows too), shared-expert neuron and GQA group (its o_proj columns) in turn and measure the
    KD loss rise on the calibration batches (fp64). kd_fisher's ranking must follow it closely — within each expert
    and each layer, the rankings select_keep uses — and clearly better than kd_taylor's first-order |θ·g|."""
    teacher, student = (tiny_model("qwen2_moe", seed=2, num_attention_heads=16, num_key_value_heads=8).double()
                        for _ in range(2))
    for model in (teacher, student):
        model.set_experts_implementation("eager")  # fp64: grouped_mm takes fp32/bf16 only
    batches = [random_batch(batch_size=4, seq_len=16, seed=s) for s in range(4)]
    kd = KDConfig(top_k=top_k, tail_bucket=tail_bucket)
    ids = torch.cat([b["input_ids"] for b in batches])
    family = get_family(student)
    measured = {"experts": {}, "shared": {}, "groups": {}}  # kind -> layer -> rise per structure
    with torch.no_grad():
        t_logits = teacher(input_ids=ids).logits.flatten(0, 1)

        def rise_without(weight, index):
            saved = weight[index].clone()
            weight[index] = 0
            value = _naive_kd(student(input_ids=ids).logits.flatten(0, 1), t_logits, top_k, tail_bucket).item()
            weight[index] = saved
            return value

        for layer, block in family.moe_blocks(student):
            down = block.experts.down_proj  # (E, H, I)
            measured["experts"][layer] = torch.tensor([[rise_without(down, (e, slice(None), j))
                                                        for j in range(down.shape[2])] for e in range(down.shape[0])])
            shared_down = block.shared_expert.down_proj.weight  # (H, I_shared)
            measured["shared"][layer] = torch.tensor([rise_without(shared_down, (slice(None), j))
                                                      for j in range(shared_down.shape[1])])
        num_groups = student.config.num_key_value_heads
        for layer, attn in family.attention_modules(student):
            o = attn.o_proj.weight  # (H, G * R * D)
            width = o.shape[1] // num_groups
            measured["groups"][layer] = torch.tensor([rise_without(o, (slice(None), slice(g * width, (g + 1) * width)))
                                                      for g in range(num_groups)])
    fisher = compute_scores(student, batches, "kd_fisher", teacher=teacher, kd=kd, seed=0, fisher_draws=8)
    taylor = compute_scores(student, batches, "kd_taylor", teacher=teacher, kd=kd)

    def rho(scores, kind):  # mean Spearman over the rankings select_keep makes: per expert, per layer
        rows = [pair for layer, truth in measured[kind].items()
                for pair in zip(truth.reshape(-1, truth.shape[-1]), getattr(scores, kind)[layer].reshape(-1, truth.shape[-1]))]
        return sum(_spearman(a, b) for a, b in rows) / len(rows)

    result = {kind: (rho(fisher, kind), rho(taylor, kind)) for kind in measured}
    assert all((t > 0).all() for table in measured.values() for t in table.values())  # removal costs at the optimum
    for kind, (rho_fisher, rho_taylor) in result.items():
        assert rho_fisher > 0.85, result
        assert rho_fisher > rho_taylor + 0.05, result
    # Seeded: the same draws again; another seed, other draws.
    one, again, other = (compute_scores(student, batches[:1], "kd_fisher", teacher=teacher, kd=kd, seed=seed)
                         for seed in (0, 0, 1))
    assert torch.equal(one.experts[0], again.experts[0]) and not torch.equal(one.experts[0], other.experts[0])
    assert all(p.requires_grad and p.grad is None for p in student.parameters())


def test_kd_fisher_needs_a_teacher_and_whole_draws():
    from lightning_slimmoe.config import StageConfig

    model = tiny_model("mixtral")
    with pytest.raises(ValueError, match="criterion='kd_fisher' needs a teacher"):
        compute_scores(model, [random_batch()], "kd_fisher")
    with pytest.raises(ValueError, match="fisher_draws=0"):
        compute_scores(model, [random_batch()], "kd_fisher", teacher=model, fisher_draws=0)
    with pytest.raises(ValueError, match=r"stages\[s\]\.fisher_draws"):
        StageConfig(name="s", criterion="kd_fisher", fisher_draws=0)
