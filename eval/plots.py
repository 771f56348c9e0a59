"""Small dependency-free SVG plots for the eval report: scatter, line, step (histogram) and bar charts.

Each function returns one standalone `<svg>` string that can be inlined in HTML or saved as a .svg
file. Sizes are user units in a viewBox, so the page can scale them. Label and legend layout uses
an estimated glyph width (there is no font metrics engine here), so it errs on the generous side.

Values that cannot be drawn are skipped rather than fatal: NaN and infinities everywhere, and zero
or negative values on a log axis. A plot with nothing left to draw says "no data".
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from html import escape
from typing import Sequence

__all__ = ["BarSeries", "ReferenceLine", "Series", "StepSeries", "bar_chart", "line_plot", "scatter_plot",
           "step_plot"]

PALETTE = ("#4e79a7", "#f28e2b", "#e15759", "#59a14f", "#b07aa1", "#76b7b2", "#edc948", "#9c755f", "#ff9da7",
           "#bab0ac")
FONT_FAMILY = "DejaVu Sans, Helvetica, Arial, sans-serif"
FONT_SIZE = 12
TICK_FONT_SIZE = 11
GLYPH_WIDTH = 0.6  # average advance of a sans-serif glyph, in ems: wide enough for DejaVu Sans digits
MAX_CATEGORY_LABEL = 24  # characters; longer bar labels are cut (the full name stays in a tooltip)


@dataclass(frozen=True)
class Series:
    """Points of one named series. `labels`, one per point, are written next to the points."""

    name: str
    xs: Sequence[float]
    ys: Sequence[float]
    labels: Sequence[str] | None = None


@dataclass(frozen=True)
class StepSeries:
    """A histogram outline: `values[i]` holds over [edges[i], edges[i + 1]]."""

    name: str
    edges: Sequence[float]
    values: Sequence[float]


@dataclass(frozen=True)
class BarSeries:
    """One bar per category (None: no bar); `errors` draws +-error whiskers."""

    name: str
    values: Sequence[float | None]
    errors: Sequence[float | None] | None = None


@dataclass(frozen=True)
class ReferenceLine:
    """A dashed line across the plot: axis "y" is horizontal at y=value, axis "x" vertical at x=value."""

    value: float
    label: str
    axis: str = "y"


@dataclass(frozen=True)
class _Axis:
    lo: float
    hi: float
    log: bool
    ticks: tuple[float, ...]
    labels: tuple[str, ...]
    minor_ticks: tuple[float, ...] = ()

    def fraction(self, value: float) -> float:
        if self.log:
            return (math.log10(value) - math.log10(self.lo)) / (math.log10(self.hi) - math.log10(self.lo))
        return (value - self.lo) / (self.hi - self.lo)


@dataclass(frozen=True)
class _Frame:
    """The plot area in pixels and the axes that map data into it."""

    width: float
    height: float
    left: float
    right: float
    top: float
    bottom: float
    x: _Axis | None  # None: categorical (bar charts place their own bands)
    y: _Axis

    def px(self, value: float) -> float:
        return self.left + self.x.fraction(value) * (self.right - self.left)

    def py(self, value: float) -> float:
        return self.bottom - self.y.fraction(value) * (self.bottom - self.top)


@dataclass(frozen=True)
class _Box:
    x0: float
    y0: float
    x1: float
    y1: float

    def overlaps(self, other: _Box) -> bool:
        return self.x0 < other.x1 and other.x0 < self.x1 and self.y0 < other.y1 and other.y0 < self.y1

    def inside(self, frame: _Frame) -> bool:
        return self.x0 >= frame.left and self.x1 <= frame.right and self.y0 >= frame.top and self.y1 <= frame.bottom


def _plotted_values(series: Sequence[Series], references: Sequence[ReferenceLine], log_x: bool, log_y: bool):
    """(drawable points per series, every x, every y): the points and the reference lines the axes must span."""
    cleaned = [_drawable_points(s, log_x=log_x, log_y=log_y) for s in series]
    xs = [x for points in cleaned for x, _, _ in points] + _reference_values(references, "x", log=log_x)
    ys = [y for points in cleaned for _, y, _ in points] + _reference_values(references, "y", log=log_y)
    return cleaned, xs, ys


# --- public plots -------------------------------------------------------------------------------------------


def scatter_plot(series: Sequence[Series], *, x_title: str, y_title: str,
                 references: Sequence[ReferenceLine] = (), width: int = 600, height: int = 400) -> str:
    """Points per series, each optionally labelled; reference lines (e.g. the base's perplexity) dashed."""
    cleaned, xs, ys = _plotted_values(series, references, log_x=False, log_y=False)
    if not any(cleaned):
        return _no_data(width, height, f"{y_title} vs {x_title}")
    x_axis = _linear_axis(xs, pad=0.08, extend_to_ticks=False, target_ticks=_x_ticks(width))
    frame = _layout(width, height, x_axis, _linear_axis(ys, pad=0.08), legend_names=[s.name for s in series])
    taken: list[_Box] = [_Box(frame.px(x) - 4, frame.py(y) - 4, frame.px(x) + 4, frame.py(y) + 4)
                         for points in cleaned for x, y, _ in points]
    parts = [_axes(frame, x_title, y_title), _references(frame, references, taken)]
    for index, points in enumerate(cleaned):
        color = _color(index)
        for x, y, label in points:
            parts.append(f'<circle cx="{frame.px(x):.1f}" cy="{frame.py(y):.1f}" r="4.5" fill="{color}" '
                         f'stroke="white" stroke-width="1"><title>{escape(_point_tooltip(label, x, y))}</title>'
                         f'</circle>')
            if label:
                parts.append(_point_label(frame, frame.px(x), frame.py(y), label, taken))
    parts.append(_legend(frame, [(s.name, _color(i), "marker") for i, s in enumerate(series)]))
    return _svg(width, height, f"{y_title} vs {x_title}", parts)


def line_plot(series: Sequence[Series], *, x_title: str, y_title: str, log_x: bool = False, log_y: bool = False,
              integer_x: bool = False, y_from_zero: bool = False, markers: bool = True,
              references: Sequence[ReferenceLine] = (), width: int = 600, height: int = 400) -> str:
    """One polyline per series, points joined in the given order."""
    cleaned, xs, ys = _plotted_values(series, references, log_x=log_x, log_y=log_y)
    if not any(cleaned):
        return _no_data(width, height, f"{y_title} vs {x_title}")
    x_axis = _log_axis(xs) if log_x else _linear_axis(xs, pad=0.03, integer=integer_x, extend_to_ticks=False,
                                                      target_ticks=_x_ticks(width))
    y_axis = _log_axis(ys) if log_y else _linear_axis(ys, pad=0.05, include_zero=y_from_zero)
    frame = _layout(width, height, x_axis, y_axis, legend_names=[s.name for s in series])
    parts = [_axes(frame, x_title, y_title), _references(frame, references, [])]
    for index, points in enumerate(cleaned):
        color = _color(index)
        coordinates = " ".join(f"{frame.px(x):.1f},{frame.py(y):.1f}" for x, y, _ in points)
        parts.append(f'<polyline points="{coordinates}" fill="none" stroke="{color}" stroke-width="1.75" '
                     f'stroke-linejoin="round"/>')
        if markers:
            parts.extend(f'<circle cx="{frame.px(x):.1f}" cy="{frame.py(y):.1f}" r="2.75" fill="{color}">'
                         f'<title>{escape(_point_tooltip(series[index].name, x, y))}</title></circle>'
                         for x, y, _ in points)
    parts.append(_legend(frame, [(s.name, _color(i), "line") for i, s in enumerate(series)]))
    return _svg(width, height, f"{y_title} vs {x_title}", parts)


def step_plot(series: Sequence[StepSeries], *, x_title: str, y_title: str, log_x: bool = True,
              references: Sequence[ReferenceLine] = (), width: int = 600, height: int = 400) -> str:
    """Histogram outlines over shared axes (y from zero); bins with an undrawable edge or value are skipped."""
    runs_per_series = [_drawable_bins(s, log_x=log_x) for s in series]
    if not any(runs_per_series):
        return _no_data(width, height, f"{y_title} vs {x_title}")
    bins = [b for runs in runs_per_series for run in runs for b in run]
    xs = [edge for lo, hi, _ in bins for edge in (lo, hi)] + _reference_values(references, "x", log=log_x)
    ys = [value for _, _, value in bins]
    x_axis = _log_axis(xs) if log_x else _linear_axis(xs, pad=0.0, extend_to_ticks=False,
                                                      target_ticks=_x_ticks(width))
    frame = _layout(width, height, x_axis, _linear_axis(ys, pad=0.05, include_zero=True),
                    legend_names=[s.name for s in series])
    parts = [_axes(frame, x_title, y_title), _references(frame, references, [])]
    fill_opacity = 0.12 if len(series) == 1 else 0  # overlapping fills blend into mud
    for index, runs in enumerate(runs_per_series):
        path = " ".join(_step_path(frame, run) for run in runs)
        parts.append(f'<path d="{path}" fill="{_color(index)}" fill-opacity="{fill_opacity}" '
                     f'stroke="{_color(index)}" stroke-width="1.75" stroke-linejoin="round"/>')
    parts.append(_legend(frame, [(s.name, _color(i), "line") for i, s in enumerate(series)]))
    return _svg(width, height, f"{y_title} vs {x_title}", parts)


def bar_chart(categories: Sequence[str], series: Sequence[BarSeries], *, x_title: str, y_title: str,
              width: int = 600, height: int = 400) -> str:
    """Vertical bars from zero, grouped per category when there are several series."""
    values = [v for s in series for v in _bar_extents(s)]
    if not categories or not values:
        return _no_data(width, height, f"{y_title} per {x_title}")
    labels = [_shorten(c) for c in categories]
    rotate = _needs_rotation(labels, width, len(categories))
    label_room = (max(len(label) for label in labels) * GLYPH_WIDTH * TICK_FONT_SIZE * 0.7 + 14) if rotate else 20
    frame = _layout(width, height, None, _linear_axis(values, pad=0.05, include_zero=True),
                    legend_names=[s.name for s in series] if len(series) > 1 else [], bottom_room=label_room)
    parts = [_axes(frame, x_title, y_title, x_title_offset=label_room), _category_labels(frame, labels, categories,
                                                                                         rotate)]
    band = (frame.right - frame.left) / len(categories)
    bar_width = band * 0.8 / max(len(series), 1)
    for index, s in enumerate(series):
        for position, value in enumerate(s.values):
            if not _finite(value):
                continue
            x0 = frame.left + position * band + band * 0.1 + index * bar_width
            parts.append(_bar(frame, x0, bar_width, value, _color(index), f"{s.name}: {categories[position]}"))
            error = s.errors[position] if s.errors is not None and position < len(s.errors) else None
            if _finite(error) and error > 0:
                parts.append(_whisker(frame, x0 + bar_width / 2, value, error))
    if len(series) > 1:
        parts.append(_legend(frame, [(s.name, _color(i), "bar") for i, s in enumerate(series)]))
    return _svg(width, height, f"{y_title} per {x_title}", parts)


# --- data cleaning --------------------------------------------------------------------------------------------


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _drawable(value, log: bool) -> bool:
    return _finite(value) and (value > 0 or not log)


def _drawable_points(series: Series, *, log_x: bool, log_y: bool) -> list[tuple[float, float, str]]:
    labels = list(series.labels) if series.labels is not None else []
    labels += [""] * (len(series.xs) - len(labels))
    return [(x, y, label) for x, y, label in zip(series.xs, series.ys, labels)
            if _drawable(x, log_x) and _drawable(y, log_y)]


def _drawable_bins(series: StepSeries, *, log_x: bool) -> list[list[tuple[float, float, float]]]:
    """Contiguous runs of drawable bins (lo, hi, value); a skipped bin breaks the outline."""
    runs: list[list[tuple[float, float, float]]] = []
    current: list[tuple[float, float, float]] = []
    for lo, hi, value in zip(series.edges, series.edges[1:], series.values):
        if _drawable(lo, log_x) and _drawable(hi, log_x) and hi > lo and _finite(value):
            current.append((lo, hi, value))
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return runs


def _bar_extents(series: BarSeries) -> list[float]:
    """The values a bar and its whisker reach, so the y axis covers them."""
    errors = list(series.errors) if series.errors is not None else []
    errors += [None] * (len(series.values) - len(errors))
    extents = []
    for value, error in zip(series.values, errors):
        if _finite(value):
            extents.append(value)
            if _finite(error):
                extents.append(value + abs(error))
    return extents


def _reference_values(references: Sequence[ReferenceLine], axis: str, log: bool) -> list[float]:
    return [r.value for r in references if r.axis == axis and _drawable(r.value, log)]


# --- axes and ticks -------------------------------------------------------------------------------------------


def _nice_step(raw: float) -> float:
    magnitude = 10 ** math.floor(math.log10(raw))
    for multiple in (1, 2, 2.5, 5, 10):
        if raw <= multiple * magnitude:
            return multiple * magnitude
    return 10 * magnitude


def _linear_axis(values: Sequence[float], *, pad: float, include_zero: bool = False, integer: bool = False,
                 extend_to_ticks: bool = True, target_ticks: int = 6) -> _Axis:
    """Ticks at a 1-2-2.5-5 step; `extend_to_ticks` widens the range to the outer ticks (y axes), otherwise
    the range stays the padded data range (x axes, where widening would waste a whole step of width)."""
    lo, hi = min(values), max(values)
    if include_zero:
        lo, hi = min(lo, 0.0), max(hi, 0.0)
    if hi == lo:  # a single value: give it room on both sides
        spread = abs(lo) * 0.1 or 1.0
        lo, hi = lo - spread, hi + spread
    span = hi - lo
    if not (include_zero and lo == 0):
        lo -= span * pad
    if not (include_zero and hi == 0):
        hi += span * pad
    step = _nice_step((hi - lo) / (target_ticks - 1))
    if integer:
        step = max(1.0, round(step))
    first, last = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
    if extend_to_ticks:
        lo, hi = first * step, last * step
    slack = step * 1e-9
    ticks = tuple(t for t in (_snap(k * step, step) for k in range(first, last + 1)) if lo - slack <= t <= hi + slack)
    return _Axis(lo, hi, False, ticks, tuple(_linear_label(t, step, ticks) for t in ticks))


def _snap(value: float, step: float) -> float:
    """Remove float noise (0.30000000000000004) and negative zero from a tick."""
    snapped = round(value / step) * step
    return 0.0 if abs(snapped) < step * 1e-9 else float(f"{snapped:.12g}")


def _linear_label(value: float, step: float, ticks: Sequence[float]) -> str:
    """Fixed decimals, as many as the step needs (0.025 -> 3), so a column of ticks lines up; scientific
    only for very large or very small ticks."""
    largest = max((abs(t) for t in ticks), default=0.0) or step
    if 1e-4 <= largest < 1e6:
        decimals = max(0, -math.floor(math.log10(step) + 1e-9))
        if not math.isclose(round(step, decimals), step, rel_tol=1e-9):
            decimals += 1  # 2.5, 0.25, ...
        return f"{value:.{decimals}f}"
    digits = max(1, math.floor(math.log10(largest)) - math.floor(math.log10(step)) + 1)
    return f"{value:.{digits}g}"


def _log_axis(values: Sequence[float]) -> _Axis:
    lo_exp = math.floor(math.log10(min(values)))
    hi_exp = math.ceil(math.log10(max(values)))
    if hi_exp == lo_exp:
        hi_exp += 1
    decades = hi_exp - lo_exp
    label_every = math.ceil(decades / 8)  # at most ~9 labels across
    ticks = tuple(10.0 ** k for k in range(lo_exp, hi_exp + 1))
    labels = tuple(_power_label(k) if (k - lo_exp) % label_every == 0 else "" for k in range(lo_exp, hi_exp + 1))
    minor = tuple(m * 10.0 ** k for k in range(lo_exp, hi_exp) for m in range(2, 10)) if decades <= 6 else ()
    return _Axis(10.0 ** lo_exp, 10.0 ** hi_exp, True, ticks, labels, minor)


_SUPERSCRIPT = str.maketrans("-0123456789", "\u207b\u2070\u00b9\u00b2\u00b3\u2074\u2075\u2076\u2077\u2078\u2079")


def _power_label(exponent: int) -> str:
    if exponent in (0, 1):
        return f"{10 ** exponent}"
    return "10" + str(exponent).translate(_SUPERSCRIPT)


# --- layout and drawing -----------------------------------------------------------------------------------------


def _x_ticks(width: float) -> int:
    """About one tick per 100 units, so wide plots get finer ticks."""
    return max(4, round(width / 100))


def _text_width(text: str, size: float = FONT_SIZE) -> float:
    return len(text) * GLYPH_WIDTH * size


def _color(index: int) -> str:
    return PALETTE[index % len(PALETTE)]


def _legend_rows(names: Sequence[str], width: float) -> list[list[tuple[int, str]]]:
    """Legend entries flowed left to right into rows that fit `width`."""
    rows: list[list[tuple[int, str]]] = [[]]
    used = 0.0
    for index, name in enumerate(names):
        entry = 28 + _text_width(name) + 16
        if rows[-1] and used + entry > width:
            rows.append([])
            used = 0.0
        rows[-1].append((index, name))
        used += entry
    return rows if rows[0] else []


def _layout(width: float, height: float, x: _Axis | None, y: _Axis, *, legend_names: Sequence[str],
            bottom_room: float = 20) -> _Frame:
    """Margins sized to the tick labels, the axis titles and a legend above the plot area."""
    y_label_width = max((_text_width(label, TICK_FONT_SIZE) for label in y.labels), default=0)
    left = 12 + FONT_SIZE + 10 + y_label_width + 8
    legend_height = len(_legend_rows(legend_names, width - left - 16)) * 18
    top = 14 + legend_height + (6 if legend_height else 0)
    bottom = height - (bottom_room + FONT_SIZE + 16)
    return _Frame(width, height, left, width - 16, top, bottom, x, y)


def _line(x1: float, y1: float, x2: float, y2: float, stroke: str) -> str:
    return f'<line x1="{x1:.1f}" x2="{x2:.1f}" y1="{y1:.1f}" y2="{y2:.1f}" stroke="{stroke}"/>'


def _tick_label(x: float, y: float, anchor: str, label: str) -> str:
    return f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}" font-size="{TICK_FONT_SIZE}">{escape(label)}</text>'


def _axes(frame: _Frame, x_title: str, y_title: str, x_title_offset: float = 20) -> str:
    parts = ['<g class="axes">']
    for tick, label in zip(frame.y.ticks, frame.y.labels):  # grid line, tick mark, label
        y = frame.py(tick)
        parts += [_line(frame.left, y, frame.right, y, "#e5e7eb"), _line(frame.left - 5, y, frame.left, y, "#374151"),
                  _tick_label(frame.left - 8, y + 4, "end", label)]
    if frame.x is not None:
        parts += [_line(frame.px(t), frame.bottom, frame.px(t), frame.bottom + 3, "#6b7280") for t in frame.x.minor_ticks]
        for tick, label in zip(frame.x.ticks, frame.x.labels):
            x = frame.px(tick)
            parts += [_line(x, frame.top, x, frame.bottom, "#e5e7eb"), _line(x, frame.bottom, x, frame.bottom + 5, "#374151"),
                      _tick_label(x, frame.bottom + 18, "middle", label)]
    parts.append(f'<rect x="{frame.left:.1f}" y="{frame.top:.1f}" width="{frame.right - frame.left:.1f}" '
                 f'height="{frame.bottom - frame.top:.1f}" fill="none" stroke="#374151"/>')
    middle_x, middle_y = (frame.left + frame.right) / 2, (frame.top + frame.bottom) / 2
    parts.append(f'<text x="{middle_x:.1f}" y="{frame.bottom + x_title_offset + FONT_SIZE + 6:.1f}" '
                 f'text-anchor="middle">{escape(x_title)}</text>')
    parts.append(f'<text transform="translate({12 + FONT_SIZE:.1f},{middle_y:.1f}) rotate(-90)" '
                 f'text-anchor="middle">{escape(y_title)}</text>')
    parts.append("</g>")
    return "".join(parts)


def _references(frame: _Frame, references: Sequence[ReferenceLine], taken: list[_Box]) -> str:
    """Dashed reference lines, each labelled at the first free spot near an end of the line; the label
    boxes join `taken`, so labels drawn later avoid them too."""
    parts = []
    for reference in references:
        vertical = reference.axis == "x"
        axis = frame.x if vertical else frame.y
        if axis is None or not _drawable(reference.value, axis.log) or not 0 <= axis.fraction(reference.value) <= 1:
            continue
        if vertical:
            x = frame.px(reference.value)
            line = f'x1="{x:.1f}" x2="{x:.1f}" y1="{frame.top:.1f}" y2="{frame.bottom:.1f}"'
            spots = [(x + 4, frame.top + 14, "start"), (x - 4, frame.top + 14, "end"),
                     (x + 4, frame.bottom - 6, "start"), (x - 4, frame.bottom - 6, "end")]
        else:
            y = frame.py(reference.value)
            line = f'x1="{frame.left:.1f}" x2="{frame.right:.1f}" y1="{y:.1f}" y2="{y:.1f}"'
            spots = [(frame.right - 4, y - 4, "end"), (frame.right - 4, y + 4 + FONT_SIZE, "end"),
                     (frame.left + 4, y - 4, "start"), (frame.left + 4, y + 4 + FONT_SIZE, "start")]
        parts.append(f'<line {line} stroke="#6b7280" stroke-width="1.25" stroke-dasharray="6 4"/>')
        parts.append(_place_label(frame, reference.label, spots, taken, fill="#4b5563"))
    return "".join(parts)


def _point_label(frame: _Frame, x: float, y: float, label: str, taken: list[_Box]) -> str:
    """The label at the first spot around the point that overlaps nothing drawn so far."""
    spots = [(x + 8, y + 4, "start"), (x - 8, y + 4, "end"), (x, y - 10, "middle"), (x, y + 20, "middle"),
             (x + 8, y - 10, "start"), (x + 8, y + 18, "start"), (x - 8, y - 10, "end"), (x - 8, y + 18, "end")]
    return _place_label(frame, label, spots, taken, fill="#111827")


def _place_label(frame: _Frame, label: str, spots: Sequence[tuple[float, float, str]], taken: list[_Box],
                 fill: str) -> str:
    """Text at the first (x, baseline y, anchor) spot whose box stays in the plot area and overlaps no box
    in `taken` (falling back to the first spot); its box is then added to `taken`."""
    width = _text_width(label)
    boxes = [_text_box(x, y, anchor, width) for x, y, anchor in spots]
    inside = [index for index, box in enumerate(boxes) if box.inside(frame)] or list(range(len(spots)))
    chosen = next((i for i in inside if not any(boxes[i].overlaps(box) for box in taken)), inside[0])
    taken.append(boxes[chosen])
    x, y, anchor = spots[chosen]
    return f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}" fill="{fill}">{escape(label)}</text>'


def _text_box(x: float, baseline: float, anchor: str, width: float) -> _Box:
    x0 = {"start": x, "middle": x - width / 2, "end": x - width}[anchor]
    return _Box(x0, baseline - FONT_SIZE, x0 + width, baseline + 3)


def _point_tooltip(name: str, x: float, y: float) -> str:
    return f"{name}: ({x:.4g}, {y:.4g})" if name else f"({x:.4g}, {y:.4g})"


def _legend(frame: _Frame, entries: Sequence[tuple[str, str, str]]) -> str:
    """Entries (name, color, "marker" | "line" | "bar") in rows above the plot area."""
    parts = ['<g class="legend">']
    for row_index, row in enumerate(_legend_rows([name for name, _, _ in entries], frame.right - frame.left)):
        x = frame.left
        y = 14 + row_index * 18
        for index, name in row:
            _, color, style = entries[index]
            if style == "marker":
                parts.append(f'<circle cx="{x + 10:.1f}" cy="{y - 4:.1f}" r="4.5" fill="{color}"/>')
            elif style == "bar":
                parts.append(f'<rect x="{x + 4:.1f}" y="{y - 10:.1f}" width="12" height="12" fill="{color}"/>')
            else:
                parts.append(f'<line x1="{x:.1f}" x2="{x + 20:.1f}" y1="{y - 4:.1f}" y2="{y - 4:.1f}" '
                             f'stroke="{color}" stroke-width="2.5"/>')
            parts.append(f'<text x="{x + 26:.1f}" y="{y:.1f}">{escape(name)}</text>')
            x += 28 + _text_width(name) + 16
    parts.append("</g>")
    return "".join(parts)


def _step_path(frame: _Frame, run: Sequence[tuple[float, float, float]]) -> str:
    """An outline that rises from zero at the first edge and returns to zero at the last."""
    zero = frame.py(0.0)
    commands = [f"M{frame.px(run[0][0]):.1f},{zero:.1f}"]
    for lo, hi, value in run:
        y = frame.py(value)
        commands.append(f"L{frame.px(lo):.1f},{y:.1f} L{frame.px(hi):.1f},{y:.1f}")
    commands.append(f"L{frame.px(run[-1][1]):.1f},{zero:.1f}")
    return " ".join(commands)


def _shorten(label: str) -> str:
    return label if len(label) <= MAX_CATEGORY_LABEL else label[: MAX_CATEGORY_LABEL - 1] + "\u2026"


def _needs_rotation(labels: Sequence[str], width: float, count: int) -> bool:
    band = (width - 100) / count
    return max(_text_width(label, TICK_FONT_SIZE) for label in labels) > band - 4


def _category_labels(frame: _Frame, labels: Sequence[str], full_names: Sequence[str], rotate: bool) -> str:
    band = (frame.right - frame.left) / len(labels)
    every = max(1, math.ceil((TICK_FONT_SIZE + 2) / band)) if rotate else 1  # rotated labels need a line each
    parts = []
    for position, (label, full_name) in enumerate(zip(labels, full_names)):
        if position % every:
            continue
        x = frame.left + (position + 0.5) * band
        y = frame.bottom + 14
        placement = (f'x="{x:.1f}" y="{y:.1f}" text-anchor="end" transform="rotate(-45 {x:.1f} {y:.1f})"'
                     if rotate else f'x="{x:.1f}" y="{y + 4:.1f}" text-anchor="middle"')
        parts.append(f'<text {placement} font-size="{TICK_FONT_SIZE}">{escape(label)}'
                     f'<title>{escape(full_name)}</title></text>')
    return "".join(parts)


def _bar(frame: _Frame, x0: float, width: float, value: float, color: str, tooltip: str) -> str:
    zero, top = frame.py(0.0), frame.py(value)
    y, height = min(zero, top), abs(zero - top)
    return (f'<rect x="{x0:.1f}" y="{y:.1f}" width="{width:.1f}" height="{height:.1f}" fill="{color}">'
            f'<title>{escape(tooltip)}: {value:.4g}</title></rect>')


def _whisker(frame: _Frame, x: float, value: float, error: float) -> str:
    lo, hi = frame.py(max(value - error, frame.y.lo)), frame.py(min(value + error, frame.y.hi))
    return (f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{lo:.1f}" y2="{hi:.1f}" stroke="#1f2937" stroke-width="1"/>'
            f'<line x1="{x - 3:.1f}" x2="{x + 3:.1f}" y1="{hi:.1f}" y2="{hi:.1f}" stroke="#1f2937" stroke-width="1"/>')


def _svg(width: float, height: float, title: str, parts: Sequence[str]) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" width="{width}" '
            f'height="{height}" role="img" font-family="{FONT_FAMILY}" font-size="{FONT_SIZE}" fill="#1f2937">'
            f'<title>{escape(title)}</title>{"".join(parts)}</svg>')


def _no_data(width: float, height: float, title: str) -> str:
    return _svg(width, height, title, [
        f'<rect x="0.5" y="0.5" width="{width - 1}" height="{height - 1}" fill="none" stroke="#d1d5db"/>',
        f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle" fill="#6b7280">no data</text>'])
