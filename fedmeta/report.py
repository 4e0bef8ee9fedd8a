"""The reproduction report: the paper's numbers beside ours, from the stages' metric files."""
from __future__ import annotations

from typing import Any

# Omniglot numbers stated in the paper's text (Sec. 3-4); figures are not machine-readable.
PAPER_EXP1 = {  # scenario: (after attack train/val %, after continuation train/val %)
    "a": ((78, 77), (50, 50)),
    "b": ((92, 83), (50, 50)),
    "c": ((90, 75), (40, 40)),
}
PAPER_EXP2 = {"a": "> 80 %", "b": "> 80 %", "c": "≈ 10 % after 500 iterations"}
PAPER_EXP3 = {"a": "≈ 20 %", "b": "≈ 20 %", "c": "≈ 0 %"}


def pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _mean(rows: list[dict[str, Any]], key: str) -> float:
    return sum(r[key] for r in rows) / len(rows)


def exp1_table(curves: dict[str, list[dict[str, Any]]]) -> str:
    lines = [
        "| scenario | paper: after attack (train / val) | ours: after attack (train / val, meta-test) | paper: after continuation | ours: after continuation (round, train / val, meta-test) |",
        "|---|---|---|---|---|",
    ]
    for s in sorted(curves):
        rows = curves[s]
        after, last = rows[1], rows[-1]
        (pa, pv), (ca, cv) = PAPER_EXP1[s]
        lines.append(
            f"| {s} | {pa} / {pv} (meta-test ≥ 98) | {pct(after['attack_train'])} / {pct(after['attack_val'])}, {pct(after['meta_test'])} "
            f"| {ca} / {cv} (50 rounds) | round {last['round']}: {pct(last['attack_train'])} / {pct(last['attack_val'])}, {pct(last['meta_test'])} |"
        )
    return "\n".join(lines)


def users_table(exp2: dict[str, list[list[dict[str, Any]]]], exp3: dict[str, list[list[dict[str, Any]]]]) -> str:
    """Final points of Experiments 2 and 3, averaged over benign users, at the same fine-tuning step."""
    lines = [
        "| scenario | paper Exp 2 backdoor | ours Exp 2 (train / val, meta-test) | paper Exp 3 backdoor | ours Exp 3 (train / val, meta-test) | step |",
        "|---|---|---|---|---|---|",
    ]
    for s in sorted(exp2):
        final2 = [rows[-1] for rows in exp2[s]]
        final3 = [rows[-1] for rows in exp3.get(s, [])]
        ours3 = (
            f"{pct(_mean(final3, 'attack_train'))} / {pct(_mean(final3, 'attack_val'))}, {pct(_mean(final3, 'meta_test'))}" if final3 else "—"
        )
        lines.append(
            f"| {s} | {PAPER_EXP2[s]} | {pct(_mean(final2, 'attack_train'))} / {pct(_mean(final2, 'attack_val'))}, {pct(_mean(final2, 'meta_test'))} "
            f"| {PAPER_EXP3[s]} (meta-test > 96) | {ours3} | {final2[0]['step']} |"
        )
    return "\n".join(lines)


ABLATION_LABELS = {
    "none": "full defense (Exp. 3)",
    "attention": "no cosine attention (softmax head)",
    "reinit": "no noisy re-initialisation (δ = 1)",
    "finetune": "no fine-tuning",
    "defense": "no defense (Exp. 2)",
    "attack": "full defense, model never attacked (control)",
}


def ablation_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| defense variant | scenario | attack train | attack val | main task | meta-test | steps |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {ABLATION_LABELS.get(r['removed'], r['removed'])} | {r['scenario']} | {pct(float(r['attack_train']))} | {pct(float(r['attack_val']))} "
            f"| {pct(float(r['main']))} | {pct(float(r['meta_test']))} | {r['steps']} |"
        )
    return "\n".join(lines)
