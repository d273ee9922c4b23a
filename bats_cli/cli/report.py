"""`bats report RUN_DIR...`: PNG + self-contained HTML of runs, and a comparison table."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Mapping, Optional

import typer

from bats_cli.cli.app import app
from bats_cli.cli.options import OUTPUT, ForceOpt, JsonOpt
from bats_cli.cli.output import emit_result, key_value_table


def result_table(result: Mapping[str, Any]) -> Any:
    rows = [("png", result["png"]), ("html", result["html"]),
            ("panels", ", ".join(result["panels"]))]
    for row in result["comparison"]:
        acc = "-" if row["accuracy"] is None else f"{row['accuracy']:.2f} %"
        params = "-" if row["params"] is None else f"{row['params']:,} params"
        secs = "-" if row["seconds"] is None else f"{row['seconds']:.0f} s"
        rows.append((row["run"], f"{row['kind']}, top-1 {acc}, {params}, {secs}"))
    return key_value_table(rows, fold=True)


@app.command("report")
def report_command(
    runs: Annotated[
        list[Path],
        typer.Argument(metavar="RUN_DIR...", help="Run directories of bats search / train / binarize."),
    ],
    out: Annotated[
        Optional[Path],
        typer.Option("--out", file_okay=False, rich_help_panel=OUTPUT,
                     help="Where report.png and report.html go. Default: the run directory "
                          "(one run) or ./report (several)."),
    ] = None,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Plot runs: loss and top-1 curves; for a search also softmax(alpha/T) per edge over the
    epochs (the paper's Fig. 1 and 2), entropy, parameter-free share and the derived cell.

    Several run directories add one comparison table: top-1, parameters, FLOPs, BOPs, OPs, time.

    Needs matplotlib: pip install 'bats\\[report]'.

    Example: bats report runs/search-tiny runs/train-tiny --out runs/report
    """
    from bats_cli.studies.report import write_report

    target = out if out is not None else (runs[0] if len(runs) == 1 else Path("report"))
    emit_result(write_report(runs, out=target, force=force), as_json=as_json, table_fn=result_table)
