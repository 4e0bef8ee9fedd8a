"""The reproduction report: the paper's numbers beside ours, from the stages' metric files."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class PaperNumbers:
    """What the paper's text (Sec. 3-4) states for one dataset; its figures are not machine-readable."""

    dataset: str  # as the paper names it
    exp1: dict[
        str, tuple[tuple[int, int], tuple[int, int]]
    ]  # scenario: (after attack train/val %, after continuation train/val %)
    exp1_meta_test: dict[str, str]  # scenario: meta-test accuracy after the attack
    meta_test_before: str  # before the attack (round 0)
    continuation_rounds: int
    exp2: dict[str, str]  # scenario: backdoor accuracy after long benign fine-tuning
    exp2_quote: str  # the paper's own words for Experiment 2 in (c), which the table's cell condenses
    exp3: dict[str, str]  # scenario: backdoor accuracy under the defense
    exp3_meta_test: str
    finetune_steps: int  # Experiments 2 and 3's fine-tuning
    # the backdoor levels (attack training, %) the figures mark, read off exp2 and exp3; None where the text gives none
    exp2_level: dict[str, float | None]
    exp3_level: dict[str, float | None]


PAPER = {
    "omniglot": PaperNumbers(
        dataset="Omniglot",
        exp1={"a": ((78, 77), (50, 50)), "b": ((92, 83), (50, 50)), "c": ((90, 75), (40, 40))},
        exp1_meta_test={"a": "> 98", "b": "> 98", "c": "> 98"},
        meta_test_before="> 99",
        continuation_rounds=50,
        exp2={"a": "> 80 %", "b": "> 80 %", "c": "falls by ≈ 10 points over 500 iterations"},
        exp2_quote="when backdoor classes are present (Fig. 5c), attack accuracy drops slightly for all users, and it "
        "is gradually reduced during fine-tuning (≈ 10% after 500 iterations)",
        exp3={"a": "≈ 20 %", "b": "≈ 20 %", "c": "≈ 0 %"},
        exp3_meta_test="> 96",
        finetune_steps=500,
        exp2_level={"a": 80, "b": 80, "c": None},
        exp3_level={"a": 20, "b": 20, "c": 0},
    ),
    "miniimagenet": PaperNumbers(
        dataset="mini-ImageNet",
        exp1={"a": ((74, 55), (68, 48)), "b": ((76, 50), (69, 42)), "c": ((65, 32), (55, 25))},
        exp1_meta_test={"a": "≈ 50", "b": "≈ 50", "c": "> 50"},
        meta_test_before="> 60",
        continuation_rounds=100,
        exp2={"a": "≈ 75 / 50 %", "b": "≈ 75 / 50 %", "c": "≈ 20 points below (a) and (b)"},
        exp2_quote="when backdoor classes are present during fine-tuning (Fig. 6c), main-task accuracy is improved "
        "by 5% and attack accuracy is reduced by 20% for all users",
        exp3={"a": "≈ 20 %", "b": "≈ 20 %", "c": "≈ 10 %"},
        exp3_meta_test="≈ 35",
        finetune_steps=500,
        exp2_level={"a": 75, "b": 75, "c": None},
        exp3_level={"a": 20, "b": 20, "c": 10},
    ),
}


def pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _mean(rows: list[dict[str, Any]], key: str) -> float:
    return sum(r[key] for r in rows) / len(rows)


def lifespan(rows: list[dict[str, Any]]) -> int | None:
    """How long Experiment 1's backdoor lives: the first round from which its accuracy (attack training) stays
    within the pretrained model's interval, round 0's accuracy ± its 95 % half-width, at every later measured
    round; None while it is still outside at the last one. 1: the attack round itself left it there, so the
    attack never lifted it measurably. A repeated attacker's later rounds count like any other."""
    before = next(r for r in rows if r["round"] == 0)
    low, high = (before["attack_train"] + s * before["attack_train_ci95"] for s in (-1, 1))
    life = None
    for r in sorted((r for r in rows if r["round"] > 0), key=lambda r: r["round"], reverse=True):
        if not low <= r["attack_train"] <= high:
            break
        life = r["round"]
    return life


def exp1_table(curves: dict[str, list[dict[str, Any]]], paper: PaperNumbers) -> str:
    """Experiment 1 beside the paper, with the backdoor's lifespan (`lifespan`; '> N': it outlived round N)."""
    p = paper.dataset
    lines = [
        f"| scenario | paper ({p}): after attack (train / val) | ours: after attack (train / val, meta-test) "
        f"| paper ({p}): after continuation "
        "| ours: after continuation (round, train / val, meta-test) | lifespan (round) |",
        "|---|---|---|---|---|---|",
    ]
    for s in sorted(curves):
        rows = curves[s]
        after, last, life = rows[1], rows[-1], lifespan(rows)
        (pa, pv), (ca, cv) = paper.exp1[s]
        lines.append(
            f"| {s} | {pa} / {pv} (meta-test {paper.exp1_meta_test[s]}; before the attack {paper.meta_test_before}) "
            f"| {pct(after['attack_train'])} / {pct(after['attack_val'])}, {pct(after['meta_test'])} "
            f"| {ca} / {cv} ({paper.continuation_rounds} rounds) "
            f"| round {last['round']}: {pct(last['attack_train'])} / {pct(last['attack_val'])}, "
            f"{pct(last['meta_test'])} | {life if life is not None else '> ' + str(last['round'])} |"
        )
    return "\n".join(lines)


def users_table(
    exp2: dict[str, list[list[dict[str, Any]]]],
    exp3: dict[str, list[list[dict[str, Any]]]],
    paper: PaperNumbers,
    users: list[int],
) -> str:
    """Final points of Experiments 2 and 3, averaged over the benign `users` (numbered from 1), at the same
    fine-tuning step; the paper's words for (c) follow the table, since its cell can only condense them."""
    p, over = paper.dataset, f"mean over users {', '.join(map(str, users))}"
    lines = [
        f"| scenario | paper ({p}) Exp 2 backdoor | ours Exp 2, {over} (train / val, meta-test) "
        f"| paper ({p}) Exp 3 backdoor | ours Exp 3, {over} (train / val, meta-test) | step |",
        "|---|---|---|---|---|---|",
    ]
    for s in sorted(exp2):
        final2 = [rows[-1] for rows in exp2[s]]
        final3 = [rows[-1] for rows in exp3.get(s, [])]
        ours3 = (
            f"{pct(_mean(final3, 'attack_train'))} / {pct(_mean(final3, 'attack_val'))}, "
            f"{pct(_mean(final3, 'meta_test'))}"
            if final3
            else "—"
        )
        lines.append(
            f"| {s} | {paper.exp2[s]} | {pct(_mean(final2, 'attack_train'))} / {pct(_mean(final2, 'attack_val'))}, "
            f"{pct(_mean(final2, 'meta_test'))} "
            f"| {paper.exp3[s]} (meta-test {paper.exp3_meta_test}) | {ours3} | {final2[0]['step']} |"
        )
    lines.append(f'\nThe paper on Experiment 2 in (c) (Sec. 3): "{paper.exp2_quote}".')
    return "\n".join(lines)


ABLATION_LABELS = {
    "none": "full defense (Exp. 3)",
    "attention": "no cosine attention (softmax head)",
    "reinit": "no noisy re-initialisation (δ = 1)",
    "finetune": "no fine-tuning",
    "defense": "no defense (Exp. 2)",
    "attack": "full defense, model never attacked (control)",
}


def ablation_table(rows: list[dict[str, Any]], user: int) -> str:
    """The ablation's rows, all measured on benign `user`'s episodes (numbered from 1), as stages/ablation.py
    runs it."""
    lines = [
        f"| defense variant | scenario | user {user}: attack train | attack val | main task | meta-test | steps |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {ABLATION_LABELS.get(r['removed'], r['removed'])} | {r['scenario']} | {pct(float(r['attack_train']))} "
            f"| {pct(float(r['attack_val']))} "
            f"| {pct(float(r['main']))} | {pct(float(r['meta_test']))} | {r['steps']} |"
        )
    return "\n".join(lines)


# The claims `dvc exp show` compares across experiments (metrics/summary.json), in % (price: points), one decimal,
# per scenario. No name is a section of params.yaml, so that `--keep '^(success|persist|...)\.'` picks these columns
# alone, and all fit `dvc metrics show` in 200 columns: hence the price per model, "bc" for the one (b) and (c) share.
SUMMARY_CLAIMS = {
    "success": "backdoor accuracy (attack training) right after the attack round",
    "persist": "the same after Experiment 1's benign rounds",
    "defend": "the same after Experiment 3's defended fine-tuning, mean over benign users",
    "price": "meta-test points the defense costs against Experiment 2's fine-tuning, mean over benign users, per model",
    "random": "backdoor accuracy with the target at a random output of the user's episodes, after the attack",
}


def summary(
    exp1: dict[str, list[dict[str, Any]]],
    exp2: dict[str, list[list[dict[str, Any]]]],
    exp3: dict[str, list[list[dict[str, Any]]]],
    positions: Positions,
    models: dict[str, str],
) -> dict[str, dict[str, float]]:
    """The paper's claims per scenario as one small metrics file (SUMMARY_CLAIMS), so that `dvc exp show` and
    `dvc metrics show` compare runs on them in a terminal's width. `models`: the model each scenario starts from;
    meta-test accuracy is the model's, whatever the scenario, so the price is given once per model."""

    def final(curves: list[list[dict[str, Any]]], key: str) -> float:
        return _mean([rows[-1] for rows in curves], key)

    def r(x: float) -> float:
        return round(100 * x, 1)

    shared = {"".join(s for s in sorted(exp3) if models[s] == m): m for m in sorted({models[s] for s in exp3})}
    return {
        "success": {s: r(next(p for p in c if p["round"] == 1)["attack_train"]) for s, c in sorted(exp1.items())},
        "persist": {s: r(c[-1]["attack_train"]) for s, c in sorted(exp1.items())},
        "defend": {s: r(final(exp3[s], "attack_train")) for s in sorted(exp3)},
        "price": {k: r(final(exp2[k[0]], "meta_test") - final(exp3[k[0]], "meta_test")) for k in sorted(shared)},
        "random": {s: r(positions[s]["attacked"]["random"]["attack_train"]) for s in sorted(positions)},
    }


def summary_table(claims: dict[str, dict[str, float]]) -> str:
    """The claims by scenario; a value given for several scenarios (the price of the model they share) in each."""
    scen = sorted({s for per in claims.values() for key in per for s in key})
    lines = [f"| claim (`metrics/summary.json`) | what it is | {' | '.join(scen)} |", "|---|---|" + "---|" * len(scen)]
    for key, per in claims.items():
        cells = " | ".join(next((f"{v:.1f}" for k, v in per.items() if s in k), "—") for s in scen)
        lines.append(f"| `{key}` | {SUMMARY_CLAIMS[key]} | {cells} |")
    return "\n".join(lines)


# --- Experiment 4: server-side rules ------------------------------------------------------------

Exp4Key = tuple[str, str, bool, str, str]  # attacker, aggregator, secure aggregation, federation, scenario


def ci(row: dict[str, Any], key: str) -> str:
    return f"{pct(row[key])} ± {pct(row[f'{key}_ci95'])}"


def overlaps(a: dict[str, Any], b: dict[str, Any], key: str) -> bool:
    """Whether the two 95 % intervals of `key` overlap: no evidence that the two models differ."""
    return abs(a[key] - b[key]) <= a[f"{key}_ci95"] + b[f"{key}_ci95"]


def exp4_stopped(curves: dict[Exp4Key, list[dict[str, Any]]], key: Exp4Key) -> bool:
    """A rule stops the attack when backdoor accuracy after the attack round stays within the intervals
    of θ_0's, the pretrained model before any attack (recorded by the mean rule's run)."""
    attacker, _, _, fed, scenario = key
    before = curves[("naive", "mean", False, fed, scenario)][0]
    after = next(r for r in curves[key] if r["round"] == 1)
    return overlaps(before, after, "attack_train") and overlaps(before, after, "attack_val")


def exp4_table(curves: dict[Exp4Key, list[dict[str, Any]]]) -> str:
    """Per federation, attacker, rule and scenario: the attack round and the last benign round."""
    lines = [
        "| M | attacker | rule | scenario | backdoor after attack: train | val | meta-test after attack "
        "| backdoor at last round: train | meta-test at last round | stopped |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key in sorted(k for k in curves if not k[2]):
        attacker, rule, _, fed, scenario = key
        after, last = next(r for r in curves[key] if r["round"] == 1), curves[key][-1]
        lines.append(
            f"| {fed} | {attacker} | {rule} | {scenario} | {ci(after, 'attack_train')} | {ci(after, 'attack_val')} "
            f"| {ci(after, 'meta_test')} "
            f"| round {last['round']}: {ci(last, 'attack_train')} | {ci(last, 'meta_test')} "
            f"| {'yes' if exp4_stopped(curves, key) else 'no'} |"
        )
    return "\n".join(lines)


def exp4_price_table(price: dict[tuple[str, str], dict[str, Any]]) -> str:
    """Benign-only rounds from the same pretrained model: each rule's meta-test accuracy beside the mean rule's."""
    lines = [
        "| M | rule | meta-test after the benign rounds | change against mean (points) | within mean's interval |",
        "|---|---|---|---|---|",
    ]
    for (fed, rule), row in sorted(price.items()):
        base = price[(fed, "mean")]
        lines.append(
            f"| {fed} | {rule} | round {row['round']}: {ci(row, 'meta_test')} "
            f"| {100 * (row['meta_test'] - base['meta_test']):+.1f} "
            f"| {'yes' if overlaps(row, base, 'meta_test') else 'no'} |"
        )
    return "\n".join(lines)


def exp4_secure_table(user: dict[tuple[str, str], dict[str, Any]]) -> str:
    """Under secure aggregation: the attacked model as the server produced it, then each user's own choice."""
    lines = [
        "| rule under secure aggregation | scenario | backdoor after attack (train / val) "
        "| user fine-tunes: backdoor train / val, meta-test "
        "| user's matching defense: backdoor train / val, meta-test | steps |",
        "|---|---|---|---|---|---|",
    ]
    for (rule, scenario), s in sorted(user.items()):
        a, f, d = s["attack_round"], s["user_finetune"], s["user_defense"]
        lines.append(
            f"| {rule} | {scenario} | {ci(a, 'attack_train')} / {ci(a, 'attack_val')} "
            f"| {ci(f, 'attack_train')} / {ci(f, 'attack_val')}, {ci(f, 'meta_test')} "
            f"| {ci(d, 'attack_train')} / {ci(d, 'attack_val')}, {ci(d, 'meta_test')} | {d['step']} |"
        )
    return "\n".join(lines)


def exp4_answers(curves: dict[Exp4Key, list[dict[str, Any]]], price: dict[tuple[str, str], dict[str, Any]]) -> str:
    """The section's answer in sentences, read off the tables: which rules stop the attack in every scenario."""
    out = []
    for fed in sorted({k[3] for k in curves}):
        for attacker in ("naive", "adaptive"):
            keys = [k for k in curves if k[0] == attacker and k[3] == fed and not k[2]]
            if not keys:
                continue
            rules = sorted({k[1] for k in keys})
            stop = [r for r in rules if all(exp4_stopped(curves, k) for k in keys if k[1] == r)]
            costs = ", ".join(
                f"{r} {100 * (price[(fed, r)]['meta_test'] - price[(fed, 'mean')]['meta_test']):+.1f}"
                for r in stop
                if (fed, r) in price
            )
            out.append(
                f"- {fed}, {attacker} attacker (rules run: {', '.join(rules)}): "
                "backdoor accuracy after the attack stays within θ_0's intervals "
                f"in every scenario under {', '.join(stop) if stop else 'none of them'}"
                + (f"; benign meta-test change against mean (points): {costs}" if costs else "")
                + "."
            )
    return "\n".join(out)


DetectionKey = tuple[str, str, str, str]  # federation, variant, attacker, aggregator


def exp4_detection_table(detection: dict[DetectionKey, dict[str, Any]]) -> str:
    """Per filtering rule's run (stages/exp4.py's detection files): whom the rule kept and rejected in each round
    (users numbered from 1, the attacker marked *), then its rates over the attack rounds and the benign ones
    (`fedmeta.detection`, BackFed's convention)."""
    lines = [
        "| M | variant | attacker | rule | kept / rejected, by round | attack rounds: TPR | FPR | precision "
        "| benign rounds: false alarms |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def users(us: list[int], attacker: int) -> str:
        return " ".join(f"{u}*" if u == attacker else str(u) for u in us) or "none"

    def rate(part: dict[str, Any] | None, key: str) -> str:
        return f"{pct(part[key])} ({part['rounds']} rounds)" if part else "—"

    for (fed, variant, attacker, rule), d in sorted(detection.items()):
        by_round = "; ".join(
            f"{r['round']}: {users(r['kept'], d['attacker'])} / {users(r['rejected'], d['attacker'])}"
            for r in d["rounds"]
        )
        a, b = d.get("attack_rounds"), d.get("benign_rounds")
        lines.append(
            f"| {fed} | {variant} | {attacker} | {rule} | {by_round} | {rate(a, 'tpr')} "
            f"| {pct(a['fpr']) if a else '—'} | {pct(a['precision']) if a else '—'} | {rate(b, 'false_alarm')} |"
        )
    return "\n".join(lines)


# --- Where the target sits -----------------------------------------------------------------------

POSITION_ROWS = {"attack_train": "backdoor, attack train", "attack_val": "backdoor, attack val", "main": "main task"}


Positions = dict[str, dict[str, dict[str, dict[str, Any]]]]  # scenario → model → position → accuracies


def positions_table(positions: Positions, paper: PaperNumbers, n_way: int, attacker_output: int | None) -> str:
    """Per scenario and model (before / after the attack), accuracy with the target at each output in turn and at
    a random one, beside the paper's backdoor accuracy after the attack. The paper evaluates where its attacker
    trains the target (`attacker_output`; None: the attacker puts it at random); a user's label order is
    arbitrary, so the random output is the headline. A position not measured (the pretrained model's, but for
    the random one and the attacker's) shows "—"."""
    heads = [f"output {k}" + (" (attacker's)" if k == attacker_output else "") for k in range(n_way)]
    lines = [
        f"| scenario | model | measured | paper ({paper.dataset}), after attack | {' | '.join(heads)} "
        "| **random output (headline)** |",
        "|---|---|---|---|" + "---|" * (n_way + 1),
    ]
    for s in sorted(positions):
        (train, val), _ = paper.exp1[s]
        stated = {"attack_train": str(train), "attack_val": str(val)}
        for model, points in positions[s].items():
            for key, label in POSITION_ROWS.items():
                cells = " | ".join(
                    ci(points[f"output_{k}"], key) if f"output_{k}" in points else "—" for k in range(n_way)
                )
                lines.append(
                    f"| {s} | {model} | {label} | {stated.get(key, '—') if model == 'attacked' else '—'} | {cells} "
                    f"| **{ci(points['random'], key)}** |"
                )
    return "\n".join(lines)


# --- User-side defenses: the user's own head beside the matching network ----------------------------

HEAD_LABELS = {"shared": "none: the shared head (Exp. 2)", "zero": "zero head", "prototype": "prototype head"}
POSITION_FREE = ("none", "reinit", "finetune", "attack")  # ablation rows with the matching head: no output-own weights


def _backdoor(row: dict[str, Any] | None) -> str:
    if row is None:
        return "—"
    return f"{pct(float(row['attack_train']))} / {pct(float(row['attack_val']))}"


def defenses_table(
    heads: dict[str, dict[str, dict[str, Any]]],
    ablation: list[dict[str, Any]],
    positions: tuple[str, str],
    ablation_at: str,
    baseline: str,
) -> str:
    """Every user-side defense per scenario, on benign user 2's episodes after the same fine-tuning steps: the head
    rules of `evaluation.head` (stage heads, measured with the target at the attacker's output and at a random one,
    `positions` naming the two measurements) and the matching network with its ablation rows (stage ablation,
    measured at `ablation_at`, one of them). The matching head has no weights of its own per output, so its rows
    stand for both positions; the softmax-head ablation keeps part of the shared head and is shown only where it was
    measured. A head rule's base rate, the same measurement on the pretrained model (`baseline`, a random output),
    sits beside it: only the excess is the attack's. Price: meta-test change against the shared head, in points, on
    the same meta-test episodes."""
    lines = [
        "| user-side defense | scenario | backdoor at the attacker's output (train / val) "
        "| backdoor at a random output (train / val) | the same, pretrained model | main task | meta-test "
        "| price (points) | steps |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in sorted(heads):
        base = float(heads[s]["shared"]["meta_test"])
        rows: list[tuple[str, dict[str, dict[str, Any] | None], dict[str, Any]]] = []
        for rule in sorted(heads[s], key=list(HEAD_LABELS).index):
            row = heads[s][rule]
            rows.append((HEAD_LABELS[rule], {p: row.get(p) for p in (*positions, baseline)}, row))
        for r in ablation:
            if r["scenario"] != s or r["removed"] == "defense":  # "no defense" is the shared head's row
                continue
            at = {p: (r if p == ablation_at or r["removed"] in POSITION_FREE else None) for p in positions}
            rows.append((f"matching network: {ABLATION_LABELS.get(r['removed'], r['removed'])}", at, r))
        for label, at, row in rows:
            main = next((at[p] for p in positions if at[p] is not None), None)
            meta = float(row["meta_test"])
            lines.append(
                f"| {label} | {s} | {_backdoor(at[positions[0]])} | {_backdoor(at[positions[1]])} "
                f"| {_backdoor(at.get(baseline))} | {pct(float(main['main'])) if main is not None else '—'} "
                f"| {pct(meta)} ± {pct(float(row['meta_test_ci95']))} | {100 * (meta - base):+.1f} | {row['steps']} |"
            )
    return "\n".join(lines)
