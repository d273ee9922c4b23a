"""The figures of `bats report` (matplotlib, the ``report`` extra): training / search curves,
softmax(α/T) per edge over epochs (the paper's Fig. 1 and 2) and the derived cell, one `Panel` each."""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Any

from bats_cli.studies.report_run import Run


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


def figure_png(fig) -> bytes:
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
    return Panel(f"{run.name}/{pid}", title, figure_png(fig), [label for _, label in present])


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
    return Panel(f"{run.name}/alpha-{cell}", f"α softmax per edge, {cell} cell", figure_png(fig),
                 [f"{cell}:{e['node']}<-{e['input']}" for e in edges])


def _cell_panel(run: Run) -> Panel | None:
    if run.genotype is None:
        return None
    from bats_cli.studies.plot import to_png_bytes

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
