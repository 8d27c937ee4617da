"""`inspect --graph`: the layer graph with blob shapes, as an SVG of our own or as Graphviz source.

The SVG needs nothing installed and comes out the same everywhere. It is laid out for reading a deep net
from top to bottom: each layer sits one row below the lowest layer it reads from (rows follow the data, so
parallel branches sit side by side), and a layer that works in place on its bottom (Caffe's conv -> BN ->
ReLU on one blob) is drawn in the box of the layer that made the blob, its type added to the box's type line.
ICNet (156 layers merged, 219 with separate BN) becomes 100 boxes in 85 rows, at most 4 side by side (the
pyramid pooling), an SVG of 1038 x 7548 pixels to scroll through. Within a row boxes are ordered by where their inputs lie
(one barycentre pass), which keeps most edges short and uncrossed. Each box shows the layer name, the types
of its layers and its top's shape; hovering shows every name in full. `.dot` writes the same graph as
Graphviz source, for `dot -Tsvg` or other renderers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from html import escape
from pathlib import Path

from caffe2torch.errors import CaffeError

FORMATS = ("svg", "dot")
BOX_WIDTH, LINE_HEIGHT, PAD, ROW_GAP, COLUMN_GAP, MARGIN = 230, 14, 6, 34, 26, 20
NAME_CHARS = 32  # a longer name is cut in the box (the tooltip keeps it whole)
# Box colours by what a layer does.
COLOURS = {"Input": "#ffffff", "Convolution": "#dbe9f6", "Deconvolution": "#dbe9f6", "InnerProduct": "#dbe9f6",
           "Pooling": "#e2f0d9", "Interp": "#ece2f4", "Eltwise": "#fde9d9", "Concat": "#fde9d9",
           "BatchNorm": "#eeeeee", "BN": "#eeeeee", "Scale": "#eeeeee"}
DEFAULT_COLOUR = "#f7f7e8"


@dataclass
class Box:
    """One drawn box: a layer and the in-place layers that follow it on its top."""

    index: int
    names: list[str]
    types: list[str]
    tops: list[str]
    shapes: list[list[int]]
    parents: list[int] = field(default_factory=list)
    row: int = 0
    column: float = 0.0

    @property
    def lines(self) -> list[str]:
        name = self.names[0] if len(self.names[0]) <= NAME_CHARS else self.names[0][:NAME_CHARS - 1] + "…"
        types = " → ".join(self.types)
        if len(types) > NAME_CHARS + 6:
            types = types[:NAME_CHARS + 5] + "…"
        shapes = "; ".join("x".join(map(str, shape)) for shape in self.shapes)
        return [name, types, shapes]


def graph_format(path: Path) -> str:
    kind = path.suffix.lower().lstrip(".")
    if kind not in FORMATS:
        raise CaffeError(f"--graph {path}: give a file ending in .svg (drawn here) or .dot (Graphviz source)")
    return kind


def layout(info: dict) -> list[Box]:
    """Boxes with rows and columns from `describe()`'s description of a net."""
    boxes: list[Box] = []
    owner: dict[str, int] = {}  # blob -> the box that last wrote it
    read: set[str] = set()  # blobs some layer has read since they were written
    for name, shape in info["inputs"].items():
        boxes.append(Box(len(boxes), [name], ["Input"], [name], [shape]))
        owner[name] = boxes[-1].index
    for layer in info["layers"]:
        bottoms, tops = layer["bottoms"], layer["tops"]
        in_place = len(bottoms) == 1 and tops == bottoms and bottoms[0] in owner and bottoms[0] not in read
        if in_place and boxes[owner[bottoms[0]]].tops == tops:
            box = boxes[owner[bottoms[0]]]
            box.names.append(layer["name"])
            box.types.append(layer["type"])
            box.shapes = layer["top_shapes"]
            continue
        box = Box(len(boxes), [layer["name"]], [layer["type"]], list(tops), layer["top_shapes"])
        box.parents = sorted({owner[b] for b in bottoms if b in owner})
        read.update(bottoms)
        box.row = 1 + max((boxes[p].row for p in box.parents), default=-1)
        boxes.append(box)
        for top in tops:
            owner[top] = box.index
            read.discard(top)
    rows: dict[int, list[Box]] = {}
    for box in boxes:
        rows.setdefault(box.row, []).append(box)
    for row in sorted(rows):  # one barycentre pass: each box under the mean column of what it reads
        members = rows[row]
        if row > 0:
            members.sort(key=lambda b: (sum(boxes[p].column for p in b.parents) / len(b.parents)
                                        if b.parents else 0.0, b.index))
        for column, box in enumerate(members):
            box.column = column - (len(members) - 1) / 2  # rows centred on one axis
    return boxes


def _height(box: Box) -> int:
    return len(box.lines) * LINE_HEIGHT + 2 * PAD


def render_svg(info: dict) -> str:
    boxes = layout(info)
    row_height = max(_height(b) for b in boxes) + ROW_GAP
    widest = max(abs(b.column) for b in boxes)
    width = int(2 * MARGIN + (2 * widest + 1) * BOX_WIDTH + 2 * widest * COLUMN_GAP)
    height = int(2 * MARGIN + (max(b.row for b in boxes) + 1) * row_height + 2 * LINE_HEIGHT)

    def left(box: Box) -> float:
        return width / 2 + box.column * (BOX_WIDTH + COLUMN_GAP) - BOX_WIDTH / 2

    def top(box: Box) -> float:
        return MARGIN + 2 * LINE_HEIGHT + box.row * row_height

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" font-family="DejaVu Sans, Arial, sans-serif" font-size="11">',
             f'<rect width="{width}" height="{height}" fill="white"/>',
             f'<text x="{MARGIN}" y="{MARGIN + LINE_HEIGHT}" font-size="13" font-weight="bold">'
             f'{escape(info["name"] or "net")}: {len(info["layers"])} layers, {info["parameters"]:,} parameters'
             f'</text>', '<g fill="none" stroke="#888" stroke-width="1">']
    for box in boxes:  # edges first: boxes are drawn over the lines that pass behind them
        for parent in (boxes[p] for p in box.parents):
            x1, y1 = left(parent) + BOX_WIDTH / 2, top(parent) + _height(parent)
            x2, y2 = left(box) + BOX_WIDTH / 2, top(box)
            bend = (y2 - y1) / 2
            parts.append(f'<path d="M{x1:.1f},{y1:.1f} C{x1:.1f},{y1 + bend:.1f} {x2:.1f},{y2 - bend:.1f} '
                         f'{x2:.1f},{y2 - 4:.1f}"/><path d="M{x2 - 3:.1f},{y2 - 6:.1f} L{x2:.1f},{y2:.1f} '
                         f'L{x2 + 3:.1f},{y2 - 6:.1f}"/>')
    parts.append("</g>")
    for box in boxes:
        x, y = left(box), top(box)
        tooltip = "\n".join(f"{name} ({kind})" for name, kind in zip(box.names, box.types))
        tooltip += "\ntops: " + ", ".join(box.tops)
        colour = COLOURS.get(box.types[0], DEFAULT_COLOUR)
        parts.append(f'<g><title>{escape(tooltip)}</title><rect x="{x:.1f}" y="{y:.1f}" width="{BOX_WIDTH}" '
                     f'height="{_height(box)}" rx="5" fill="{colour}" stroke="#555"/>')
        for number, (line, style) in enumerate(zip(box.lines, ('font-weight="bold"', 'fill="#333"',
                                                               'fill="#1f4e9c"'))):
            parts.append(f'<text x="{x + PAD:.1f}" y="{y + PAD + (number + 0.8) * LINE_HEIGHT:.1f}" {style}>'
                         f'{escape(line)}</text>')
        parts.append("</g>")
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def render_dot(info: dict) -> str:
    """The same boxes and edges as Graphviz source (rows left to Graphviz's own layout)."""
    boxes = layout(info)

    def quoted(text: str) -> str:
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'

    lines = [f"digraph {quoted(info['name'] or 'net')} {{", "  rankdir=TB;",
             '  node [shape=box, style="rounded,filled", fontname="DejaVu Sans", fontsize=10];']
    for box in boxes:
        label = "\\n".join(line.replace("\\", "\\\\").replace('"', '\\"') for line in box.lines)
        lines.append(f'  b{box.index} [label="{label}", fillcolor="{COLOURS.get(box.types[0], DEFAULT_COLOUR)}", '
                     f"tooltip={quoted(', '.join(box.names))}];")
    for box in boxes:
        lines.extend(f"  b{parent} -> b{box.index};" for parent in box.parents)
    lines.append("}")
    return "\n".join(lines) + "\n"


def render(info: dict, kind: str) -> str:
    return render_svg(info) if kind == "svg" else render_dot(info)
