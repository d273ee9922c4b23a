"""The Typer application object; command modules attach themselves to it."""

import typer

app = typer.Typer(
    name="bats",
    help=(
        "BATS: Binary ArchitecTure Search (Bulat et al., ECCV 2020).\n\n"
        "Pipeline: search -> derive -> train (binary activations, real weights) -> binarize "
        "(binary weights too) -> eval; flops reports params / FLOPs / BOPs / OPs.\n\n"
        "Example: bats flops genotypes/bats_c10.json --dataset imagenet"
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
