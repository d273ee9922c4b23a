"""Drawings of a genotype's normal and reduction cells: SVG written by hand, PNG with Pillow, DOT text.

No system binary is needed (DARTS' own plot calls graphviz ``dot``). The layout is a layered
left-to-right DAG: the two cell inputs (0 = c(k-2), 1 = c(k-1)) in the first column, each
intermediate node (numbered as in the genotype JSON: 2, 3, ...) one column right of its deepest
input, the output c(k) last. Layouts widen until no edge label overlaps another or a node.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape

from bats_cli.core.errors import UserInputError
from bats_cli.core.genotype import CELLS, Genotype

FORMATS = (".svg", ".png")

# Colour per op family; unknown ops fall back to grey.
OP_COLOURS = {
    "skip_connect": "#7f7f7f",
    "max_pool_3x3": "#1f77b4",
    "avg_pool_3x3": "#6baed6",
    "group_conv_3x3": "#ff7f0e",
    "group_conv_5x5": "#d62728",
    "dil_group_conv_3x3": "#2ca02c",
    "dil_group_conv_5x5": "#9467bd",
    "sep_conv_3x3": "#ff7f0e",
    "sep_conv_5x5": "#d62728",
    "sep_conv_7x7": "#8c564b",
    "dil_conv_3x3": "#2ca02c",
    "dil_conv_5x5": "#9467bd",
    "conv_7x1_1x7": "#e377c2",
}
INPUT_FILL = "#a1d99b"
NODE_FILL = "#fdd49e"
OUTPUT_FILL = "#9ecae1"

COL_W = 230
ROW_H = 80
NODE_W = 76
NODE_H = 32
MARGIN = 24
TITLE_H = 34
FONT = 12


@dataclass
class _Node:
    key: str
    label: str
    x: float
    y: float
    fill: str


@dataclass
class _Edge:
    src: str
    dst: str
    label: str
    colour: str
    bend: float = 0.0


@dataclass
class _Panel:
    title: str
    nodes: dict[str, _Node]
    edges: list[_Edge]
    width: float
    height: float
    top: float = 0.0
    labels: list = None  # type: ignore[assignment]  # [((x, y), edge)] from _place_labels


OUTPUT_KEY = "c(k)"


def _node_key(i: int) -> str:
    """A node's label: its index in the genotype JSON (inputs 0 and 1 are the previous cells)."""
    return {0: "0 c(k-2)", 1: "1 c(k-1)"}.get(i, str(i))


def _layout(genotype: Genotype, cell: str, title: str, spread: float = 1.0) -> _Panel:
    col_w, row_h = COL_W * spread, ROW_H * spread
    entries = genotype.cell(cell)  # type: ignore[arg-type]
    steps = len(entries) // 2
    inputs = {k + 2: [src for _, src in entries[2 * k : 2 * k + 2]] for k in range(steps)}
    depth = {0: 0, 1: 0}
    for node in range(2, steps + 2):
        depth[node] = 1 + max(depth[s] for s in inputs[node])
    out_col = max(depth.values()) + 1
    columns: dict[int, list[int]] = {}
    for node, d in depth.items():
        columns.setdefault(d, []).append(node)
    rows = max(max(len(v) for v in columns.values()), 2)
    # Barycentre ordering: a node sits near the mean row of its inputs (fewer crossings).
    row_of: dict[int, float] = {}
    for d in sorted(columns):
        members = columns[d]
        if d > 0:
            members.sort(key=lambda n: (sum(row_of[s] for s in inputs[n]) / 2, n))
        offset = (rows - len(members)) / 2
        for r, node in enumerate(members):
            row_of[node] = offset + r
    height = TITLE_H + rows * row_h + MARGIN
    nodes: dict[str, _Node] = {}
    for node, d in depth.items():
        key = _node_key(node)
        fill = INPUT_FILL if node < 2 else NODE_FILL
        nodes[key] = _Node(
            key, key, MARGIN + NODE_W / 2 + d * col_w, TITLE_H + row_of[node] * row_h + row_h / 2, fill
        )
    nodes[OUTPUT_KEY] = _Node(
        OUTPUT_KEY, OUTPUT_KEY, MARGIN + NODE_W / 2 + out_col * col_w, TITLE_H + rows * row_h / 2, OUTPUT_FILL
    )
    edges: list[_Edge] = []
    seen: dict[tuple[str, str], int] = {}
    for k in range(steps):
        for op, src in entries[2 * k : 2 * k + 2]:
            pair = (_node_key(src), _node_key(k + 2))
            n = seen.get(pair, 0)
            seen[pair] = n + 1
            edges.append(_Edge(pair[0], pair[1], op, OP_COLOURS.get(op, "#555555"), bend=30.0 * n))
    for idx in genotype.concat(cell):  # type: ignore[arg-type]
        edges.append(_Edge(_node_key(idx), OUTPUT_KEY, "", "#999999"))
    mid = TITLE_H + rows * row_h / 2
    for e in edges:
        a, b = nodes[e.src], nodes[e.dst]
        # An edge that skips columns is bent around any node sitting on its straight path.
        blocked = any(
            a.x < n.x < b.x and abs(a.y + (b.y - a.y) * (n.x - a.x) / (b.x - a.x) - n.y) < NODE_H
            for n in nodes.values()
        )
        if blocked and not e.bend:
            e.bend = 0.7 * row_h if (a.y + b.y) / 2 <= mid else -0.7 * row_h
    width = 2 * MARGIN + NODE_W + out_col * col_w
    return _Panel(title, nodes, edges, width, height)


# Layouts are spread out by these factors until no edge label overlaps another label or a node.
SPREADS = (1.0, 1.25, 1.5, 1.8, 2.2)


def _panels(genotype: Genotype) -> list[_Panel]:
    panels = []
    top = 0.0
    for cell in CELLS:
        label = "normal cell" if cell == "normal" else "reduction cell"
        for spread in SPREADS:
            p = _layout(genotype, cell, f"{genotype.name} ({genotype.space}): {label}", spread)
            p.top = top
            p.labels, overlaps = _place_labels(p)
            if overlaps == 0:
                break
        top += p.height
        panels.append(p)
    return panels


def _curve(a: _Node, b: _Node, bend: float, top: float) -> tuple[tuple[float, float], ...]:
    """Cubic Bézier control points, leaving a's right side and entering b's left side."""
    x0, y0 = a.x + NODE_W / 2, a.y + top
    x3, y3 = b.x - NODE_W / 2, b.y + top
    dx = max((x3 - x0) / 2, 30.0)
    return ((x0, y0), (x0 + dx, y0 - bend), (x3 - dx, y3 - bend), (x3, y3))


def _bezier(points, t: float) -> tuple[float, float]:
    (x0, y0), (x1, y1), (x2, y2), (x3, y3) = points
    u = 1 - t
    x = u**3 * x0 + 3 * u * u * t * x1 + 3 * u * t * t * x2 + t**3 * x3
    y = u**3 * y0 + 3 * u * u * t * y1 + 3 * u * t * t * y2 + t**3 * y3
    return x, y


_LABEL_TS = (0.5, 0.42, 0.58, 0.34, 0.66, 0.26, 0.74, 0.2, 0.8, 0.46, 0.54, 0.38, 0.62, 0.3, 0.7)
# Vertical nudges (px) tried at every position along the curve when it is crowded.
_LABEL_DY = (0.0, -11.0, 11.0)
LABEL_H = 18.0


def _label_width(text: str) -> float:
    return 6.8 * len(text) + 10


def _place_labels(p: _Panel) -> tuple[list[tuple[tuple[float, float], _Edge]], int]:
    """Label positions near their curves, greedily avoiding earlier labels and the nodes;
    also how many labels could only be placed overlapping something."""
    boxes = [
        (n.x - NODE_W / 2, n.y + p.top - NODE_H / 2, n.x + NODE_W / 2, n.y + p.top + NODE_H / 2)
        for n in p.nodes.values()
    ]
    placed = []
    overlaps = 0
    for e in p.edges:
        if not e.label:
            continue
        pts = _curve(p.nodes[e.src], p.nodes[e.dst], e.bend, p.top)
        w, h = _label_width(e.label), LABEL_H
        best, best_hits = None, None
        for dy in _LABEL_DY:
            for t in _LABEL_TS:
                x, y = _bezier(pts, t)
                y += dy
                box = (x - w / 2, y - h / 2, x + w / 2, y + h / 2)
                hits = sum(_overlap(box, b) for b in boxes)
                if best_hits is None or hits < best_hits:
                    best, best_hits = ((x, y), box), hits
                if hits == 0:
                    break
            if best_hits == 0:
                break
        (xy, box) = best  # type: ignore[misc]
        overlaps += best_hits > 0
        boxes.append(box)
        placed.append((xy, e))
    return placed, overlaps


def _overlap(a, b) -> float:
    dx = min(a[2], b[2]) - max(a[0], b[0])
    dy = min(a[3], b[3]) - max(a[1], b[1])
    return dx * dy if dx > 0 and dy > 0 else 0.0


def to_svg(genotype: Genotype) -> str:
    panels = _panels(genotype)
    width = max(p.width for p in panels)
    height = sum(p.height for p in panels)
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
        f'viewBox="0 0 {width:.0f} {height:.0f}" font-family="DejaVu Sans, Helvetica, Arial, sans-serif" '
        f'font-size="{FONT}">',
        "<defs>",
    ]
    colours = sorted({e.colour for p in panels for e in p.edges})
    for c in colours:
        out.append(
            f'<marker id="arrow{c[1:]}" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" '
            f'markerHeight="7" orient="auto-start-reverse"><path d="M 0 0 L 10 5 L 0 10 z" fill="{c}"/></marker>'
        )
    out.append("</defs>")
    out.append(f'<rect x="0" y="0" width="{width:.0f}" height="{height:.0f}" fill="white"/>')
    for p in panels:
        out.append(
            f'<text x="{MARGIN}" y="{p.top + 22:.1f}" font-size="{FONT + 3}" font-weight="bold">'
            f"{escape(p.title)}</text>"
        )
        for e in p.edges:
            pts = _curve(p.nodes[e.src], p.nodes[e.dst], e.bend, p.top)
            d = "M {:.1f} {:.1f} C {:.1f} {:.1f}, {:.1f} {:.1f}, {:.1f} {:.1f}".format(
                *[v for pt in pts for v in pt]
            )
            out.append(
                f'<path d="{d}" fill="none" stroke="{e.colour}" stroke-width="2" '
                f'marker-end="url(#arrow{e.colour[1:]})"/>'
            )
        for (x, y), e in p.labels:
            w = _label_width(e.label)
            out.append(
                f'<rect x="{x - w / 2:.1f}" y="{y - 9:.1f}" width="{w:.1f}" height="16" rx="3" '
                f'fill="white" fill-opacity="0.9" stroke="{e.colour}" stroke-width="0.8"/>'
            )
            out.append(
                f'<text x="{x:.1f}" y="{y + 3.5:.1f}" text-anchor="middle" fill="{e.colour}">'
                f"{escape(e.label)}</text>"
            )
        for n in p.nodes.values():
            out.append(
                f'<rect x="{n.x - NODE_W / 2:.1f}" y="{n.y + p.top - NODE_H / 2:.1f}" width="{NODE_W}" '
                f'height="{NODE_H}" rx="6" fill="{n.fill}" stroke="#333" stroke-width="1"/>'
            )
            out.append(
                f'<text x="{n.x:.1f}" y="{n.y + p.top + 4:.1f}" text-anchor="middle">{escape(n.label)}</text>'
            )
    out.append("</svg>")
    return "\n".join(out) + "\n"


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ValueError):  # Pillow without FreeType: fixed bitmap font
        return ImageFont.load_default()


def _hex(c: str) -> tuple[int, int, int]:
    return int(c[1:3], 16), int(c[3:5], 16), int(c[5:7], 16)


def to_png_bytes(genotype: Genotype, scale: float = 2.0) -> bytes:
    import io

    from PIL import Image, ImageDraw

    panels = _panels(genotype)
    width = max(p.width for p in panels)
    height = sum(p.height for p in panels)
    s = scale
    img = Image.new("RGB", (int(width * s), int(height * s)), "white")
    draw = ImageDraw.Draw(img)
    font = _font(int(FONT * s))
    title_font = _font(int((FONT + 3) * s))

    def text_size(text: str, f) -> tuple[float, float]:
        box = draw.textbbox((0, 0), text, font=f)
        return box[2] - box[0], box[3] - box[1]

    for p in panels:
        draw.text((MARGIN * s, (p.top + 10) * s), p.title, fill="black", font=title_font)
        for e in p.edges:
            pts = _curve(p.nodes[e.src], p.nodes[e.dst], e.bend, p.top)
            poly = [_bezier(pts, t / 40) for t in range(41)]
            colour = _hex(e.colour)
            draw.line([(x * s, y * s) for x, y in poly], fill=colour, width=max(1, int(2 * s)))
            (xa, ya), (xb, yb) = poly[-2], poly[-1]
            ang = math.atan2(yb - ya, xb - xa)
            size = 8
            head = [
                (xb, yb),
                (xb - size * math.cos(ang - 0.4), yb - size * math.sin(ang - 0.4)),
                (xb - size * math.cos(ang + 0.4), yb - size * math.sin(ang + 0.4)),
            ]
            draw.polygon([(x * s, y * s) for x, y in head], fill=colour)
        for (x, y), e in p.labels:
            colour = _hex(e.colour)
            tw, th = text_size(e.label, font)
            pad = 3 * s
            draw.rounded_rectangle(
                (x * s - tw / 2 - pad, y * s - th / 2 - pad, x * s + tw / 2 + pad, y * s + th / 2 + pad),
                radius=3 * s, fill="white", outline=colour,
            )
            draw.text((x * s, y * s), e.label, fill=colour, font=font, anchor="mm")
        for n in p.nodes.values():
            box = (
                (n.x - NODE_W / 2) * s,
                (n.y + p.top - NODE_H / 2) * s,
                (n.x + NODE_W / 2) * s,
                (n.y + p.top + NODE_H / 2) * s,
            )
            draw.rounded_rectangle(box, radius=6 * s, fill=_hex(n.fill), outline="#333333", width=max(1, int(s)))
            draw.text((n.x * s, (n.y + p.top) * s), n.label, fill="black", font=font, anchor="mm")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def to_dot(genotype: Genotype) -> str:
    """Graphviz DOT text of both cells (render with ``dot -Tpdf`` if graphviz is installed)."""

    def q(s: str) -> str:
        return '"' + s.replace('"', '\\"') + '"'

    lines = [f"digraph {q(genotype.name)} {{", "  rankdir=LR;",
             '  node [shape=rect, style="rounded,filled", fontname=Helvetica];', "  edge [fontname=Helvetica];"]
    for cell in CELLS:
        prefix = cell[0]
        label = "normal cell" if cell == "normal" else "reduction cell"
        lines.append(f"  subgraph cluster_{cell} {{")
        lines.append(f"    label={q(f'{genotype.name}: {label}')};")
        entries = genotype.cell(cell)  # type: ignore[arg-type]
        steps = len(entries) // 2
        names = {i: _node_key(i) for i in range(steps + 2)}
        for i, key in names.items():
            fill = INPUT_FILL if i < 2 else NODE_FILL
            lines.append(f"    {q(prefix + ':' + key)} [label={q(key)}, fillcolor={q(fill)}];")
        lines.append(f"    {q(prefix + ':' + OUTPUT_KEY)} [label={q(OUTPUT_KEY)}, fillcolor={q(OUTPUT_FILL)}];")
        for k in range(steps):
            for op, src in entries[2 * k : 2 * k + 2]:
                colour = OP_COLOURS.get(op, "#555555")
                lines.append(
                    f"    {q(prefix + ':' + names[src])} -> {q(prefix + ':' + names[k + 2])} "
                    f"[label={q(op)}, color={q(colour)}, fontcolor={q(colour)}];"
                )
        for idx in genotype.concat(cell):  # type: ignore[arg-type]
            lines.append(f"    {q(prefix + ':' + names[idx])} -> {q(prefix + ':' + OUTPUT_KEY)} [color=gray];")
        lines.append("  }")
    lines.append("}")
    return "\n".join(lines) + "\n"


def save_plot(genotype: Genotype, path: str | Path) -> Path:
    """Write ``path`` as SVG or PNG (by suffix), atomically."""
    from bats_cli.core.fileio import atomic_write_bytes, atomic_write_text

    p = Path(path)
    suffix = p.suffix.lower()
    if suffix not in FORMATS:
        raise UserInputError(f"--plot {p}: choose a .svg or .png file name (got {suffix or 'no suffix'})")
    if p.is_dir():
        raise UserInputError(f"--plot {p} is a directory")
    if suffix == ".svg":
        return atomic_write_text(p, to_svg(genotype))
    return atomic_write_bytes(p, to_png_bytes(genotype))


def save_dot(genotype: Genotype, path: str | Path) -> Path:
    from bats_cli.core.fileio import atomic_write_text

    p = Path(path)
    if p.is_dir():
        raise UserInputError(f"--dot {p} is a directory")
    return atomic_write_text(p, to_dot(genotype))
