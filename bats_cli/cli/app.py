"""The Typer application object; command modules attach themselves to it."""

from typing import Annotated

import typer

# -h works wherever --help does (every command and sub-command inherits this).
CONTEXT = {"help_option_names": ["-h", "--help"]}

app = typer.Typer(
    name="bats",
    help=(
        "BATS: Binary ArchitecTure Search (Bulat et al., ECCV 2020).\n\n"
        "Pipeline: search -> derive -> train (binary activations, real weights) -> binarize "
        "(binary weights too) -> eval; flops reports params / FLOPs / BOPs / OPs; report plots "
        "runs.\n\n"
        "Example: bats flops genotypes/bats_c10.json --dataset imagenet"
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings=CONTEXT,
)


def _print_version(value: bool) -> None:
    if value:
        from bats_cli import __version__

        print(f"bats {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", "-V", callback=_print_version, is_eager=True,
                     help="Print the version and exit."),
    ] = False,
) -> None:
    """BATS: Binary ArchitecTure Search (Bulat et al., ECCV 2020)."""
