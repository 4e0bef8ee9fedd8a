"""The views a researcher compares runs in, on the tiny profile's reproduced copy: `dvc exp show` and
`dvc metrics show` read in a 200-column terminal, and `dvc plots show`'s page shows every figure offline."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from conftest import cli_env, sh

pytestmark = pytest.mark.pipeline
WIDTH = 200  # the terminal the README's commands are read in
# The README's command that compares experiments on the claims (metrics/summary.json)
COMPARE = "dvc exp show --only-changed --drop Created --keep '^[a-z]+\\.b?[abc]$'"


def shown(repo: Path, *cmd: str) -> str:
    """What `cmd` prints in a WIDTH-column terminal."""
    done = subprocess.run(cmd, cwd=repo, env=cli_env({"COLUMNS": str(WIDTH)}), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.fixture(scope="module")
def committed(tiny_repo: Path) -> Path:
    sh(tiny_repo, "git", "add", "-A")
    sh(tiny_repo, "git", "commit", "-qm", "tiny results", "--allow-empty")
    return tiny_repo


def claims(repo: Path) -> dict[str, float]:
    """metrics/summary.json's numbers by column name (`success.a`, ...)."""
    summary = json.loads((repo / "metrics/summary.json").read_text())
    return {f"{claim}.{s}": v for claim, per in summary.items() for s, v in per.items()}


def table(out: str) -> dict[str, str]:
    """The first row of a table DVC printed, by column name."""
    lines = [line for line in out.splitlines() if line.strip() and not line.strip().startswith("─")]
    return dict(zip(lines[0].split(), lines[1].split()))


def test_readmes_command_compares_the_claims_in_a_terminals_width(committed: Path) -> None:
    """Every claim in full, nothing cut to "…"; the default view also fits the width, but squeezed (the
    parameters are hundreds of columns)."""
    for cmd in (["dvc", "exp", "show", "--no-pager"], shlex.split(COMPARE) + ["--no-pager"]):
        out = shown(committed, *cmd)
        assert max(len(line) for line in out.splitlines()) <= WIDTH
    row = table(out)
    assert "…" not in out and list(row)[0] == "Experiment" and row["Experiment"] == "workspace"
    assert {k: float(v) for k, v in row.items() if k in claims(committed)} == claims(committed)
    assert set(row) == {"Experiment", *claims(committed)}  # one experiment: no parameter differs


def test_metrics_show_is_the_claims_only(committed: Path) -> None:
    out = shown(committed, "dvc", "metrics", "show")
    assert max(len(line) for line in out.splitlines()) <= WIDTH and "…" not in out
    row = table(out)
    assert row.pop("Path") == "metrics/summary.json" and len(out.strip().splitlines()) == 2
    assert {k: float(v) for k, v in row.items()} == claims(committed)


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium to open the page in")
def test_plots_page_shows_every_figure_without_a_network(committed: Path, tmp_path: Path) -> None:
    """Opened as a user's browser would, with every request off the machine refused: each plot is a figure the
    pipeline drew, so nothing on the page needs a script from the network."""
    sh(committed, "dvc", "plots", "show", "--out", str(tmp_path / "plots"))
    page = tmp_path / "plots" / "index.html"
    html = page.read_text()
    images = html.count("<img")
    assert images >= 6 and "vega-embed" not in html.split("<body", 1)[1]
    shot = tmp_path / "page.png"
    subprocess.run(
        [
            str(CHROMIUM),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--no-first-run",
            "--disable-sync",
            "--proxy-server=127.0.0.1:9",  # nothing listens there: every network request fails
            "--window-size=1400,2400",
            f"--screenshot={shot}",
            page.as_uri(),
        ],
        capture_output=True,
        timeout=120,
        check=True,
    )
    grey = Image.open(shot).convert("L")
    drawn = sum(grey.histogram()[:200]) / (grey.width * grey.height)  # pixels darker than the page's white
    assert drawn > 0.02, f"the page is blank ({drawn:.1%} drawn)"
