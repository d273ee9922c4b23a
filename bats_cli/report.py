"""`bats report`: plots of finished (or running) runs, as a PNG and a self-contained HTML page.

Everything is read from what the long commands already write into a run directory:
``metrics.csv`` (training / validation curves; search entropy and parameter-free share),
``alphas/stageK_epochNN.json`` (softmax(α/T) of every edge after every epoch, the data of the
paper's Fig. 1 and 2), ``genotype.json`` (the derived cell, drawn by :mod:`bats_cli.plot`),
``config.json`` and ``result.json``. Several run directories add a comparison table (accuracy,
parameters, FLOPs / BOPs / OPs counted by :mod:`bats_cli.counting`, time).

matplotlib is an optional extra (``pip install 'bats[report]'``).

    manifest = write_report([Path("runs/search-tiny")], out=Path("report"))
    manifest["panels"]  # ["search-tiny/loss", "search-tiny/alpha-normal", ...]
"""

from __future__ import annotations

import base64
import html
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bats_cli.errors import UserInputError

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


# --------------------------------------------------------------------------- reading a run


@dataclass
class Run:
    """What a run directory holds, read once."""

    path: Path
    name: str
    kind: str  # "search", "train" or "binarize"
    config: dict[str, Any]
    record: dict[str, Any]  # the whole config.json
    rows: list[dict[str, Any]]
    result: dict[str, Any] | None
    alphas: list[dict[str, Any]] = field(default_factory=list)
    genotype: Any = None
    same_cell_as: str | None = None  # an earlier run of the report with this genotype (drawn there)


def read_run(path: Path) -> Run:
    """A run directory as a :class:`Run`; one error line when it is not one."""
    from bats_cli.genotype import Genotype

    path = Path(path)
    if not path.is_dir():
        raise UserInputError(f"{path}: not a run directory (expected --out of search, train or binarize)")
    metrics = path / "metrics.csv"
    config_path = path / "config.json"
    if not metrics.is_file() or not config_path.is_file():
        raise UserInputError(f"{path}: no metrics.csv and config.json; is it a run directory that "
                             "finished at least one epoch?")
    from bats_cli.rundir import read_run_files

    # Every file is checked where it is read (bounded, typed, finite): bats_cli/rundir.py.
    files = read_run_files(path)
    record, rows, result, alphas = files.record, files.rows, files.result, files.alphas
    if not rows:
        raise UserInputError(f"{path}: metrics.csv has no epochs yet")
    if record.get("command") == "search" or alphas:
        kind = "search"
    elif "source" in record:
        kind = "binarize"
    else:
        kind = "train"
    genotype = None
    if (path / "genotype.json").is_file():
        from bats_cli.genotype import load_genotype

        genotype = load_genotype(path / "genotype.json")
    elif isinstance(record.get("genotype"), dict):
        genotype = Genotype.from_dict(record["genotype"], origin=f"{config_path} genotype")
    config = record.get("config")
    if genotype is None:
        genotype = _checkpoint_genotype(path)
    return Run(path=path, name=path.resolve().name, kind=kind,
               config=config if isinstance(config, dict) else {},
               record=record, rows=rows, result=result, alphas=alphas, genotype=genotype)


def _checkpoint_genotype(path: Path) -> Any:
    """The genotype recorded in the run's checkpoint (a binarize run's config.json has none)."""
    from bats_cli.checkpoint import read_metadata
    from bats_cli.genotype import Genotype

    last = path / "last.safetensors"
    if not last.is_file():
        return None
    meta = read_metadata(last)
    if not meta.genotype_json:
        return None
    return Genotype.from_json(meta.genotype_json, origin=f"{last} (bats_genotype)")


# --------------------------------------------------------------------------- panels


@dataclass
class Panel:
    """One figure of the report: an id (HTML anchor, manifest), a title, its PNG and series."""

    id: str
    title: str
    png: bytes
    series: list[str]


def _column(rows: list[dict[str, Any]], key: str) -> list[float]:
    return [float(r[key]) if isinstance(r.get(key), (int, float)) else math.nan for r in rows]


def _has(rows: list[dict[str, Any]], key: str) -> bool:
    return any(isinstance(r.get(key), (int, float)) for r in rows)


def _figure_png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buf.getvalue()


def _tidy_axes(ax, xs: list[float]) -> None:
    """Integer epoch ticks, numbers without offset notation ("1e-5+9.999e-1"), a sane x range
    around a single epoch."""
    from matplotlib.ticker import MaxNLocator, ScalarFormatter

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for axis in (ax.xaxis, ax.yaxis):
        formatter = axis.get_major_formatter()
        if isinstance(formatter, ScalarFormatter):
            formatter.set_useOffset(False)
    finite = [x for x in xs if not math.isnan(x)]
    if finite and max(finite) - min(finite) < 1:
        ax.set_xlim(min(finite) - 1, max(finite) + 1)
        ax.set_xticks(sorted(set(finite)))


def _line_panel(plt, run: Run, pid: str, title: str, keys: list[tuple[str, str]], ylabel: str,
                stage_marks: bool = False) -> Panel | None:
    present = [(k, label) for k, label in keys if _has(run.rows, k)]
    if not present:
        return None
    epochs = _column(run.rows, "epoch")
    fig, ax = plt.subplots(figsize=(6, 3.6))
    few = sum(not math.isnan(e) for e in epochs) < 2
    for key, label in present:
        if few:  # one epoch: a point per curve, not a line through nothing
            ax.plot(epochs, _column(run.rows, key), linestyle="none", marker="o", markersize=7, label=label)
        else:
            ax.plot(epochs, _column(run.rows, key), marker="o", markersize=3, label=label)

    if stage_marks and _has(run.rows, "stage"):
        stages = _column(run.rows, "stage")
        for i in range(1, len(stages)):
            if stages[i] != stages[i - 1]:
                ax.axvline(epochs[i] - 0.5, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel(("epoch" if run.kind != "search" else "epoch (all stages)")
                  + ("  (one epoch: one point per curve)" if few else ""))
    ax.set_ylabel(ylabel)
    ax.set_title(f"{run.name}: {title}", fontsize=10)
    _tidy_axes(ax, epochs)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return Panel(f"{run.name}/{pid}", title, _figure_png(fig), [label for _, label in present])


def _alpha_panel(plt, run: Run, cell: str) -> Panel | None:
    """softmax(α/T) of every op on every edge over the search's epochs (one small plot per edge)."""
    if not run.alphas:
        return None
    steps = [f"{d['stage']}.{d['epoch']}" for d in run.alphas]
    edges = run.alphas[0][cell]
    n = len(edges)
    cols = min(5, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.0 * cols, 2.2 * rows), squeeze=False, sharey=True)
    ops: list[str] = []
    for doc in run.alphas:
        for e in doc[cell]:
            ops.extend(op for op in e["weights"] if op not in ops)
    colours = plt.get_cmap("tab10")
    x = list(range(len(run.alphas)))
    from matplotlib.ticker import FuncFormatter

    def stage_epoch(value, _pos):
        i = int(round(value))
        if abs(value - i) > 1e-6 or not 0 <= i < len(run.alphas):
            return ""
        return f"{run.alphas[i]['stage']}.{run.alphas[i]['epoch']}"

    for i, edge in enumerate(edges):
        ax = axes[i // cols][i % cols]
        for j, op in enumerate(ops):
            y = [doc[cell][i]["weights"].get(op, math.nan) for doc in run.alphas]
            if all(math.isnan(v) for v in y):
                continue
            ax.plot(x, y, color=colours(j % 10), linewidth=1.2, label=op)
        ax.set_title(f"node {edge['node']} <- {edge['input']}", fontsize=8)
        ax.tick_params(labelsize=6)
        _tidy_axes(ax, [float(v) for v in x])
        ax.xaxis.set_major_formatter(FuncFormatter(stage_epoch))
        for k in range(1, len(run.alphas)):
            if run.alphas[k]["stage"] != run.alphas[k - 1]["stage"]:
                ax.axvline(k - 0.5, color="grey", linestyle=":", linewidth=0.8)
    for k in range(n, rows * cols):
        axes[k // cols][k % cols].axis("off")
    seen: dict[str, Any] = {}
    for ax_row in axes:
        for ax in ax_row:
            for handle, label in zip(*ax.get_legend_handles_labels()):
                seen.setdefault(label, handle)
    fig.legend(list(seen.values()), list(seen.keys()), loc="lower center", ncol=min(4, len(seen)),
               fontsize=7, bbox_to_anchor=(0.5, -0.02))
    fig.suptitle(f"{run.name}: softmax(alpha/T) per edge, {cell} cell (x: stage.epoch, from {steps[0]} "
                 f"to {steps[-1]}; epoch 0 = the stage's start)", fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 0.97))
    return Panel(f"{run.name}/alpha-{cell}", f"α softmax per edge, {cell} cell", _figure_png(fig),
                 [f"{cell}:{e['node']}<-{e['input']}" for e in edges])


def _cell_panel(run: Run) -> Panel | None:
    if run.genotype is None:
        return None
    from bats_cli.plot import to_png_bytes

    return Panel(f"{run.name}/cell", f"cell ({run.genotype.name})", to_png_bytes(run.genotype),
                 ["normal", "reduce"])


def run_panels(plt, run: Run) -> list[Panel]:
    """Every panel this run's files support, in reading order."""
    panels: list[Panel | None] = []
    if run.kind == "search":
        panels.append(_line_panel(plt, run, "loss", "loss", [("train_loss", "weights half"),
                                                              ("arch_loss", "architecture half")],
                                  "cross-entropy", stage_marks=True))
        panels.append(_line_panel(plt, run, "accuracy", "top-1 (%)", [("train_acc", "weights half"),
                                                                     ("arch_acc", "architecture half")],
                                  "%", stage_marks=True))
        panels.append(_alpha_panel(plt, run, "normal"))
        panels.append(_alpha_panel(plt, run, "reduce"))
        panels.append(_line_panel(plt, run, "entropy", "mean edge entropy / log(ops)",
                                  [("entropy_normal_rel", "normal"), ("entropy_reduce_rel", "reduce")],
                                  "relative entropy", stage_marks=True))
        panels.append(_line_panel(plt, run, "param-free", "parameter-free share of the derived cell",
                                  [("param_free_normal", "normal"), ("param_free_reduce", "reduce")],
                                  "share", stage_marks=True))
    else:
        panels.append(_line_panel(plt, run, "loss", "loss", [("train_loss", "train"), ("val_loss", "validation")],
                                  "cross-entropy"))
        panels.append(_line_panel(plt, run, "accuracy", "top-1 (%)", [("train_top1", "train"),
                                                                     ("val_top1", "validation"),
                                                                     ("val_top5", "validation top-5")], "%"))
        panels.append(_line_panel(plt, run, "lr", "learning rate", [("lr", "lr")], "lr"))
    panels.append(_cell_panel(run))
    return [p for p in panels if p is not None]


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
    from bats_cli.registry import model_of

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
    from bats_cli.counting import count_model
    from bats_cli.networks import build_network

    if isinstance(settings, dict):
        from bats_cli.modelio import network_label, rebuild

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
    return _figure_png(fig)


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
    from bats_cli.fileio import atomic_write_bytes, atomic_write_text
    from bats_cli.outputs import check_output_file

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
