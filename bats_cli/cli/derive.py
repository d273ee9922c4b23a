"""`bats derive`: genotype from a search checkpoint (DARTS rule), or a random one; cell plots."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any, Mapping, Optional

import typer

from bats_cli.cli.app import app
from bats_cli.cli.options import (
    DataDirOpt,
    DatasetOpt,
    ForceOpt,
    JsonOpt,
    QuietOpt,
    SeedOpt,
    ThreadsOpt,
    opt,
    output_option,
    preset_option,
)
from bats_cli.cli.output import console_text, emit_result
from bats_cli.core.errors import UserInputError
from bats_cli.core.presets import TRAIN_PRESETS


def _table(result: Mapping[str, Any]) -> Any:
    from rich.table import Table

    t = Table(show_header=False, box=None, pad_edge=False)
    t.add_column(style="bold")
    t.add_column(overflow="fold")
    g = result["genotype"]
    written = f" -> {result['output']}" if result.get("output") else ""
    t.add_row("genotype", console_text(f"{g['name']} ({g['space']}){written}"))
    for cell in ("normal", "reduce"):
        t.add_row(cell, " ".join(f"{op}<{src}" for op, src in g[cell]))
    share = result["parameter_free_share"]
    t.add_row("parameter-free", f"normal {share['normal']:.2f}, reduce {share['reduce']:.2f}")
    if result.get("entropy_mean"):
        e = result["entropy_mean"]
        t.add_row("edge entropy", f"normal {e['normal']:.3f}, reduce {e['reduce']:.3f} nats (mean)")
    if result.get("draws"):
        t.add_row("size", console_text(_match_line(result)))
    if result.get("selection"):
        sel = result["selection"]
        t.add_row("selection", f"perturbation: supernet {100 * sel['supernet_accuracy']:.2f} % on "
                               f"{sel['images']} held-out training images, {sel['evaluations']} evaluations")
    for key in ("plot", "dot"):
        if result.get(key):
            t.add_row(key, console_text(result[key]))
    return t


MAX_TOLERANCE = 10.0
MAX_DRAWS = 100_000
MAX_PERTURB_IMAGES = 1_000_000

_SELECT = "Selection (--select perturbation)"
_MATCH = "Matched random cells (--random --match)"
GenotypeOutputOpt = output_option("Write the genotype JSON here (default: print it).")
MatchPresetOpt = preset_option(
    TRAIN_PRESETS, panel=_MATCH,
    lead="With --match: count both in the network `bats train --preset NAME` builds (default cpu).")


@app.command("derive")
def derive_command(
    ctx: typer.Context,
    checkpoint: Annotated[
        Optional[Path],
        typer.Argument(metavar="CHECKPOINT", help="A search checkpoint (.safetensors) or a search run directory."),
    ] = None,
    output: GenotypeOutputOpt = None,
    max_skip: Annotated[Optional[int], typer.Option(
        "--max-skip", min=0, metavar="N",
        help="Cap skip connections in the normal cell (P-DARTS; --select alpha); off by default.")] = None,
    name: Annotated[Optional[str], typer.Option("--name", help="Genotype name (default: the run's name).")] = None,
    select: Annotated[
        str,
        opt("--select", panel=_SELECT, metavar="alpha|perturbation",
            help="alpha: the DARTS rule on softmax(alpha/T). perturbation: per edge the op whose "
                 "removal lowers the supernet's accuracy most, per node the two inputs likewise "
                 "(Wang et al., ICLR 2021; no fine-tuning), on held-out training images."),
    ] = "alpha",
    perturb_images: Annotated[
        Optional[int],
        opt("--perturb-images", panel=_SELECT, min=1, metavar="N",
            help="Images of the search's architecture half to measure on (default: 512)."),
    ] = None,
    perturb_mode: Annotated[
        Optional[str],
        opt("--perturb-mode", panel=_SELECT, metavar="progressive|independent",
            help="progressive (default): edges in seeded random order, each replaced by its op "
                 "before the next (Wang et al. without fine-tuning); independent: every edge and "
                 "node scored on the unchanged supernet."),
    ] = None,
    dataset: DatasetOpt = None,
    data_dir: DataDirOpt = None,
    device: Annotated[
        Optional[str],
        opt("--device", panel=_SELECT, metavar="auto|cpu|cuda[:N]", help="Where the supernet runs (default: cpu)."),
    ] = None,
    quiet: QuietOpt = False,
    threads: ThreadsOpt = None,
    random: Annotated[bool, typer.Option(
        "--random",
        help="Sample a random valid genotype instead (Table 5 baseline).")] = False,
    seed: SeedOpt = None,
    space: Annotated[Optional[str], typer.Option(
        "--space",
        help="Space for --random: bats (default) or darts; with --match, the genotype's.")] = None,
    nodes: Annotated[Optional[int], typer.Option(
        "--nodes", min=1,
        help="Intermediate nodes for --random (default 4; with --match, the genotype's).")] = None,
    match: Annotated[
        Optional[str],
        opt("--match", panel=_MATCH, metavar="GENOTYPE",
            help="Draw random cells until the network's size is within --tolerance of this "
                 "genotype's (a .json or a bundled name), in the same network."),
    ] = None,
    match_by: Annotated[Optional[str], opt(
        "--match-by", panel=_MATCH, metavar="params|ops",
        help="What to match: parameters (default) or OPs = FLOPs + BOPs/64.")] = None,
    tolerance: Annotated[Optional[float], opt(
        "--tolerance", panel=_MATCH, min=0.0, metavar="FRACTION",
        help="Relative tolerance (default 0.1: within 10 %).")] = None,
    max_draws: Annotated[Optional[int], opt(
        "--max-draws", panel=_MATCH, min=1, metavar="N",
        help="Give up after N draws (default 10000).")] = None,
    preset: MatchPresetOpt = None,
    layers: Annotated[Optional[int], opt(
        "--layers", panel=_MATCH, min=1, metavar="N",
        help="Cells of that network (instead of the preset's).")] = None,
    channels: Annotated[Optional[int], opt(
        "--channels", panel=_MATCH, min=1, metavar="C",
        help="Initial channels of that network (instead of the preset's).")] = None,
    plot: Annotated[Optional[Path], typer.Option(
        "--plot", metavar="FILE.svg|FILE.png",
        help="Draw both cells (no graphviz needed).")] = None,
    dot: Annotated[Optional[Path], typer.Option(
        "--dot", metavar="FILE.dot",
        help="Also write Graphviz DOT text.")] = None,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Derive a genotype: the DARTS rule on a search checkpoint's softmax(alpha/T), perturbation-based
    selection on its supernet (--select perturbation), or --random (optionally --match'ed in size).

    The DARTS rule uses the checkpoint's own temperatures and per-edge candidate lists; nothing else
    is needed. --select perturbation also reads the search's training images.

    Example: bats derive runs/search-tiny/last.safetensors -o mine.json --plot mine.svg

    Example: bats derive runs/search-cpu --select perturbation -o perturbed.json

    Example: bats derive --random --seed 3 --space bats -o random3.json

    Example: bats derive --random --seed 3 --match bats_c10 --match-by params --json
    """
    import math

    from bats_cli.nas.derive import (
        derive_from_checkpoint,
        edge_entropy,
        load_arch_snapshot,
        parameter_free_share,
    )
    from bats_cli.nas.random_genotypes import random_genotype

    # Bounds the flags' own types do not say: NaN passes every comparison, and a draw or an
    # image more is time; each of these would otherwise run for hours (or for ever).
    if tolerance is not None and not (math.isfinite(tolerance) and tolerance <= MAX_TOLERANCE):
        raise UserInputError(f"--tolerance {tolerance}: give a fraction from 0 to {MAX_TOLERANCE:g}")
    if max_draws is not None and max_draws > MAX_DRAWS:
        raise UserInputError(f"--max-draws {max_draws}: at most {MAX_DRAWS:,}")
    if perturb_images is not None and perturb_images > MAX_PERTURB_IMAGES:
        raise UserInputError(f"--perturb-images {perturb_images}: at most {MAX_PERTURB_IMAGES:,}")
    if random and checkpoint is not None:
        raise UserInputError("give either a CHECKPOINT or --random, not both")
    if not random and checkpoint is None:
        raise UserInputError("give a search CHECKPOINT (or run directory), or --random")
    if select not in ("alpha", "perturbation"):
        raise UserInputError(f"--select {select!r}: choose alpha or perturbation")
    if perturb_mode is not None and perturb_mode not in ("progressive", "independent"):
        raise UserInputError(f"--perturb-mode {perturb_mode!r}: choose progressive or independent")
    seed = 0 if seed is None else seed
    if _from_environment(ctx, "data_dir"):
        data_dir = None  # BATS_DATA_DIR serves the commands that read images; only a flag asks for them here
    _only_with("--select perturbation", select == "perturbation" and not random, {
        "--perturb-images": perturb_images, "--perturb-mode": perturb_mode, "--dataset": dataset,
        "--data-dir": data_dir, "--device": device})
    if random and select != "alpha":
        raise UserInputError("--select applies to a search CHECKPOINT, not to --random")
    if select == "perturbation" and max_skip is not None:
        raise UserInputError("--max-skip applies to --select alpha only")
    _only_with("--match", match is not None, {
        "--match-by": match_by, "--tolerance": tolerance, "--max-draws": max_draws,
        "--preset": preset, "--layers": layers, "--channels": channels})
    if match is not None and not random:
        raise UserInputError("--match draws random cells: add --random")
    if match_by is not None and match_by not in ("params", "ops"):
        raise UserInputError(f"--match-by {match_by!r}: choose params or ops")
    if plot is not None and plot.suffix.lower() not in (".svg", ".png"):
        raise UserInputError(f"--plot {plot}: choose a .svg or .png file name")
    from bats_cli.utils.outputs import check_distinct, check_output_file

    inputs = [checkpoint, checkpoint / "last.safetensors"] if checkpoint is not None else []
    check_distinct({"--output": output, "--plot": plot, "--dot": dot})
    for flag, path in (("--output", output), ("--plot", plot), ("--dot", dot)):
        if path is not None:
            check_output_file(path, flag=flag, force=force, inputs=inputs)
    entropy = None
    extra: dict[str, Any] = {}
    if random and match is not None:
        from bats_cli.core.zoo import resolve_genotype
        from bats_cli.nas.random_genotypes import (
            DEFAULT_MATCH_PRESET,
            DEFAULT_MAX_DRAWS,
            DEFAULT_TOLERANCE,
            match_network,
            matched_random_genotype,
        )

        target = resolve_genotype(match)
        if space is not None and space != target.space:
            raise UserInputError(f"--space {space}: --match {target.name} is a {target.space}-space genotype")
        if nodes is not None and nodes != len(target.normal) // 2:
            raise UserInputError(f"--nodes {nodes}: --match {target.name} has {len(target.normal) // 2} nodes")
        network = match_network(preset or DEFAULT_MATCH_PRESET, layers=layers, channels=channels)
        matched = _with_threads(
            threads, matched_random_genotype, target, seed, by=match_by or "params",
            tolerance=DEFAULT_TOLERANCE if tolerance is None else tolerance,
            max_draws=max_draws or DEFAULT_MAX_DRAWS, network=network, name=name,
        )
        g = matched.genotype
        extra.update(matched.to_dict())
    elif random:
        g = random_genotype(space or "bats", seed, 4 if nodes is None else nodes, name=name)
    elif select == "perturbation":
        from bats_cli.nas.selection import DEFAULT_IMAGES, derive_by_perturbation
        from bats_cli.utils.progress import Reporter

        reporter = Reporter(quiet=quiet)
        picked = _with_threads(
            threads, derive_by_perturbation, checkpoint, images=perturb_images or DEFAULT_IMAGES,
            seed=seed, dataset=dataset, data_dir=data_dir, device=device or "cpu",
            progressive=perturb_mode != "independent", name=name, progress=reporter.line,
        )
        g = picked.genotype
        extra["selection"] = picked.to_dict()
    else:
        g = derive_from_checkpoint(checkpoint, max_skip=max_skip, name=name)
    if not random:
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
        **extra,
    }
    if output is not None:
        g.save(output)
    if plot is not None:
        from bats_cli.studies.plot import save_plot

        result["plot"] = str(save_plot(g, plot))
    if dot is not None:
        from bats_cli.studies.plot import save_dot

        result["dot"] = str(save_dot(g, dot))
    if as_json:
        emit_result(result, as_json=True)
    elif output is None:
        if "draws" in result:
            print(_match_line(result), file=sys.stderr)
        sys.stdout.write(g.to_json())
    else:
        emit_result(result, as_json=False, table_fn=_table)


def _with_threads(threads: int | None, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` on ``threads`` CPU threads; torch's count is restored after."""
    from bats_cli.training.runloop import restores_threads, set_threads

    @restores_threads
    def run() -> Any:
        set_threads(threads)
        return fn(*args, **kwargs)

    return run()


def _from_environment(ctx: typer.Context, name: str) -> bool:
    """True when option ``name`` took its value from an environment variable, not the command line."""
    source = ctx.get_parameter_source(name)
    return source is not None and source.name == "ENVIRONMENT"


def _only_with(needs: str, ok: bool, given: Mapping[str, Any]) -> None:
    """One line naming the options given that only mean something with ``needs``."""
    stray = [flag for flag, value in given.items() if value is not None]
    if stray and not ok:
        raise UserInputError(f"{', '.join(stray)} only with {needs}")


def _match_line(m: Mapping[str, Any]) -> str:
    return (f"matched {m['target_genotype']} by {m['match_by']}: {m['value']:.6g} vs {m['target']:.6g} "
            f"({100 * (m['ratio'] - 1):+.1f} %, tolerance ±{100 * m['tolerance']:g} %) after {m['draws']} draw(s)")
