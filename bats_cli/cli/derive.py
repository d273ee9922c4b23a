"""`bats derive`: genotype from a search checkpoint (DARTS rule), or a random one; cell plots."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any, Mapping, Optional

import typer

from bats_cli.cli.app import app
from bats_cli.cli.options import JsonOpt, console_text, emit_result
from bats_cli.errors import UserInputError


def _table(result: Mapping[str, Any]) -> Any:
    from rich.table import Table

    t = Table(show_header=False, box=None, pad_edge=False)
    t.add_column(style="bold")
    t.add_column(overflow="fold")
    g = result["genotype"]
    t.add_row("genotype", console_text(f"{g['name']} ({g['space']})" + (f" -> {result['output']}" if result.get("output") else "")))
    for cell in ("normal", "reduce"):
        t.add_row(cell, " ".join(f"{op}<{src}" for op, src in g[cell]))
    share = result["parameter_free_share"]
    t.add_row("parameter-free", f"normal {share['normal']:.2f}, reduce {share['reduce']:.2f}")
    if result.get("entropy_mean"):
        e = result["entropy_mean"]
        t.add_row("edge entropy", f"normal {e['normal']:.3f}, reduce {e['reduce']:.3f} nats (mean)")
    for key in ("plot", "dot"):
        if result.get(key):
            t.add_row(key, console_text(result[key]))
    return t


@app.command("derive")
def derive_command(
    checkpoint: Annotated[
        Optional[Path],
        typer.Argument(metavar="CHECKPOINT", help="A search checkpoint (.safetensors) or a search run directory."),
    ] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Write the genotype JSON here (default: print it).")] = None,
    max_skip: Annotated[Optional[int], typer.Option("--max-skip", min=0, metavar="N", help="Cap skip connections in the normal cell (P-DARTS); off by default.")] = None,
    name: Annotated[Optional[str], typer.Option("--name", help="Genotype name (default: the run's name).")] = None,
    random: Annotated[bool, typer.Option("--random", help="Sample a random valid genotype instead (Table 5 baseline).")] = False,
    seed: Annotated[int, typer.Option("--seed", min=0, help="Seed for --random.")] = 0,
    space: Annotated[str, typer.Option("--space", help="Space for --random: bats or darts.")] = "bats",
    nodes: Annotated[int, typer.Option("--nodes", min=1, help="Intermediate nodes for --random.")] = 4,
    plot: Annotated[Optional[Path], typer.Option("--plot", metavar="FILE.svg|FILE.png", help="Draw both cells (no graphviz needed).")] = None,
    dot: Annotated[Optional[Path], typer.Option("--dot", metavar="FILE.dot", help="Also write Graphviz DOT text.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite existing --output / --plot / --dot files.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Derive a genotype: the DARTS rule on a search checkpoint's softmax(alpha/T), or --random.

    Uses the checkpoint's own temperatures and per-edge candidate lists; nothing else is needed.

    Example: bats derive runs/search-tiny/last.safetensors -o mine.json --plot mine.svg

    Example: bats derive --random --seed 3 --space bats -o random3.json
    """
    from bats_cli.derive import (
        derive_from_checkpoint,
        edge_entropy,
        load_arch_snapshot,
        parameter_free_share,
        random_genotype,
    )

    if random and checkpoint is not None:
        raise UserInputError("give either a CHECKPOINT or --random, not both")
    if not random and checkpoint is None:
        raise UserInputError("give a search CHECKPOINT (or run directory), or --random")
    if plot is not None and plot.suffix.lower() not in (".svg", ".png"):
        raise UserInputError(f"--plot {plot}: choose a .svg or .png file name")
    from bats_cli.outputs import check_distinct, check_output_file

    inputs = [checkpoint, checkpoint / "last.safetensors"] if checkpoint is not None else []
    check_distinct({"--output": output, "--plot": plot, "--dot": dot})
    for flag, path in (("--output", output), ("--plot", plot), ("--dot", dot)):
        if path is not None:
            check_output_file(path, flag=flag, force=force, inputs=inputs)
    entropy = None
    if random:
        g = random_genotype(space, seed, nodes, name=name)
    else:
        g = derive_from_checkpoint(checkpoint, max_skip=max_skip, name=name)
        snap = load_arch_snapshot(checkpoint)
        entropy = {
            "normal": float(edge_entropy(snap.weights("normal")).mean()),
            "reduce": float(edge_entropy(snap.weights("reduce")).mean()),
        }
    result: dict[str, Any] = {
        "genotype": g.to_dict(),
        "output": str(output) if output is not None else None,
        "parameter_free_share": parameter_free_share(g),
        "entropy_mean": entropy,
    }
    if output is not None:
        g.save(output)
    if plot is not None:
        from bats_cli.plot import save_plot

        result["plot"] = str(save_plot(g, plot))
    if dot is not None:
        from bats_cli.plot import save_dot

        result["dot"] = str(save_dot(g, dot))
    if as_json:
        emit_result(result, as_json=True)
    elif output is None:
        sys.stdout.write(g.to_json())
    else:
        emit_result(result, as_json=False, table_fn=_table)
