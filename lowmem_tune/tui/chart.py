"""A compact line chart drawn with braille dots (2 x 4 dots per terminal cell).

Textual has no line chart; this renders train loss as a line and eval loss as dots into rows of
styled runs of text, with the y range on the left and the step range underneath. The dashboard
turns the rows into Textual strips directly: the same chart as one Rich `Text` went through
Textual's content pipeline at ~20 ms a redraw for a 130 x 40 chart.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

# Bit of each dot in a braille cell, indexed [row][column] (Unicode braille patterns, U+2800).
_DOT_BITS = ((0x01, 0x08), (0x02, 0x10), (0x04, 0x20), (0x40, 0x80))
_LABEL_WIDTH = 8
LOG_SCALE_SPAN = 100.0
"""max / min of the values above which the y axis turns logarithmic."""

Points = Sequence[tuple[float, float]]
Row = list[tuple[str, str]]  # runs of (text, style); style "" is the widget's own


class BrailleCanvas:
    """A grid of `width` x `height` cells addressed in dots: x in [0, 2*width), y in [0, 4*height), y=0 at the top."""

    def __init__(self, width: int, height: int) -> None:
        self.width = width
        self.height = height
        self.cells = [[0] * width for _ in range(height)]

    def dot(self, x: int, y: int) -> None:
        if 0 <= x < 2 * self.width and 0 <= y < 4 * self.height:
            self.cells[y // 4][x // 2] |= _DOT_BITS[y % 4][x % 2]

    def line(self, x0: int, y0: int, x1: int, y1: int) -> None:
        steps = max(abs(x1 - x0), abs(y1 - y0), 1)
        for i in range(steps + 1):
            self.dot(round(x0 + (x1 - x0) * i / steps), round(y0 + (y1 - y0) * i / steps))


def _finite(points: Points) -> list[tuple[float, float]]:
    return [(x, y) for x, y in points if math.isfinite(y)]


def _column_means(points: list[tuple[float, float]], to_column) -> list[tuple[int, float]]:
    """Average the points that land in the same dot column, so a noisy curve reads as one line."""
    sums: dict[int, list[float]] = {}
    for x, y in points:
        bucket = sums.setdefault(to_column(x), [0.0, 0])
        bucket[0] += y
        bucket[1] += 1
    return [(column, total / count) for column, (total, count) in sorted(sums.items())]


def format_value(value: float) -> str:
    if value == 0 or 0.01 <= abs(value) < 1000:
        return f"{value:.3f}"
    return f"{value:.1e}"  # 7 characters, like the fixed-point labels


def render_line_chart(
    line: Points, dots: Points, width: int, height: int, line_style: str = "cyan", dot_style: str = "magenta"
) -> list[Row]:
    """`line` drawn as a connected curve and `dots` as markers, in `width` x `height` cells
    (including the axis labels), one `Row` per terminal line. Non-finite values are left out.
    When the values span more than two decades (a loss from 10 down to 0.01) the y axis is
    logarithmic, so the end of training is not a flat line at the bottom; the axis says so."""
    line_points, dot_points = _finite(line), _finite(dots)
    if not line_points and not dot_points:
        return [[("waiting for the first step…", "dim")]]
    plot_width, plot_height = max(width - _LABEL_WIDTH, 4), max(height - 1, 2)
    values = [y for _, y in line_points + dot_points]
    log_scale = min(values) > 0 and max(values) > LOG_SCALE_SPAN * min(values)
    if log_scale:
        line_points = [(x, math.log10(y)) for x, y in line_points]
        dot_points = [(x, math.log10(y)) for x, y in dot_points]
    shown = (lambda v: 10 ** v) if log_scale else (lambda v: v)

    xs = [x for x, _ in line_points + dot_points]
    ys = [y for _, y in line_points + dot_points]
    x_lo, x_hi = min(xs), max(xs)
    if x_hi == x_lo:
        x_hi = x_lo + 1
    y_lo, y_hi = min(ys), max(ys)
    pad = (y_hi - y_lo) * 0.05 or max(abs(y_hi) * 0.05, 0.05)
    y_lo, y_hi = y_lo - pad, y_hi + pad

    dot_columns, dot_rows = 2 * plot_width, 4 * plot_height

    def to_column(x: float) -> int:
        return min(int((x - x_lo) / (x_hi - x_lo) * (dot_columns - 1) + 0.5), dot_columns - 1)

    def to_row(y: float) -> int:
        return round((y_hi - y) / (y_hi - y_lo) * (dot_rows - 1))

    line_canvas = BrailleCanvas(plot_width, plot_height)
    curve = [(column, to_row(y)) for column, y in _column_means(line_points, to_column)]
    if len(curve) == 1:
        line_canvas.dot(*curve[0])
    for (x0, y0), (x1, y1) in zip(curve, curve[1:]):
        line_canvas.line(x0, y0, x1, y1)
    dot_canvas = BrailleCanvas(plot_width, plot_height)
    for x, y in dot_points:
        column, row = to_column(x), to_row(y)
        for dx, dy in ((0, 0), (1, 0), (0, 1), (1, 1)):  # a 2x2 blob stands out from the line
            dot_canvas.dot(column + dx, row + dy)

    rows: list[Row] = []
    for row in range(plot_height):
        if row == 0:
            label = format_value(shown(y_hi - pad))
        elif row == plot_height - 1:
            label = format_value(shown(y_lo + pad))
        else:
            label = ""
        runs: Row = [(f"{label:>{_LABEL_WIDTH - 1}}┤" if label else " " * (_LABEL_WIDTH - 1) + "│", "dim")]
        # One run per stretch of same-styled cells: far fewer segments for the terminal to draw.
        run_chars: list[str] = []
        run_style = ""
        for line_bits, dot_bits in zip(line_canvas.cells[row], dot_canvas.cells[row]):
            style = dot_style if dot_bits else line_style if line_bits else ""
            if style != run_style and run_chars:
                runs.append(("".join(run_chars), run_style))
                run_chars = []
            run_style = style
            run_chars.append(chr(0x2800 | dot_bits | line_bits) if style else " ")
        runs.append(("".join(run_chars), run_style))
        rows.append(runs)
    first, last = f"{x_lo:g}", f"{max(xs):g}"
    gap = max(plot_width - len(first) - len(last), 1)
    axis = f"{'log y':>{_LABEL_WIDTH - 1}} " if log_scale else " " * _LABEL_WIDTH
    rows.append([(axis + first + " " * gap + last, "dim")])
    return rows


_BLOCKS = "▁▂▃▄▅▆▇█"


def block_strip(values: Sequence[float]) -> str:
    """One block character per value, its height proportional to value / max(values)."""
    top = max(values, default=0.0)
    if top <= 0:
        return _BLOCKS[0] * len(values)
    return "".join(_BLOCKS[min(int(v / top * (len(_BLOCKS) - 1) + 0.5), len(_BLOCKS) - 1)] for v in values)
