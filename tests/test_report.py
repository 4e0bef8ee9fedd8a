"""The report and the figures name the dataset and use the paper's numbers and figure numbers for it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from fedmeta import figures, report


@pytest.mark.parametrize(("dataset", "numbers"), [("omniglot", (1, 3, 5, 7)), ("miniimagenet", (2, 4, 6, 8))])
def test_figures_carry_the_papers_number_and_the_dataset(dataset: str, numbers: tuple[int, ...]) -> None:
    titles = [figures.paper_title(f, dataset) for f in ("backdoor", "exp1", "exp2", "exp3")]
    assert [t.split(":")[0] for t in titles] == [f"Fig. {n}" for n in numbers]
    assert all(t.endswith(f" on {figures.DATASET_NAMES[dataset]}") for t in titles)


def _point(x: float, ci95: float = 0.05, **extra: int) -> dict[str, float]:
    keys = ("meta_test", "main", "attack_train", "attack_val")
    return {**extra, **{k: x for k in keys}, **{f"{k}_ci95": ci95 for k in keys}}


def test_tables_quote_the_papers_numbers_for_the_dataset() -> None:
    exp1 = {s: [_point(0.2, round=0), _point(0.7, round=1), _point(0.6, round=3)] for s in "abc"}
    users = {s: [[_point(0.5, step=0), _point(0.4, step=4)]] for s in "abc"}
    mini, omni = report.PAPER["miniimagenet"], report.PAPER["omniglot"]
    table = report.exp1_table(exp1, mini)
    assert "paper (mini-ImageNet): after attack" in table and "Omniglot" not in table
    assert "| a | 74 / 55 (meta-test ≈ 50; before the attack > 60) | 70.0 / 70.0, 70.0 | 68 / 48 (100 rounds)" in table
    assert "| c | 65 / 32 (meta-test > 50" in table and "| 55 / 25 (100 rounds)" in table
    assert "| b | 92 / 83 (meta-test > 98; before the attack > 99)" in report.exp1_table(exp1, omni)
    assert table.splitlines()[2].endswith("| round 3: 60.0 / 60.0, 60.0 | > 3 |")  # still at 60 % by the last round
    grid = report.users_table(users, users, mini, [2])
    assert "| a | ≈ 75 / 50 % | 40.0 / 40.0, 40.0 | ≈ 20 % (meta-test ≈ 35) |" in grid
    assert "| c | ≈ 20 points below (a) and (b) |" in grid and "≈ 10 % (meta-test ≈ 35)" in grid
    assert "ours Exp 2, mean over users 2 (train / val, meta-test)" in grid
    assert "≈ 0 % (meta-test > 96)" in report.users_table(users, users, omni, [2, 3, 4])


CLAIM_COLUMNS = r"[a-z]+\.b?[abc]"  # the README's `dvc exp show --keep '^[a-z]+\.b?[abc]$'`
PAPER_TEXT = Path(__file__).resolve().parents[2] / "shared/paper/backdoor-attacks-on-federated-meta-learning.md"


@pytest.mark.parametrize("dataset", ["omniglot", "miniimagenet"])
def test_the_papers_experiment_2_statement_is_quoted_word_for_word(dataset: str) -> None:
    if not PAPER_TEXT.is_file():
        pytest.skip(f"{PAPER_TEXT} absent")
    text = PAPER_TEXT.read_text().replace("$", "").replace("\\approx", "≈").replace("\\%", "%")
    text = " ".join(text.split()).replace("( ", "(")
    assert report.PAPER[dataset].exp2_quote in text


def test_summary_holds_each_claim_per_scenario_in_percent() -> None:
    exp1 = {s: [_point(0.2, round=0), _point(0.7, round=1), _point(0.6, round=3)] for s in "abc"}
    exp2 = {s: [[_point(0.9, step=0), _point(0.8, step=4)], [_point(0.9, step=0), _point(0.6, step=4)]] for s in "abc"}
    exp3 = {s: [[_point(0.9, step=0), _point(0.1, step=4)], [_point(0.9, step=0), _point(0.2, step=4)]] for s in "abc"}
    positions = {s: {"attacked": {"random": _point(0.25)}} for s in "abc"}
    claims = report.summary(exp1, exp2, exp3, positions, {"a": "exclude", "b": "include", "c": "include"})
    assert set(claims) == set(report.SUMMARY_CLAIMS)
    assert claims["success"] == {"a": 70.0, "b": 70.0, "c": 70.0}
    assert claims["persist"]["b"] == 60.0 and claims["defend"]["c"] == 15.0 and claims["random"]["a"] == 25.0
    assert claims["price"] == {"a": 55.0, "bc": 55.0}  # meta-test: mean 0.7 fine-tuned, 0.15 defended; per model
    assert "| `price` | meta-test points" in report.summary_table(claims)
    assert report.summary_table(claims).endswith("| 25.0 | 25.0 | 25.0 |")
    assert all(re.fullmatch(CLAIM_COLUMNS, f"{c}.{s}") for c, per in claims.items() for s in per)


def keys(d: dict, prefix: str = "") -> list[str]:
    return [k for key, v in d.items() for k in (keys(v, f"{prefix}{key}.") if isinstance(v, dict) else [prefix + key])]


def test_no_parameter_is_named_like_a_claim() -> None:
    """The README's `dvc exp show --keep` pattern picks the claims' columns and no parameter's."""
    params = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    assert not [k for k in keys(params) if re.fullmatch(CLAIM_COLUMNS, k)]


def test_positions_table_marks_the_attackers_output_and_the_random_headline() -> None:
    def point(x: float) -> dict[str, float]:
        return {
            k: x for k in ("main", "main_ci95", "attack_train", "attack_train_ci95", "attack_val", "attack_val_ci95")
        }

    positions = {
        "a": {
            "pretrained": {"output_4": point(0.4), "random": point(0.21)},
            "attacked": {**{f"output_{k}": point(k / 10) for k in range(5)}, "random": point(0.21)},
        }
    }
    table = report.positions_table(positions, report.PAPER["omniglot"], 5, 4)
    assert "| output 3 | output 4 (attacker's) | **random output (headline)** |" in table
    assert "| a | attacked | backdoor, attack train | 78 | 0.0 ± 0.0 | 10.0 ± 10.0 |" in table
    assert "| a | pretrained | backdoor, attack val | — | — | — | — | — | 40.0 ± 40.0 | **21.0 ± 21.0** |" in table
    assert "(attacker's)" not in report.positions_table(positions, report.PAPER["omniglot"], 5, None)


@pytest.mark.parametrize(
    ("backdoor", "life"),
    [
        ([0.2, 0.9, 0.8, 0.24, 0.16, 0.2], 3),  # back within 20 ± 5 % from round 3 on
        ([0.2, 0.9, 0.22, 0.9, 0.2, 0.2], 4),  # a return above the interval (a repeated attacker) resets it
        ([0.2, 0.9, 0.8, 0.24, 0.16, 0.3], None),  # outside at the last round: it outlived the run
        ([0.2, 0.21, 0.2, 0.2, 0.2, 0.2], 1),  # the attack never lifted it out of the interval
        ([0.2, 0.9, 0.8, 0.24, 0.16, 0.1], None),  # below the interval is outside it too
    ],
)
def test_lifespan_is_the_first_round_from_which_the_backdoor_stays_in_the_pretrained_interval(
    backdoor: list[float], life: int | None
) -> None:
    rows = [_point(x, round=r) for r, x in enumerate(backdoor)]
    for r in rows[1:]:
        r["attack_train_ci95"] = 0.5  # only round 0's half-width sets the interval
    assert report.lifespan(list(reversed(rows))) == life  # rounds are read by number, in any order
