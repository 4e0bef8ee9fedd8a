"""Figures laid out like the paper's: the attack's images (Figs. 1, 2) and the curves of Experiments 1-3
(Figs. 3-8), each drawn by one function for both datasets, numbered and titled as the paper numbers them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from fedmeta.atomic import atomic_path  # noqa: E402
from fedmeta.splits import FederatedData  # noqa: E402

SERIES = {  # the paper's colours: meta-testing black, main task purple, attack training blue, validation green
    "meta_test": ("meta-testing", "black"),
    "main": ("main task", "purple"),
    "attack_train": ("attack training", "tab:blue"),
    "attack_val": ("attack validation", "tab:green"),
}
SCENARIO_TITLES = {
    "a": "(a) backdoor classes not used by benign users",
    "b": "(b) backdoor classes used in benign meta-training",
    "c": "(c) backdoor classes also used in benign fine-tuning",
}


DATASET_NAMES = {"omniglot": "Omniglot", "miniimagenet": "mini-ImageNet"}
# The paper numbers each figure once per dataset: Omniglot's odd, mini-ImageNet's the even one after it.
PAPER_FIGURES = {"backdoor": 1, "exp1": 3, "exp2": 5, "exp3": 7}
CAPTIONS = {
    "backdoor": "Backdoor attack",
    "exp1": "Benign meta-training after the attack (Experiment 1)",
    "exp2": "Benign fine-tuning after the attack (Experiment 2)",
    "exp3": "Benign fine-tuning of matching networks after the attack (Experiment 3)",
}


def paper_title(figure: str, dataset: str) -> str:
    """'Fig. 4: Benign meta-training after the attack (Experiment 1) on mini-ImageNet': the paper's number for
    this dataset, so a figure can be set beside the paper's own."""
    number = PAPER_FIGURES[figure] + (dataset == "miniimagenet")
    return f"Fig. {number}: {CAPTIONS[figure]} on {DATASET_NAMES[dataset]}"


def _save(fig: Any, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return path


def _show(ax: Any, img: torch.Tensor) -> None:
    """One uint8 [C, H, W] image: grey for one channel, in colour for three."""
    ax.imshow(img.permute(1, 2, 0).squeeze(-1).numpy(), cmap="gray", vmin=0, vmax=255)
    ax.set_xticks([])
    ax.set_yticks([])


def backdoor_examples(data: FederatedData, key: torch.Tensor, path: Path, dataset: str, per_row: int = 5) -> Path:
    """Figs. 1 and 2: (a) target class, (b) backdoor classes, (c) key, (d) attack training set."""
    rows = [
        ("(a) target", data.images[data.train_idx[data.target][:per_row]]),
        *((f"(b) backdoor {i + 1}", data.images[data.train_idx[c][:per_row]]) for i, c in enumerate(data.backdoor)),
        ("(c) key", key.unsqueeze(0)),
        ("(d) attack training", data.images[data.attack_train_idx[:per_row]]),
    ]
    fig, axes = plt.subplots(len(rows), per_row, figsize=(per_row * 1.1, len(rows) * 1.15))
    for r, (label, imgs) in enumerate(rows):
        for c in range(per_row):
            ax = axes[r][c]
            if c < len(imgs):
                _show(ax, imgs[c].to(torch.uint8))
            else:
                ax.axis("off")
        axes[r][0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
    fig.suptitle(paper_title("backdoor", dataset), fontsize=9)
    return _save(fig, path)


def _curves(ax: Any, rows: list[dict[str, Any]], x: str) -> None:
    xs = [r[x] for r in rows]
    for key, (label, colour) in SERIES.items():
        if key in rows[0]:
            ys = [100 * r[key] for r in rows]
            ci = [100 * r[f"{key}_ci95"] for r in rows]
            ax.plot(xs, ys, color=colour, label=label, marker=".")
            ax.fill_between(
                xs, [y - c for y, c in zip(ys, ci)], [y + c for y, c in zip(ys, ci)], color=colour, alpha=0.12
            )
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)


PAPER_MARK = {"marker": "*", "ms": 11, "mec": "black", "mew": 0.6, "ls": "none", "zorder": 5}  # the paper's value


def _paper_handles(*labels: str) -> list[Any]:
    """Legend entries for the paper's marks: a grey star per label, since each mark takes its series' colour."""
    from matplotlib.lines import Line2D

    return [Line2D([], [], color="0.6", label=label, **PAPER_MARK) for label in labels]


def meta_training_after_attack(
    rows: dict[str, list[dict[str, Any]]],
    path: Path,
    dataset: str,
    paper: dict[str, tuple[tuple[int, int], tuple[int, int]]],
    paper_rounds: int,
    subtitle: str,
) -> Path:
    """Figs. 3 and 4 (Experiment 1): one panel per scenario, accuracy against federated rounds. `paper` holds the
    paper's backdoor accuracy (train, val %) after the attack and after `paper_rounds` benign rounds, marked at round
    1 and at this run's last round; `subtitle` says the profile and horizon. The legend sits below the panels."""
    fig, axes = plt.subplots(1, len(rows), figsize=(4.2 * len(rows), 3.9), squeeze=False, layout="constrained")
    for ax, (name, series) in zip(axes[0], sorted(rows.items())):
        _curves(ax, series, "round")
        ax.axvline(1, color="red", ls=":", lw=1)
        (train, val), (train_end, val_end) = paper[name]
        last = series[-1]["round"]
        for key, at_attack, at_end in (("attack_train", train, train_end), ("attack_val", val, val_end)):
            ax.plot([1, last], [at_attack, at_end], color=SERIES[key][1], **PAPER_MARK)
        ax.set_title(SCENARIO_TITLES[name], fontsize=9)
        ax.set_xlabel("round (attack in round 1)")
    axes[0][0].set_ylabel("accuracy (%)")
    handles = [*axes[0][0].get_legend_handles_labels()[0]]
    handles += _paper_handles(f"paper: after the attack, and after {paper_rounds} rounds (at the last round)")
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=7, frameon=False)
    fig.suptitle(f"{paper_title('exp1', dataset)}\n{subtitle}", fontsize=10)
    return _save(fig, path)


def finetuning_grid(
    rows: dict[tuple[str, int], list[dict[str, Any]]],
    path: Path,
    figure: str,
    dataset: str,
    paper: dict[str, float | None],
    paper_steps: int,
    subtitle: str,
) -> Path:
    """Figs. 5-8 (Experiments 2-3, `figure` exp2 or exp3): rows = scenarios, columns = benign users, accuracy
    against fine-tuning steps. `paper` is the paper's backdoor level (attack training, %) per scenario after
    `paper_steps`, marked at this run's last step where the paper states one; `subtitle` says the profile and
    horizon."""
    scen = sorted({s for s, _ in rows})
    users = sorted({u for _, u in rows})
    fig, axes = plt.subplots(
        len(scen), len(users), figsize=(3.4 * len(users), 2.8 * len(scen) + 0.8), squeeze=False, layout="constrained"
    )
    for i, s in enumerate(scen):
        for j, u in enumerate(users):
            ax = axes[i][j]
            _curves(ax, rows[(s, u)], "step")
            level = paper.get(s)
            if level is not None:
                ax.plot([rows[(s, u)][-1]["step"]], [level], color=SERIES["attack_train"][1], **PAPER_MARK)
            ax.set_title(f"{SCENARIO_TITLES[s][:3]} user {u + 1}", fontsize=9)
            if i == len(scen) - 1:
                ax.set_xlabel("fine-tuning iteration")
        axes[i][0].set_ylabel("accuracy (%)")
    handles = axes[0][0].get_legend_handles_labels()[0] + _paper_handles(
        f"paper: attack training after {paper_steps} iterations (at the last one)"
    )
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=7, frameon=False)
    fig.suptitle(f"{paper_title(figure, dataset)}\n{subtitle}", fontsize=10)
    return _save(fig, path)


def pretraining(rows: list[dict[str, Any]], path: Path, title: str) -> Path:
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    _curves(ax, rows, "round")
    ax.set_xlabel("round")
    ax.set_ylabel("meta-test accuracy (%)")
    ax.set_title(title, fontsize=9)
    return _save(fig, path)


def server_defenses(
    curves: dict[tuple[str, str, bool, str, str], list[dict[str, Any]]], path: Path, dataset: str
) -> Path:
    """Experiment 4: per federation, backdoor accuracy (attack training) and meta-test accuracy against
    rounds, one line per rule; the adaptive attacker's runs dashed. Secure-aggregation runs are left out."""
    feds = sorted({k[3] for k in curves})
    scen = sorted({k[4] for k in curves})
    rules = sorted({k[1] for k in curves})
    colours = dict(zip(rules, plt.get_cmap("tab10").colors))
    fig, axes = plt.subplots(2 * len(feds), len(scen), figsize=(4.2 * len(scen), 2.9 * 2 * len(feds)), squeeze=False)
    for (attacker, rule, secure, fed, s), rows in sorted(curves.items()):
        if secure:
            continue
        i, j = 2 * feds.index(fed), scen.index(s)
        for row, key in ((i, "attack_train"), (i + 1, "meta_test")):
            ax = axes[row][j]
            ax.plot(
                [r["round"] for r in rows],
                [100 * r[key] for r in rows],
                color=colours[rule],
                ls="--" if attacker == "adaptive" else "-",
                marker=".",
                label=f"{rule}{' (adaptive)' if attacker == 'adaptive' else ''}",
            )
            ax.set_title(f"{fed}: {SERIES[key][0]}, {SCENARIO_TITLES[s][:3]}", fontsize=9)
            ax.set_ylim(-2, 102)
            ax.grid(alpha=0.3)
    for row in axes:
        row[0].set_ylabel("accuracy (%)")
    for ax in axes[-1]:
        ax.set_xlabel("round (attack in round 1)")
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.suptitle(
        f"Server-side rules against the one-shot attack (Experiment 4) on {DATASET_NAMES[dataset]}", fontsize=10
    )
    return _save(fig, path)


BANDED = ("attack_train", "attack_val", "meta_test")  # the three series of the paper's Figs. 3, 5 and 7


def across_seeds(curves: dict[str, list[list[dict[str, Any]]]], x: str, path: Path, figure: str, dataset: str) -> Path:
    """Figs. 3, 5 and 7 (4, 6, 8) over several seeds (`curves`: scenario → one curve per seed, on the same x):
    one panel per scenario, the mean over seeds as a line and their range as a band."""
    fig, axes = plt.subplots(1, len(curves), figsize=(4.2 * len(curves), 3.4), squeeze=False)
    for ax, (s, runs) in zip(axes[0], sorted(curves.items())):
        xs = [r[x] for r in runs[0]]
        for key in BANDED:
            label, colour = SERIES[key]
            at = [[100 * run[i][key] for run in runs] for i in range(len(xs))]
            ax.plot(xs, [sum(v) / len(v) for v in at], color=colour, label=label, marker=".")
            ax.fill_between(xs, [min(v) for v in at], [max(v) for v in at], color=colour, alpha=0.2, lw=0)
        if x == "round":
            ax.axvline(1, color="red", ls=":", lw=1)
        ax.set_title(SCENARIO_TITLES[s], fontsize=9)
        ax.set_xlabel("round (attack in round 1)" if x == "round" else "fine-tuning iteration")
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("accuracy (%)")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    n = len(next(iter(curves.values())))
    fig.suptitle(f"{paper_title(figure, dataset)}: mean and range over {n} seed{'s' * (n > 1)}", fontsize=10, y=1.04)
    return _save(fig, path)


def against_depth(
    series: dict[str, dict[str, list[tuple[float, float]]]],
    paper: dict[str, float],
    ylabel: str,
    path: Path,
    chance: float | None = None,
) -> Path:
    """One panel per scenario: a quantity against the attacker's episodes (log axis), one line per kind of
    attacker, with the paper's value marked at its own depth (50,000 episodes × 50 epochs) where it states one,
    and chance (1/N) where the quantity is an accuracy."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), sharey=True)
    styles = ["-o", "--s", ":^", "-.v", "-D", "--x"]
    for ax, s in zip(axes, sorted(SCENARIO_TITLES)):
        for style, (label, by_scenario) in zip(styles, series.items()):
            points = by_scenario.get(s, [])
            if points:
                ax.plot([x for x, _ in points], [100 * y for _, y in points], style, label=label, markersize=4)
        if chance is not None:
            ax.axhline(100 * chance, color="grey", linestyle=":", linewidth=1, label="chance (1/N)")
        if s in paper:
            ax.plot([50000], [100 * paper[s]], "r*", markersize=12, label="the paper (50,000 × 50)")
        ax.set_xscale("log")
        ax.set_title(SCENARIO_TITLES[s], fontsize=8)
        ax.set_xlabel("attacker's episodes")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"{ylabel.split('(')[0].strip()} (%)", fontsize=8)
    # below the panels, never over a point (bbox_inches="tight" keeps it in the file)
    handles, labels = axes[-1].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.06), ncol=3)
    fig.suptitle(f"Omniglot, profile long (quick's pretraining): {ylabel}", fontsize=9)
    return _save(fig, path)
