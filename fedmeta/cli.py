"""`fedmeta`: one command per DVC stage, plus the benchmark, one-checkpoint meta-tests, the summary across seeds
and a user machine's node of a federation across machines."""

from __future__ import annotations

import importlib
import os
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from fedmeta.errors import FedmetaError

# Plain tracebacks (an unexpected error, or --debug): their last line is the exception and its message, where rich's
# boxed ones end in a box-drawing line
app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Backdoor attacks and defenses in federated meta-learning.",
)
_state = {"debug": False}


class Variant(str, Enum):
    exclude = "exclude"
    include = "include"


VariantArg = Annotated[
    Variant,
    typer.Argument(help="Benign pretraining without (exclude, scenario a) or with (include, b/c) backdoor classes."),
]


@app.callback()
def _main(debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks.")] = False) -> None:
    _state["debug"] = debug


def _stage(module: str, *args: str) -> None:
    """Run stages.<module>. MLflow's logging process starts first, so that it loads beside torch (fedmeta.tracking)."""
    from fedmeta import tracking

    tracking.logging_process()
    importlib.import_module(f"stages.{module}").main(*args)


@app.command()
def prepare() -> None:
    """Read the dataset, split it among users, stamp the backdoor key."""
    _stage("prepare")


@app.command()
def pretrain(variant: VariantArg) -> None:
    """Benign federated Reptile pretraining (round 0)."""
    _stage("pretrain", variant.value)


@app.command()
def attack(variant: VariantArg) -> None:
    """The one-shot boosted backdoor attack (round 1)."""
    _stage("attack", variant.value)


@app.command(name="continue")
def continue_(variant: VariantArg) -> None:
    """Experiment 1: benign federated meta-training after the attack."""
    _stage("continue_training", variant.value)


@app.command()
def finetune(variant: VariantArg) -> None:
    """Experiment 2: long benign fine-tuning by each benign user."""
    _stage("finetune", variant.value)


@app.command()
def defend(variant: VariantArg) -> None:
    """Experiment 3: the matching-network defense at each benign user."""
    _stage("defend", variant.value)


@app.command()
def positions(variant: VariantArg) -> None:
    """Backdoor accuracy with the target at each output of the user's episodes, and at a random one."""
    _stage("positions", variant.value)


@app.command()
def heads(variant: VariantArg) -> None:
    """The user's own classifier head (evaluation.head: shared, zero, prototype) as a defense."""
    _stage("heads", variant.value)


@app.command()
def ablation() -> None:
    """The defense with each element removed in turn."""
    _stage("ablation")


@app.command()
def exp4(
    variant: VariantArg,
    federation: Annotated[
        str, typer.Argument(help="A federation under experiment4.federations in params.yaml, e.g. m4 or m20.")
    ],
) -> None:
    """Experiment 4: every server-side rule against the one-shot attack on one federation, then benign rounds."""
    _stage("exp4", variant.value, federation)


@app.command()
def node(
    user: Annotated[int, typer.Argument(help="The user this machine serves: 0 to federation.users - 1.")],
    auth_key: Annotated[
        Path | None,
        typer.Option(help="The SuperNode's private key (ECDSA, OpenSSH format) when the SuperLink authenticates."),
    ] = None,
) -> None:
    """One user's worker and SuperNode for the SuperLink named by federation.flower.superlink, until Ctrl-C."""
    from fedmeta.engine import node as stage

    stage.main(user, auth_key)


@app.command()
def report() -> None:
    """Figures 3, 5, 7 and the paper-vs-reproduction tables."""
    _stage("report")


@app.command(name="exp4-report")
def exp4_report() -> None:
    """Experiment 4's figure and tables, from its stages' files."""
    _stage("exp4_report")


@app.command()
def seeds(
    out: Annotated[Path, typer.Argument(help="Folder of the summary, e.g. metrics/seeds/quick.")],
    exp: Annotated[
        list[str] | None, typer.Option("--exp", help="A DVC experiment to include, by name (repeatable).")
    ] = None,
    workspace: Annotated[bool, typer.Option(help="Include the workspace's own run.")] = True,
) -> None:
    """The paper's claims across seeds: copy runs that differ only in `seed` into OUT/seed_<seed>/ (replacing
    those seeds, keeping the others), then write OUT/report.md, summary.json and Figs. 3, 5, 7 with bands over
    every seed there. With --no-workspace and no --exp, only redraws."""
    from fedmeta import seed_runs
    from fedmeta import seeds as stage

    sources = [("the workspace", None)] if workspace else []
    sources += [(f"--exp {name}", seed_runs.experiment_ref(Path.cwd(), name)) for name in exp or []]
    if sources:
        seed_runs.collect(Path.cwd(), sources, out)
    for path in stage.write(out):
        print(path)


@app.command()
def depth(
    out: Annotated[Path, typer.Argument(help="Folder of the sweep, e.g. metrics/depth.")],
    run: Annotated[
        list[str] | None,
        typer.Option("--run", help="A run of scripts/depth.sh to collect, e.g. 50000x2 (repeatable; default: all)."),
    ] = None,
    collect: Annotated[bool, typer.Option(help="Collect finished DVC experiments first; --no-collect redraws.")] = True,
) -> None:
    """The attacker's depth sweep: copy the finished depth-<run> experiments into OUT/<run>/, then write
    OUT/report.md and its figures (docs/depth.md)."""
    from fedmeta import depth as stage

    if collect:
        stage.collect(Path.cwd(), out, [stage.run_label(r) for r in run or []])
    for path in stage.write(out):
        print(path)


class LearnerName(str, Enum):
    finetune = "finetune"
    defense = "defense"


@app.command(name="meta-test")
def meta_test(
    checkpoint: Annotated[Path, typer.Argument(help="A model checkpoint, e.g. checkpoints/attacked_include.pt.")],
    learner: Annotated[
        LearnerName, typer.Option(help="Fine-tuning (Experiment 2) or the matching-network defense (Experiment 3).")
    ] = LearnerName.finetune,
    episodes: Annotated[
        int, typer.Option(min=2, help="Meta-test episodes (2 at least, for an interval); the pipeline's 40 come first.")
    ] = 400,
    out: Annotated[Path | None, typer.Option(help="Also write the curve as JSON here.")] = None,
) -> None:
    """Meta-test accuracy of one checkpoint over many episodes: the pipeline's estimate with a tighter interval."""
    from fedmeta import metatest as stage

    stage.main(checkpoint, learner.value, episodes, out)


class Dataset(str, Enum):
    omniglot = "omniglot"
    miniimagenet = "miniimagenet"


@app.command()
def bench(
    device: Annotated[str, typer.Option(help="Where to run: cpu or cuda[:N].")] = "cpu",
    dataset: Annotated[
        Dataset,
        typer.Option(help="Image shape and training shots: omniglot 28×28×1, 10-shot; miniimagenet 84×84×3, 15-shot."),
    ] = Dataset.omniglot,
    repeats: Annotated[int, typer.Option(min=1, help="Timed runs of each side (medians are reported).")] = 3,
    out: Annotated[Path, typer.Option(help="Where to write the JSON result.")] = Path("docs/performance/bench.json"),
    threads: Annotated[int, typer.Option(min=0, help="torch intra-op threads (0: torch's default).")] = 0,
    width: Annotated[int, typer.Option(min=1, help="Conv4 filters (paper: 64).")] = 64,
    inner_steps: Annotated[int, typer.Option(min=1, help="Meta-training inner steps e.")] = 10,
    meta_batches: Annotated[
        int, typer.Option(min=1, help="Meta-batches of B = 5 episodes per timed meta-training run.")
    ] = 4,
    eval_steps: Annotated[int, typer.Option(min=1, help="Fine-tuning steps per evaluation episode.")] = 50,
    eval_episodes: Annotated[int, typer.Option(min=1, help="Episodes the project fine-tunes at once.")] = 40,
    naive_eval_episodes: Annotated[int, typer.Option(min=1, help="Episodes per timed naive evaluation run.")] = 8,
    memory: Annotated[bool, typer.Option(help="Measure peak RSS, one fresh process per phase.")] = True,
) -> None:
    """Benchmark: meta-training and evaluation throughput against the naive per-episode loop."""
    from fedmeta.tools import bench as stage

    settings = stage.Settings(
        **stage.DATASETS[dataset.value],
        device=device,
        threads=threads,
        repeats=repeats,
        width=width,
        inner_steps=inner_steps,
        meta_batches=meta_batches,
        eval_steps=eval_steps,
        eval_episodes=eval_episodes,
        naive_eval_episodes=naive_eval_episodes,
        memory=memory,
    )
    stage.main(settings, out)


def main() -> None:
    """Entry point: a FedmetaError, or an OSError (a path that cannot be read or written: the
    machine, not the code), becomes one line on stderr and exit code 2 (a traceback with --debug)."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    try:
        app(standalone_mode=True)
    except (FedmetaError, OSError) as err:
        if _state["debug"]:
            raise
        typer.echo(f"error: {_one_line(err)}", err=True)
        sys.exit(2)


def _one_line(err: Exception) -> str:
    if isinstance(err, OSError) and err.filename is not None:
        return f"{err.filename}: {err.strerror}"
    return str(err)
