"""SlimMoE's claims (arXiv 2506.18349 §6), read off ``bench/quality.py`` results: one table, a row per claim and
result directory, each a paired difference of held-out perplexity per seed (the same teacher, data stream and
calibration batches for both sides), its mean ± std, and how many seeds favour the claim.

    python bench/quality_claims.py bench/out/quality-stdlib-phitiny bench/out/quality-wikitext-phitiny ... \
        [--pair DIR_A:METHOD,DIR_B:METHOD ...] [--out claims.md]

``--pair`` compares one method of one result directory with one of another (e.g. the same multi-stage method under
two stage splits, or budgets): the two must share the teacher and the seeds, so that each seed's two runs saw the
same data stream and calibration batches.

"before KD" is given for one-shot pairs only (a multi-stage run's is its first, milder prune). The last column but one says whether the two sides have the same size (expert removal keeps at least top_k whole
experts, so at small widths it is bigger than the slimmed model). A claim "holds" in a directory when every seed favours it, "fails" when none does, "mixed" otherwise; a side that
was not run there is left out. Nothing here trains or evaluates anything.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

# (claim, better method, worse method): the claim is that `better` has the lower test perplexity
CLAIMS = [
    ("multi-stage > one-shot (kd_taylor)", "slimmoe", "oneshot"),
    ("multi-stage > one-shot (kd_fisher)", "slimmoe_kd_fisher", "criterion_kd_fisher"),
    ("multi-stage > one-shot (activation)", "slimmoe_activation", "criterion_activation"),
    ("kd_fisher > kd_taylor (multi-stage)", "slimmoe_kd_fisher", "slimmoe"),
    ("kd_taylor > activation (multi-stage)", "slimmoe", "slimmoe_activation"),
    ("kd_fisher > kd_taylor (one-shot)", "criterion_kd_fisher", "oneshot"),
    ("kd_fisher > activation (one-shot)", "criterion_kd_fisher", "criterion_activation"),
    ("kd_fisher > magnitude (one-shot)", "criterion_kd_fisher", "criterion_magnitude"),
    ("kd_taylor > activation (one-shot)", "oneshot", "criterion_activation"),
    ("kd_taylor > magnitude (one-shot)", "oneshot", "criterion_magnitude"),
    ("kd_taylor > random (one-shot)", "oneshot", "criterion_random"),
    ("kd_fisher > random (one-shot)", "criterion_kd_fisher", "criterion_random"),
    ("activation > random (one-shot)", "criterion_activation", "criterion_random"),
    ("magnitude > random (one-shot)", "criterion_magnitude", "criterion_random"),
    ("slimming > expert removal", "oneshot", "expert_removal"),
    ("pruned + KD > from scratch", "oneshot", "from_scratch"),
]


def paired(methods: dict, better: str, worse: str, key: str = "val_ppl_seeds") -> list[float] | None:
    """Per-seed ``better - worse`` (negative favours the claim), None if either side is missing."""
    if better not in methods or worse not in methods:
        return None
    a, b = methods[better], methods[worse]
    if a.get("seeds") != b.get("seeds") or key not in a or key not in b:
        return None
    return [x - y for x, y in zip(a[key], b[key])]


def verdict(diffs: list[float]) -> str:
    wins = sum(d < 0 for d in diffs)
    return ("holds" if wins == len(diffs) else "fails" if wins == 0 else "mixed") + f" ({wins}/{len(diffs)})"


def label(result: dict, directory: Path) -> str:
    c = result["config"]
    groups = c["final_kv_heads"]
    return (f"{directory.name}: width {c['final_expert_width']:g}, {groups} KV groups, "
            f"{len(c['slim_stages'])} stages, lr {c['kd_lr']:g}, schedule {c['lr_schedule']}")


def table(dirs: list[Path]) -> str:
    lines = ["| claim | result | seeds | after KD: better − worse, per seed | mean ± std | before KD: mean | "
             "total params worse / better | verdict |",
             "|---|---|---|---|---:|---:|---:|---|"]
    for directory in dirs:
        result = json.loads((directory / "quality.json").read_text())
        methods = result["methods"]
        for claim, better, worse in CLAIMS:
            diffs = paired(methods, better, worse)
            if diffs is None:
                continue
            # before KD compares like with like only between one-shot prunes (a multi-stage run's "before KD" is its
            # first, milder prune)
            one_shot = not any(m.startswith("slimmoe") for m in (better, worse))
            before = paired(methods, better, worse, "val_ppl_before_kd_seeds") if one_shot else None
            spread = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
            before_mean = f"{statistics.mean(before):+.1f}" if before else "-"
            # expert removal cannot go below top_k whole experts: at small widths it keeps more parameters
            params_ratio = methods[worse]["total_params"] / methods[better]["total_params"]
            lines.append(f"| {claim} | {label(result, directory)} | {','.join(map(str, methods[better]['seeds']))} | "
                         f"{', '.join(f'{d:+.2f}' for d in diffs)} | {statistics.mean(diffs):+.2f} ± {spread:.2f} | "
                         f"{before_mean} | {params_ratio:.2f} | {verdict(diffs)} |")
    return "\n".join(lines) + "\n"


def split_label(result: dict, method: str) -> str:
    """How ``method`` was run in ``result``: its stages (width:share of the budget) if multi-stage, and the budget."""
    c = result["config"]
    stages = ""
    if method.startswith("slimmoe"):
        stages = " " + "/".join(f"{w:g}:{share:g}" for w, share in c["slim_stages"])
        if c.get("groups_stage", len(c["slim_stages"]) - 1) != len(c["slim_stages"]) - 1:
            stages += f" (groups in stage {c['groups_stage']})"
    return f"{method}{stages}, {c['kd_tokens'] // 1000}k tokens, schedule {c['lr_schedule']}"


def pair_side(spec: str) -> tuple[Path, str, dict]:
    directory, sep, method = spec.rpartition(":")
    if not sep or not directory or not method:
        raise ValueError(f"{spec!r}: give DIR:METHOD")
    path = Path(directory)
    if not (path / "quality.json").is_file():
        raise ValueError(f"{spec!r}: no quality.json in {directory}")
    result = json.loads((path / "quality.json").read_text())
    if method not in result["methods"]:
        raise ValueError(f"{spec!r}: {directory} has no method {method!r} (it has {sorted(result['methods'])})")
    return path, method, result


def pair_rows(pairs: list[str]) -> str:
    """One row per ``DIR_A:METHOD,DIR_B:METHOD``: the claim that A's run beats B's, paired per seed."""
    lines = ["| better (A) | worse (B) | seeds | after KD: A − B, per seed | mean ± std | A / B total params | "
             "verdict |", "|---|---|---|---|---:|---:|---|"]
    for spec in pairs:
        sides = spec.split(",")
        if len(sides) != 2:
            raise ValueError(f"--pair {spec!r}: give DIR_A:METHOD,DIR_B:METHOD")
        (dir_a, m_a, res_a), (dir_b, m_b, res_b) = pair_side(sides[0]), pair_side(sides[1])
        # the same teacher (its held-out ppl to the digit) and the same seeds: each seed's two runs are paired
        if res_a["teacher"]["val_ppl"] != res_b["teacher"]["val_ppl"]:
            raise ValueError(f"--pair {spec!r}: the two directories have different teachers "
                             f"(test ppl {res_a['teacher']['val_ppl']:.3f} vs {res_b['teacher']['val_ppl']:.3f})")
        a, b = res_a["methods"][m_a], res_b["methods"][m_b]
        if a.get("seeds") != b.get("seeds"):
            raise ValueError(f"--pair {spec!r}: seeds {a.get('seeds')} vs {b.get('seeds')}")
        diffs = [x - y for x, y in zip(a["val_ppl_seeds"], b["val_ppl_seeds"])]
        spread = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
        lines.append(f"| {dir_a.name}: {split_label(res_a, m_a)} | {dir_b.name}: {split_label(res_b, m_b)} | "
                     f"{','.join(map(str, a['seeds']))} | {', '.join(f'{d:+.2f}' for d in diffs)} | "
                     f"{statistics.mean(diffs):+.2f} ± {spread:.2f} | "
                     f"{a['total_params'] / b['total_params']:.2f} | {verdict(diffs)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dirs", nargs="*", help="--out directories of bench/quality.py (each with quality.json)")
    parser.add_argument("--pair", action="append", default=[], metavar="DIR_A:METHOD,DIR_B:METHOD",
                        help="also compare A's method with B's (same teacher and seeds), a row each; repeatable")
    parser.add_argument("--out", help="also write the table here")
    args = parser.parse_args(argv)
    dirs = [Path(d) for d in args.dirs]
    missing = [str(d) for d in dirs if not (d / "quality.json").is_file()]
    if missing:
        parser.error(f"no quality.json in {', '.join(missing)} (run bench/quality.py there first)")
    if not dirs and not args.pair:
        parser.error("give result directories or --pair")
    text = table(dirs) if dirs else ""
    if args.pair:
        try:
            text += ("\n" if text else "") + pair_rows(args.pair)
        except ValueError as error:
            parser.error(str(error))
    if args.out:
        Path(args.out).write_text(text)
    print(text)
    return text


if __name__ == "__main__":
    main()
