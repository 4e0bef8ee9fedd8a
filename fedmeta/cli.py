"""`fedmeta`: one command per DVC stage, plus the benchmark."""
from __future__ import annotations

import os
import sys
from enum import Enum
from typing import Annotated

import typer

from fedmeta.errors import FedmetaError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Backdoor attacks and defenses in federated meta-learning.")
_state = {"debug": False}


class Variant(str, Enum):
    exclude = "exclude"
    include = "include"


VariantArg = Annotated[Variant, typer.Argument(help="Benign pretraining without (exclude, scenario a) or with (include, b/c) backdoor classes.")]


@app.callback()
def _main(debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks.")] = False) -> None:
    _state["debug"] = debug


@app.command()
def prepare() -> None:
    """Read the dataset, split it among users, stamp the backdoor key."""
    from stages import prepare as stage

    stage.main()


@app.command()
def pretrain(variant: VariantArg) -> None:
    """Benign federated Reptile pretraining (round 0)."""
    from stages import pretrain as stage

    stage.main(variant.value)


@app.command()
def attack(variant: VariantArg) -> None:
    """The one-shot boosted backdoor attack (round 1)."""
    from stages import attack as stage

    stage.main(variant.value)


@app.command(name="continue")
def continue_(variant: VariantArg) -> None:
    """Experiment 1: benign federated meta-training after the attack."""
    from stages import continue_training as stage

    stage.main(variant.value)


@app.command()
def finetune(variant: VariantArg) -> None:
    """Experiment 2: long benign fine-tuning by each benign user."""
    from stages import finetune as stage

    stage.main(variant.value)


@app.command()
def defend(variant: VariantArg) -> None:
    """Experiment 3: the matching-network defense at each benign user."""
    from stages import defend as stage

    stage.main(variant.value)


@app.command()
def ablation() -> None:
    """The defense with each element removed in turn."""
    from stages import ablation as stage

    stage.main()


@app.command()
def report() -> None:
    """Figures 3, 5, 7 and the paper-vs-reproduction tables."""
    from stages import report as stage

    stage.main()


def main() -> None:
    """Entry point: a FedmetaError becomes one line on stderr and exit code 2 (a traceback with --debug)."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    try:
        app(standalone_mode=True)
    except FedmetaError as err:
        if _state["debug"]:
            raise
        typer.echo(f"error: {err}", err=True)
        sys.exit(2)
