"""Stage report of Experiment 4 (experiment4/dvc.yaml): its figure and tables, from the exp4 stages' files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedmeta import figures, report, runtime
from fedmeta.atomic import write_text

FOLDER = runtime.METRICS / "exp4"


def _read(
    folder: Path,
) -> tuple[
    dict[report.Exp4Key, list[dict[str, Any]]],
    dict[tuple[str, str], dict[str, Any]],
    dict[tuple[str, str], dict[str, Any]],
]:
    """Experiment 4's files (stages/exp4.py), `summary/<variant>-<federation>/<attacker>-<rule>[-secure].json` and
    their curves: the curves per scenario, the benign runs' final meta-test, and the secure runs' user-side
    measurements."""
    curves, price, user = {}, {}, {}
    for path in sorted((folder / "summary").glob("*/*.json")):
        (_, fed), (attacker, rule, *secure) = path.parent.name.split("-"), path.stem.split("-")
        summary = runtime.read_json(path)
        if attacker == "benign":
            price[(fed, rule)] = summary
            continue
        for csv_path in sorted((folder / "curves" / path.parent.name / path.stem).glob("*.csv")):
            curves[(attacker, rule, bool(secure), fed, csv_path.stem)] = runtime.read_csv(csv_path)
        if secure:
            user.update({(rule, s): summary[s] for s in summary})
    return curves, price, user


def _detection(folder: Path) -> dict[report.DetectionKey, dict[str, Any]]:
    """The filtering rules' screenings, `detection/<variant>-<federation>/<attacker>-<rule>.json`, by federation,
    variant, attacker and rule."""
    out = {}
    for path in sorted((folder / "detection").glob("*/*.json")):
        (variant, fed), (attacker, rule) = path.parent.name.split("-"), path.stem.split("-")
        out[(fed, variant, attacker, rule)] = runtime.read_json(path)
    return out


def main() -> None:
    with runtime.stage("exp4-report") as (params, run):
        curves, price, user = _read(FOLDER)
        figure = figures.server_defenses(curves, runtime.CURVES / "exp4_defenses.png", params.dataset)
        text = "\n\n".join(
            [
                f"# Experiment 4: server-side defenses against the one-shot attack (profile `{params.profile}`, "
                f"dataset `{params.dataset}`)",
                "Beyond the paper (docs/experiment4.md). All numbers are % ± the 95 % interval's half-width, averaged "
                f"over {params.budget.eval_episodes} episodes. "
                "'stopped': backdoor accuracy after the attack round within the intervals "
                "of the pretrained model before the attack (round 0). "
                "m4: the paper's federation (M = 4, M_min = 3, λ = 3); m20: the same classes "
                "among 20 users (M_r = M_min = 5, λ = 5); "
                "the adaptive attacker rescales its update to just under norm_clip's bound.",
                report.exp4_answers(curves, price),
                report.exp4_table(curves),
                "## Detection by the filtering rules",
                "Whom multi_krum and flame kept and rejected in each round, and their rates (BackFed's convention, "
                "a rejected update being a positive): in the rounds the attacker took part in, the true-positive "
                "rate (the attacker rejected), the false-positive rate (benign users rejected) and precision; in "
                "the rounds without it, false alarms (benign users rejected). Rates are % of the summed counts.",
                report.exp4_detection_table(_detection(FOLDER)),
                "## The price of each rule when nobody attacks",
                report.exp4_price_table(price),
                "## Secure aggregation: what is left to a user",
                "The server sees only masked updates, so only mean and norm_clip can run "
                "(clipping by each client, which the attacker's client skips); "
                "each benign user can still fine-tune the attacked model, "
                "plainly or with Experiment 3's matching-network defense.",
                report.exp4_secure_table(user),
            ]
        )
        write_text(FOLDER / "report.md", text + "\n")
        for p in (figure, FOLDER / "report.md"):
            run.artifact(p)
