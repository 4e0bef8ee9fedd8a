"""How well a filtering rule (multi_krum, flame) tells the attacker from the benign users: its detection rates,
read off each round's screening (`federation.Screening`: whom it kept and whom it rejected).

BackFed's convention (Dao et al., thinh-dao/BackFed): a rejected update is a positive. In a round the attacker
took part in, the true-positive rate (recall: the attacker rejected), the false-positive rate (benign users
rejected) and precision (rejected updates that were the attacker's); in a round without it, only the false-alarm
rate (benign users rejected, BackFed's `fpr_clean`). Over a run's rounds, the same rates from the summed counts.
scikit-learn's confusion matrix does the counting.
"""

from __future__ import annotations

from typing import Any

from fedmeta.federation import Screening

COUNTS = ("tp", "fp", "fn", "tn")


def counts(screening: Screening, attacker: int) -> dict[str, int]:
    """The round's confusion counts: positives are rejected updates, the attacker's update the true one."""
    from sklearn.metrics import confusion_matrix

    truth = [u == attacker for u in screening.users]
    flagged = [u in screening.rejected for u in screening.users]
    tn, fp, fn, tp = (int(c) for c in confusion_matrix(truth, flagged, labels=[False, True]).ravel())
    return {"tp": tp, "fp": fp, "fn": fn, "tn": tn}


def rates(c: dict[str, int]) -> dict[str, float]:
    """Rates of summed or single-round counts: tpr, fpr and precision when an attacker was among the users,
    false_alarm when none was; an empty denominator counts as 1 (BackFed's), so nothing flagged reads 0."""
    fpr = c["fp"] / max(c["fp"] + c["tn"], 1)
    if c["tp"] + c["fn"] == 0:
        return {"false_alarm": round(fpr, 6)}
    return {
        "tpr": round(c["tp"] / (c["tp"] + c["fn"]), 6),
        "fpr": round(fpr, 6),
        "precision": round(c["tp"] / max(c["tp"] + c["fp"], 1), 6),
    }


def round_row(rnd: int, screening: Screening, attacker: int) -> dict[str, Any]:
    """One round's record: who was kept and rejected (numbered from 1, as the metrics files number users), its
    counts and its rates."""
    c = counts(screening, attacker)
    return {
        "round": rnd,
        "attacked": attacker in screening.users,
        "kept": [u + 1 for u in screening.kept],
        "rejected": [u + 1 for u in screening.rejected],
        **c,
        **rates(c),
    }


def summary(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """A run's rates over its attack rounds and over its benign rounds, each from the summed counts, with how many
    rounds each holds; a kind of round the run did not have is left out."""
    out = {}
    for label, attacked in (("attack_rounds", True), ("benign_rounds", False)):
        chosen = [r for r in rows if r["attacked"] == attacked]
        if chosen:
            out[label] = {"rounds": len(chosen), **rates({k: sum(r[k] for r in chosen) for k in COUNTS})}
    return out
