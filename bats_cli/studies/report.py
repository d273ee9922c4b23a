"""`bats report`: plots of finished (or running) runs, as a PNG and a self-contained HTML page.

Everything is read from what the long commands already write into a run directory:
``metrics.csv`` (training / validation curves; search entropy and parameter-free share),
``alphas/stageK_epochNN.json`` (softmax(α/T) of every edge after every epoch, the data of the
paper's Fig. 1 and 2), ``genotype.json`` (the derived cell, drawn by :mod:`bats_cli.studies.plot`),
``config.json`` and ``result.json``. Several run directories add a comparison table (accuracy,
parameters, FLOPs / BOPs / OPs counted by :mod:`bats_cli.models.counting`, time).

matplotlib is an optional extra (``pip install 'bats[report]'``).

    manifest = write_report([Path("runs/search-tiny")], out=Path("report"))
    manifest["panels"]  # ["search-tiny/loss", "search-tiny/alpha-normal", ...]
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

from bats_cli.core.errors import UserInputError
from bats_cli.studies.report_panels import Panel, figure_png, run_panels
from bats_cli.studies.report_run import Run, read_run

EXTRA_HINT = ("bats report needs matplotlib: pip install -e '.[report]' in the clone (bats[report]), "
              "or pip install matplotlib")


def require_matplotlib():
    """The pyplot module on the Agg backend, or UserInputError naming the extra."""
    try:
        import matplotlib
    except ImportError:
        raise UserInputError(EXTRA_HINT) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# --------------------------------------------------------------------------- comparison


def run_summary(run: Run) -> dict[str, Any]:
    """One row of the comparison table: accuracy, parameters, FLOPs / BOPs / OPs, time."""
    last = run.rows[-1]
    if run.kind == "search":
        accuracy = last.get("arch_acc")
        accuracy_name = "architecture-half top-1 (last epoch)"
    else:
        accuracy = max((r["val_top1"] for r in run.rows if isinstance(r.get("val_top1"), (int, float))),
                       default=None)
        accuracy_name = "best validation top-1"
    row: dict[str, Any] = {
        "run": run.name, "kind": run.kind, "epochs": len(run.rows),
        # A cell of metrics.csv may hold text: only numbers reach the table's number formats.
        "accuracy": _num(accuracy), "accuracy_is": accuracy_name,
        "seconds": _num(last.get("seconds")),
        "genotype": run.genotype.name if run.genotype is not None else _fixed_model(run),
    }
    row.update(_costs(run))
    return row


def _num(value: Any) -> float | int | None:
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _fixed_model(run: Run) -> str | None:
    """The fixed model (resnet18) a train / binarize run trained: it has no genotype."""
    from bats_cli.models.registry import model_of

    settings = run.record.get("network")
    if run.kind == "search" or not isinstance(settings, dict) or model_of(settings).genotype:
        return None
    return model_of(settings).name


def _costs(run: Run) -> dict[str, Any]:
    """Inference cost (auxiliary head excluded, as `bats flops`) of the run's network; for a
    search, of its derived cell in the default CIFAR-10 network (what `bats flops` counts)."""
    settings = run.record.get("network") if run.kind != "search" else None
    if run.genotype is None and _fixed_model(run) is None:
        return {"params": None, "flops": None, "bops": None, "ops": None, "network": None}
    from bats_cli.models.counting import count_model
    from bats_cli.models.networks import build_network

    if isinstance(settings, dict):
        from bats_cli.models.modelio import network_label, rebuild

        model = rebuild(run.genotype, {**settings, "auxiliary": False}, run.path / "config.json")
        size = int(settings.get("image_size") or (32 if settings.get("kind") == "cifar" else 224))
        input_size = (int(settings["in_channels"]), size, size)
        network = network_label(settings)
    else:
        model = build_network(run.genotype, kind="cifar", num_classes=10, in_channels=3, auxiliary=False)
        input_size = (3, 32, 32)
        network = "CIFAR-10 network (20 cells, C=36)"
    cost = count_model(model, input_size).summary()
    return {"params": cost["num_params"], "flops": cost["flops"], "bops": cost["bops"],
            "ops": cost["ops"], "network": network}


# --------------------------------------------------------------------------- writing


def _table_png(plt, table: list[dict[str, Any]]) -> bytes:
    """The comparison table as a picture (the same rows as the HTML's), with its footnote."""
    header = [h for _, h, _ in COMPARISON_COLUMNS]
    cells = [[html.unescape(_fmt(row.get(k), kind)) for k, _, kind in COMPARISON_COLUMNS] for row in table]
    fig, ax = plt.subplots(figsize=(13, 0.25 * (len(cells) + 1)))
    ax.axis("off")
    t = ax.table(cellText=cells, colLabels=header, loc="center", cellLoc="right", colLoc="right",
                 bbox=(0, 0, 1, 1))
    t.auto_set_font_size(False)
    t.set_fontsize(9)
    t.auto_set_column_width(list(range(len(header))))
    for (r, _c), cell in t.get_celld().items():
        cell.set_edgecolor("#cccccc")
        if r == 0:
            cell.set_text_props(weight="bold")
    ax.set_title("comparison", loc="left", fontsize=12, weight="bold")
    import textwrap

    ax.text(0, -0.12, "\n".join(textwrap.wrap(COMPARISON_NOTE, 190)), transform=ax.transAxes, fontsize=7.5,
            color="dimgrey", va="top")
    return figure_png(fig)


def _title_image(text: str, sub: str, width: int):
    from PIL import Image, ImageDraw, ImageFont

    image = Image.new("RGB", (width, 64), "#e8eef5")
    draw = ImageDraw.Draw(image)
    try:
        big, small = ImageFont.load_default(size=26), ImageFont.load_default(size=15)
    except TypeError:  # Pillow < 10.1: one bitmap size
        big = small = ImageFont.load_default()
    draw.text((14, 6), text, fill="black", font=big)
    draw.text((14, 40), sub, fill="#333333", font=small)
    return image


def _sheet(plt, runs: list[Run], panels: list[Panel], table: list[dict[str, Any]]) -> bytes:
    """One PNG: the comparison table, then one titled block per run holding only that run's
    panels (curves two to a row; α grids and the cell drawing across the block)."""
    from PIL import Image

    def load(png: bytes):
        return Image.open(io.BytesIO(png)).convert("RGB")

    images = {p.id: load(p.png) for p in panels}
    narrow = [im.width for pid, im in images.items() if not pid.endswith(("/cell",)) and "/alpha-" not in pid]
    column = max(narrow, default=640)
    width = max(2 * column, 1000)
    blocks = [load(_table_png(plt, table))]
    for run in runs:
        own = [p for p in panels if p.id.startswith(run.name + "/")]
        wide = [p for p in own if p.id.endswith("/cell") or "/alpha-" in p.id]
        curves = [p for p in own if p not in wide]
        where = f"{run.kind} run, {len(run.rows)} epoch{'' if len(run.rows) == 1 else 's'}: {run.path}"
        if run.same_cell_as:
            where += f"; its cell is {run.same_cell_as}'s, drawn above"
        blocks.append(_title_image(run.name, where, width))
        for i in range(0, len(curves), 2):
            pair = [images[p.id] for p in curves[i:i + 2]]
            row = Image.new("RGB", (width, max(im.height for im in pair)), "white")
            for c, im in enumerate(pair):
                row.paste(im, (c * column + (column - im.width) // 2, 0))
            blocks.append(row)
        for p in (p for p in own if p in wide):
            im = images[p.id]
            if im.width > width:
                im = im.resize((width, round(im.height * width / im.width)), Image.LANCZOS)
            row = Image.new("RGB", (width, im.height), "white")
            row.paste(im, ((width - im.width) // 2, 0))
            blocks.append(row)
        blocks.append(Image.new("RGB", (width, 24), "white"))
    for i, block in enumerate(blocks):
        if block.width > width:  # the table at most as wide as the sheet
            blocks[i] = block.resize((width, round(block.height * width / block.width)), Image.LANCZOS)
    sheet = Image.new("RGB", (width, sum(b.height for b in blocks)), "white")
    y = 0
    for block in blocks:
        sheet.paste(block, ((width - block.width) // 2, y))
        y += block.height
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    return buf.getvalue()


def _fmt(value: Any, kind: str = "") -> str:
    if value is None:
        return "-"
    if kind == "pct":
        return f"{value:.2f} %"
    if kind == "big":
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.4e}"
    if kind == "int":
        return f"{int(value):,}"
    if kind == "s":
        return f"{value:.1f} s"
    return html.escape(str(value))


COMPARISON_COLUMNS = (
    ("run", "run", ""), ("kind", "kind", ""), ("genotype", "genotype", ""), ("epochs", "epochs", ""),
    ("accuracy", "top-1", "pct"), ("params", "params (no aux head)", "int"), ("flops", "FLOPs", "big"),
    ("bops", "BOPs", "big"), ("ops", "OPs", "big"), ("seconds", "time", "s"),
)


COMPARISON_NOTE = (
    "top-1: best validation top-1 for train / binarize runs, the architecture half's last-epoch "
    "top-1 for a search. Params, FLOPs, BOPs and OPs exclude the auxiliary head, as `bats flops` "
    "counts them; a search is counted as its derived cell in the CIFAR-10 network (20 cells, C=36), "
    "a train / binarize run as the network it trained."
)


def _html(runs: list[Run], panels: list[Panel], table: list[dict[str, Any]]) -> str:
    parts = ["<!DOCTYPE html>", "<html><head><meta charset='utf-8'><title>bats report</title>",
             "<style>body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
             "section{margin:1em 0}img{max-width:100%}</style></head><body>",
             "<h1>bats report</h1>"]
    if len(table) > 1 or table:
        parts.append("<section id='comparison'><h2>comparison</h2><table><tr>"
                     + "".join(f"<th>{html.escape(h)}</th>" for _, h, _ in COMPARISON_COLUMNS) + "</tr>")
        for row in table:
            parts.append("<tr>" + "".join(f"<td>{_fmt(row.get(k), kind)}</td>" for k, _, kind in COMPARISON_COLUMNS)
                         + "</tr>")
        parts.append(f"</table><p>{html.escape(COMPARISON_NOTE)}</p></section>")
    for run in runs:
        parts.append(f"<h2>{html.escape(run.name)} ({run.kind})</h2>")
        if run.same_cell_as:
            parts.append(f"<p>Its cell is {html.escape(run.same_cell_as)}'s, drawn above.</p>")
        for p in (p for p in panels if p.id.startswith(run.name + "/")):
            data = base64.b64encode(p.png).decode("ascii")
            parts.append(f"<section id='{html.escape(p.id)}'><h3>{html.escape(p.title)}</h3>"
                         f"<img alt='{html.escape(p.title)}' src='data:image/png;base64,{data}'></section>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write_report(run_dirs: list[Path], *, out: Path, force: bool = False) -> dict[str, Any]:
    """Write ``OUT/report.png`` and ``OUT/report.html``; returns the manifest (panels, files, table).

    Existing report files are refused unless ``force`` (checked before any work).
    """
    from bats_cli.core.fileio import atomic_write_bytes, atomic_write_text
    from bats_cli.utils.outputs import check_output_file

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserInputError(f"--out {out} is a file, not a directory")
    for name in ("report.png", "report.html"):
        check_output_file(out / name, flag="--out", force=force)

    plt = require_matplotlib()
    runs = [read_run(Path(d)) for d in run_dirs]
    names = [r.name for r in runs]
    for run in runs:
        if run.kind == "binarize" and run.name == "binarize":
            # binarize's default run directory is a "binarize" folder inside the training run's.
            run.name = f"{run.path.resolve().parent.name}-binarize"
    names = [r.name for r in runs]
    for i, run in enumerate(runs):
        if names.count(run.name) > 1:
            run.name = f"{run.name}-{i + 1}"
    panels: list[Panel] = []
    drawn: dict[str, str] = {}
    for run in runs:
        own = run_panels(plt, run)
        cell = run.genotype.to_json() if run.genotype is not None else None
        if cell in drawn:  # the same cell as an earlier run's (a train run and its binarize run)
            own = [p for p in own if not p.id.endswith("/cell")]
            run.same_cell_as = drawn[cell]
        elif cell is not None:
            drawn[cell] = run.name
        panels.extend(own)
    table = [run_summary(r) for r in runs]
    png = atomic_write_bytes(out / "report.png", _sheet(plt, runs, panels, table))
    page = atomic_write_text(out / "report.html", _html(runs, panels, table))
    return {
        "png": str(png), "html": str(page),
        "panels": [p.id for p in panels],
        "series": {p.id: p.series for p in panels},
        "comparison": table,
    }
