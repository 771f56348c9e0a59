"""SVG plots for the eval report, drawn by matplotlib: scatter, line, step (histogram) and bar charts.

Each function returns one `<svg>` element ready to inline in HTML (no XML declaration, no DOCTYPE,
no script, no external reference) or to save as a .svg file. Text stays text (svg.fonttype "none"),
in DejaVu Sans, the font matplotlib measures with; the page lists the same fonts.

Rendering is deterministic: the same data gives byte-identical SVG, in any process. Matplotlib's
defaults replace any user style, the date and creator metadata are left out, and matplotlib's
hashed ids (markers, clip paths) are salted with the figure's id. Those ids are also prefixed with
`figure_id` and the unreferenced ones (figure_1, axes_1, ..., which matplotlib numbers afresh in
every file whatever the salt) are dropped, so several plots inlined in one page never share an id.

The object API only (`Figure` on an SVG canvas, which also measures the layout): no pyplot, no
global figure registry, no GUI backend, no Agg. Matplotlib's style settings are process-global, so
renders are serialized by a lock.

Values that cannot be drawn are skipped rather than fatal: NaN and infinities everywhere, and zero
or negative values on a log axis. A plot with nothing left to draw says "no data".
"""

from __future__ import annotations

import io
import logging
import math
import re
import threading
from dataclasses import dataclass
from html import escape
from typing import Callable, Sequence

import matplotlib.style
from cycler import cycler
from matplotlib.axes import Axes
from matplotlib.backends.backend_svg import FigureCanvasSVG
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter, NullLocator
from matplotlib.transforms import Bbox

__all__ = ["BarSeries", "ReferenceLine", "Series", "StepSeries", "bar_chart", "line_plot", "scatter_plot",
           "step_plot"]

logger = logging.getLogger(__name__)

PALETTE = ("#4e79a7", "#f28e2b", "#e15759", "#59a14f", "#b07aa1", "#76b7b2", "#edc948", "#9c755f", "#ff9da7",
           "#bab0ac")
FONT_FAMILY = "DejaVu Sans"  # matplotlib ships it and measures text with it; the SVG adds the generic sans-serif
FONT_SIZE = 12
TICK_FONT_SIZE = 11
MARKER_SIZE = 9  # points: the scatter's dots
MAX_CATEGORY_LABEL = 24  # characters; longer bar labels are cut (the report's tables carry the full names)
REFERENCE_STYLE = {"color": "#6b7280", "linewidth": 1.25, "linestyle": (0, (6, 4))}
REFERENCE_TEXT = "#4b5563"
STYLE = {
    "svg.fonttype": "none",  # text as <text>: small, selectable, searchable
    "font.family": "sans-serif",
    "font.sans-serif": [FONT_FAMILY],
    "font.size": FONT_SIZE,
    "axes.labelsize": FONT_SIZE,
    "legend.fontsize": FONT_SIZE,
    "xtick.labelsize": TICK_FONT_SIZE,
    "ytick.labelsize": TICK_FONT_SIZE,
    "text.color": "#1f2937",
    "axes.labelcolor": "#1f2937",
    "axes.edgecolor": "#374151",
    "xtick.color": "#374151",
    "ytick.color": "#374151",
    "axes.grid": True,
    "axes.axisbelow": True,
    "grid.color": "#e5e7eb",
    "grid.linewidth": 1.0,
    "axes.prop_cycle": cycler(color=PALETTE),
    "axes.formatter.useoffset": False,  # "5.50" rather than "0.03 + 5.47"
    "lines.linewidth": 1.75,
    "lines.scale_dashes": False,  # dash lengths in points, whatever the line width
    "legend.frameon": False,
    "figure.dpi": 72,  # display units are points, as in the SVG
}
_METADATA = {"Date": None, "Creator": None, "Format": None, "Type": None}  # no <metadata>: nothing that varies
_RENDER_LOCK = threading.Lock()
_FIGURE_ID = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")
_TAG = re.compile(r"<[^<>]+>")  # matplotlib escapes < and > in text and attributes, so this finds tags only
_DEFAULT_STYLE = re.compile(r"\s*<defs>\s*<style type=\"text/css\">\*\{([^}]*)\}</style>\s*</defs>")
_REFERENCE = re.compile(r'(?:xlink:href="#|url\(#)([^")]+)')
_ID = re.compile(r' id="([^"]+)"')
_IDENTITY_ROTATION = re.compile(r' transform="rotate\(-0 [^")]*\)"')


@dataclass(frozen=True)
class Series:
    """Points of one named series: `xs` and `ys` pair up; `labels`, one per point, are written next to the points."""

    name: str
    xs: Sequence[float]
    ys: Sequence[float]
    labels: Sequence[str] | None = None


@dataclass(frozen=True)
class StepSeries:
    """A histogram outline: `values[i]` holds over [edges[i], edges[i + 1]] (len(edges) == len(values) + 1)."""

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


# --- public plots -------------------------------------------------------------------------------------------


def scatter_plot(series: Sequence[Series], *, x_title: str, y_title: str, figure_id: str,
                 references: Sequence[ReferenceLine] = (), width: int = 600, height: int = 400) -> str:
    """Points per series (x, y in data units), each labelled beside its point where a label is given, at a
    spot that overlaps no other point or label; reference lines (e.g. the base's perplexity) dashed, labelled.

    `width` and `height` are the SVG's size in points (1/72 inch, the viewBox's units); `figure_id` (letters,
    digits, - and _) must be unique among the plots of one page: it prefixes the SVG's element ids.
    """
    cleaned = [_drawable_points(s, log_x=False, log_y=False) for s in series]

    def draw(ax: Axes):
        _plot_series(ax, series, cleaned, linestyle="none", marker="o", markersize=MARKER_SIZE,
                     markeredgecolor="white", markeredgewidth=1, zorder=3)
        ax.margins(0.08)
        reference_labels = _references(ax, references, log_x=False, log_y=False)
        ax.set(xlabel=x_title, ylabel=y_title)
        _settle(ax, legend=True)
        radius = (MARKER_SIZE / 2 + 1) * ax.get_figure().dpi / 72
        taken = []
        for points in cleaned:
            for x, y, _ in points:
                px, py = ax.transData.transform((x, y))
                taken.append(Bbox.from_extents(px - radius, py - radius, px + radius, py + radius))
        _place_reference_labels(ax, reference_labels, taken)
        for points in cleaned:
            for x, y, label in points:
                if label:
                    annotation = ax.annotate(label, (x, y), annotation_clip=False)
                    _place(annotation, [((x, y), *spot) for spot in _POINT_SPOTS], taken, ax)

    return _render_series(figure_id, f"{y_title} vs {x_title}", width, height, cleaned, draw)


def line_plot(series: Sequence[Series], *, x_title: str, y_title: str, figure_id: str, log_x: bool = False,
              log_y: bool = False, integer_x: bool = False, y_from_zero: bool = False, markers: bool = True,
              references: Sequence[ReferenceLine] = (), width: int = 600, height: int = 400) -> str:
    """One line per series, points joined in the given order (undrawable points are left out).

    Sizes and `figure_id` as for `scatter_plot`.
    """
    cleaned = [_drawable_points(s, log_x=log_x, log_y=log_y) for s in series]

    def draw(ax: Axes):
        _plot_series(ax, series, cleaned, marker="o" if markers else "", markersize=5.5)
        drawn = [p for points in cleaned for p in points]
        if log_x:
            _log_axis(ax, "x", [x for x, _, _ in drawn] + _reference_values(references, "x", log=True), pad=0.03)
        elif integer_x:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if log_y:
            _log_axis(ax, "y", [y for _, y, _ in drawn] + _reference_values(references, "y", log=True), pad=0.03)
        reference_labels = _references(ax, references, log_x=log_x, log_y=log_y)
        if y_from_zero and not log_y:
            ax.set_ylim(bottom=min(0.0, ax.get_ylim()[0]))
        ax.set(xlabel=x_title, ylabel=y_title)
        _settle(ax, legend=True)
        _place_reference_labels(ax, reference_labels, [])

    return _render_series(figure_id, f"{y_title} vs {x_title}", width, height, cleaned, draw)


def _plot_series(ax: Axes, series: Sequence[Series], cleaned: list, **style):
    """Each series' drawable points (x, y, label) in its colour, named in the legend."""
    for index, (s, points) in enumerate(zip(series, cleaned)):
        if points:
            ax.plot([x for x, _, _ in points], [y for _, y, _ in points], color=_color(index), label=s.name, **style)


def _render_series(figure_id: str, title: str, width: int, height: int, cleaned: list, draw) -> str:
    """`draw` rendered, or the "no data" figure when no series has a drawable point."""
    return _render(figure_id, title, width, height, draw if any(cleaned) else _no_data)


def step_plot(series: Sequence[StepSeries], *, x_title: str, y_title: str, figure_id: str, log_x: bool = True,
              references: Sequence[ReferenceLine] = (), width: int = 600, height: int = 400) -> str:
    """Histogram outlines over shared axes (y from zero); bins with an undrawable edge or value are skipped.

    Sizes and `figure_id` as for `scatter_plot`.
    """
    title = f"{y_title} vs {x_title}"
    runs_per_series = [_drawable_bins(s, log_x=log_x) for s in series]
    if not any(runs_per_series):
        return _render(figure_id, title, width, height, _no_data)

    def draw(ax: Axes):
        filled = len(series) == 1  # overlapping fills blend into mud
        for index, (s, runs) in enumerate(zip(series, runs_per_series)):
            for number, run in enumerate(runs):
                edges = [run[0][0]] + [hi for _, hi, _ in run]
                values = [value for _, _, value in run]
                if filled:
                    ax.stairs(values, edges, fill=True, color=_color(index), alpha=0.12, linewidth=0)
                ax.stairs(values, edges, color=_color(index), label=s.name if number == 0 else None)
        bins = [b for runs in runs_per_series for run in runs for b in run]
        xs = [edge for lo, hi, _ in bins for edge in (lo, hi)] + _reference_values(references, "x", log=log_x)
        if log_x:
            _log_axis(ax, "x", xs)
        else:
            ax.set_xlim(min(xs), max(xs))
        reference_labels = _references(ax, references, log_x=log_x, log_y=False)
        ax.set_ylim(bottom=min(0.0, ax.get_ylim()[0]))
        ax.set(xlabel=x_title, ylabel=y_title)
        _settle(ax, legend=True)
        _place_reference_labels(ax, reference_labels, [])

    return _render(figure_id, title, width, height, draw)


def bar_chart(categories: Sequence[str], series: Sequence[BarSeries], *, x_title: str, y_title: str, figure_id: str,
              width: int = 600, height: int = 400) -> str:
    """Vertical bars from zero, one per category (`values[i]` is category i's), grouped when there are several
    series. Sizes and `figure_id` as for `scatter_plot`."""
    title = f"{y_title} per {x_title}"
    if not categories or not any(_finite(v) for s in series for v in s.values):
        return _render(figure_id, title, width, height, _no_data)

    def draw(ax: Axes):
        bar_width = 0.8 / len(series)
        for index, s in enumerate(series):
            shift = -0.4 + (index + 0.5) * bar_width
            errors = list(s.errors) if s.errors is not None else []
            errors += [None] * (len(s.values) - len(errors))
            bars = [(position + shift, value, error) for position, (value, error) in enumerate(zip(s.values, errors))
                    if position < len(categories) and _finite(value)]
            if bars:
                ax.bar([x for x, _, _ in bars], [value for _, value, _ in bars], width=bar_width,
                       color=_color(index), label=s.name)
            whiskers = [(x, value, error) for x, value, error in bars if _finite(error) and error > 0]
            if whiskers:
                ax.errorbar([x for x, _, _ in whiskers], [value for _, value, _ in whiskers],
                            yerr=[error for _, _, error in whiskers], fmt="none", ecolor="#1f2937", elinewidth=1,
                            capsize=3)
        ax.set_xlim(-0.5, len(categories) - 0.5)
        ax.set_ylim(bottom=min(0.0, ax.get_ylim()[0]))
        ax.grid(False, axis="x")
        ax.set(xlabel=x_title, ylabel=y_title)
        ax.set_xticks(range(len(categories)), [_shorten(c) for c in categories])

        def rotate_if_crowded() -> bool:
            band = ax.get_window_extent().width / len(categories)
            if max(label.get_window_extent().width for label in ax.get_xticklabels()) <= band - 4:
                return False
            every = max(1, math.ceil((TICK_FONT_SIZE + 2) / band))  # rotated labels still need a line each
            ax.set_xticks(range(0, len(categories), every), [_shorten(c) for c in categories[::every]],
                          rotation=45, ha="right", rotation_mode="anchor")
            return True

        _settle(ax, legend=len(series) > 1, adjust=rotate_if_crowded)

    return _render(figure_id, title, width, height, draw)


# --- data cleaning --------------------------------------------------------------------------------------------


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _drawable(value, log: bool) -> bool:
    return _finite(value) and (value > 0 or not log)


def _drawable_points(series: Series, *, log_x: bool, log_y: bool) -> list[tuple[float, float, str]]:
    labels = list(series.labels) if series.labels is not None else []
    labels += [""] * (len(series.xs) - len(labels))
    points = [(x, y, label) for x, y, label in zip(series.xs, series.ys, labels)
              if _drawable(x, log_x) and _drawable(y, log_y)]
    if len(points) < min(len(series.xs), len(series.ys)):
        logger.debug("%s: %d undrawable point(s) left out", series.name,
                     min(len(series.xs), len(series.ys)) - len(points))
    return points


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


def _reference_values(references: Sequence[ReferenceLine], axis: str, log: bool) -> list[float]:
    return [r.value for r in references if r.axis == axis and _drawable(r.value, log)]


def _shorten(label: str) -> str:
    return label if len(label) <= MAX_CATEGORY_LABEL else label[: MAX_CATEGORY_LABEL - 1] + "\u2026"


# --- axes, legend, labels -------------------------------------------------------------------------------------------


def _color(index: int) -> str:
    return PALETTE[index % len(PALETTE)]


_SUPERSCRIPT = str.maketrans("-0123456789", "\u207b\u2070\u00b9\u00b2\u00b3\u2074\u2075\u2076\u2077\u2078\u2079")


def _power_label(exponent: int) -> str:
    """1, 10, 10², 10⁻⁷: plain text (no mathtext), so the SVG holds the label as one string."""
    return f"{10 ** exponent}" if exponent in (0, 1) else "10" + str(exponent).translate(_SUPERSCRIPT)


def _log_axis(ax: Axes, which: str, values: Sequence[float], pad: float = 0.0):
    """A log axis over whole decades around `values` (all > 0), labelled at the decades; `pad`, a fraction of
    the span, leaves room beyond the outer decades (for markers that sit on one)."""
    lo = math.floor(math.log10(min(values)))
    hi = math.ceil(math.log10(max(values)))
    hi += hi == lo
    axis = ax.xaxis if which == "x" else ax.yaxis
    (ax.set_xscale if which == "x" else ax.set_yscale)("log")
    margin = (hi - lo) * pad
    (ax.set_xlim if which == "x" else ax.set_ylim)(10.0 ** (lo - margin), 10.0 ** (hi + margin))
    label_every = math.ceil((hi - lo) / 8)  # a tick at every decade, at most ~9 labels across

    def label(value: float, _position) -> str:
        exponent = round(math.log10(value))
        return _power_label(exponent) if (exponent - lo) % label_every == 0 else ""

    axis.set_major_locator(LogLocator(base=10, numticks=hi - lo + 3))
    axis.set_major_formatter(FuncFormatter(label))
    axis.set_minor_locator(LogLocator(base=10, subs=range(2, 10), numticks=12) if hi - lo <= 6 else NullLocator())
    axis.set_minor_formatter(NullFormatter())


def _references(ax: Axes, references: Sequence[ReferenceLine], *, log_x: bool, log_y: bool) -> list:
    """Dashed lines for the drawable references (the axes then span them); their labels, placed later."""
    drawn = []
    for reference in references:
        vertical = reference.axis == "x"
        if not _drawable(reference.value, log_x if vertical else log_y):
            continue
        (ax.axvline if vertical else ax.axhline)(reference.value, zorder=2, **REFERENCE_STYLE)
        drawn.append(reference)
    return drawn


_LEGEND = {"loc": "lower left", "bbox_to_anchor": (0, 1.01), "borderaxespad": 0, "handlelength": 1.8,
           "columnspacing": 1.6}


def _settle(ax: Axes, *, legend: bool, adjust: Callable[[], bool] | None = None):
    """Lay the figure out, with the legend above the plot area in as many columns as fit its width, then fix the
    layout, so labels placed afterwards see the final positions. `adjust`, called once the plot area has its
    size, returns whether it changed something that needs another layout pass."""
    figure = ax.get_figure()
    handles, labels = ax.get_legend_handles_labels()
    legend = legend and bool(handles)
    if legend:  # first as wide as the figure allows (any wider and the layout collapses), then as the plot area
        columns = _legend_columns(ax, handles, labels, len(handles), figure.bbox.width)
    figure.draw_without_rendering()
    changed = adjust() if adjust else False
    if legend:
        fitted = _legend_columns(ax, handles, labels, columns, ax.get_window_extent().width)
        changed = changed or fitted < columns  # more rows: only the plot area's height changes
    if changed:
        figure.draw_without_rendering()
    figure.set_layout_engine("none")


def _legend_columns(ax: Axes, handles, labels, columns: int, room: float) -> int:
    """Legend above the plot area with the most columns, up to `columns`, whose width fits in `room`."""
    box = ax.legend(handles, labels, ncols=columns, **_LEGEND)
    while columns > 1 and box.get_window_extent().width > room:
        columns -= 1
        box = ax.legend(handles, labels, ncols=columns, **_LEGEND)
    return columns


_POINT_SPOTS = (((8, 0), "left", "center"), ((-8, 0), "right", "center"), ((0, 8), "center", "bottom"),
                ((0, -8), "center", "top"), ((8, 7), "left", "bottom"), ((8, -7), "left", "top"),
                ((-8, 7), "right", "bottom"), ((-8, -7), "right", "top"))


def _place_reference_labels(ax: Axes, references: Sequence[ReferenceLine], taken: list[Bbox]):
    """Each label near an end of its line, at the first spot that overlaps nothing placed so far."""
    for reference in references:
        if reference.axis == "x":  # vertical: beside the line's top, else its bottom
            coordinates = ("data", "axes fraction")
            top, bottom = (reference.value, 1.0), (reference.value, 0.0)
            spots = [(top, (4, -4), "left", "top"), (top, (-4, -4), "right", "top"),
                     (bottom, (4, 4), "left", "bottom"), (bottom, (-4, 4), "right", "bottom")]
        else:  # horizontal: over or under the line's right end, else its left end
            coordinates = ("axes fraction", "data")
            right, left = (1.0, reference.value), (0.0, reference.value)
            spots = [(right, (-4, 3), "right", "bottom"), (right, (-4, -3), "right", "top"),
                     (left, (4, 3), "left", "bottom"), (left, (4, -3), "left", "top")]
        annotation = ax.annotate(reference.label, spots[0][0], xycoords=coordinates, color=REFERENCE_TEXT,
                                 annotation_clip=False)
        _place(annotation, spots, taken, ax)


def _place(annotation, spots, taken: list[Bbox], ax: Axes):
    """Move `annotation` to the first (anchor, offset in points, ha, va) spot whose box stays in the plot area
    and overlaps no box in `taken` (else the first spot in the plot area, else the first spot); its box then
    joins `taken`. The boxes are measured, in the final layout, by the renderer that draws the text."""
    area = ax.get_window_extent()
    boxes = []
    for spot in spots:
        _move(annotation, *spot)
        boxes.append(annotation.get_window_extent())
    inside = [i for i, box in enumerate(boxes)
              if area.x0 <= box.x0 and box.x1 <= area.x1 and area.y0 <= box.y0 and box.y1 <= area.y1]
    inside = inside or list(range(len(spots)))
    chosen = next((i for i in inside if not any(boxes[i].overlaps(box) for box in taken)), inside[0])
    _move(annotation, *spots[chosen])
    taken.append(boxes[chosen])


def _move(annotation, anchor, offset, ha: str, va: str):
    annotation.xy = anchor
    annotation.xyann = offset
    annotation.set_anncoords("offset points")
    annotation.set_horizontalalignment(ha)
    annotation.set_verticalalignment(va)


# --- rendering ------------------------------------------------------------------------------------------------------


def _render(figure_id: str, title: str, width: float, height: float, draw: Callable[[Axes], None]) -> str:
    """One figure of `width` x `height` points with one plot area, drawn by `draw`, as inline SVG."""
    if not _FIGURE_ID.fullmatch(figure_id):
        raise ValueError(f"figure_id {figure_id!r}: letters, digits, - and _ only, starting with a letter")
    buffer = io.StringIO()
    # "default" first: the user's matplotlibrc and styles never reach the report
    with _RENDER_LOCK, matplotlib.style.context(["default", {**STYLE, "svg.hashsalt": f"quantkit:{figure_id}"}]):
        figure = Figure(figsize=(width / 72, height / 72), layout="constrained")
        FigureCanvasSVG(figure)  # layout and text extents measured by the SVG renderer too
        draw(figure.add_subplot())
        figure.savefig(buffer, format="svg", metadata=_METADATA)
    return _inline(buffer.getvalue(), figure_id, title)


def _no_data(ax: Axes):
    """An empty, light frame that says so."""
    ax.set(xticks=[], yticks=[])
    ax.spines[:].set_color("#d1d5db")
    ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center", color="#6b7280")


def _inline(svg: str, figure_id: str, title: str) -> str:
    """Matplotlib's SVG file as an element for an HTML page: no XML declaration or DOCTYPE; the ids that
    something refers to prefixed with `figure_id` (the rest, matplotlib's figure_1, axes_1, ... group
    names, dropped); `href` for SVG 1.1's `xlink:href`, so no namespace but SVG's; the default stroke style
    as attributes of the root (a <style> in inline SVG would style the whole page); a <title>, the plot's
    accessible name; no indentation, no line breaks in path data, no identity rotations."""
    svg = svg[svg.index("<svg"):]
    default_style = _DEFAULT_STYLE.search(svg)
    svg = _DEFAULT_STYLE.sub("", svg, count=1)
    referenced = set(_REFERENCE.findall(svg))
    prefix = f"{figure_id}-"

    def rewrite(tag: re.Match) -> str:
        text = _IDENTITY_ROTATION.sub("", re.sub(r"\s*\n\s*", " ", tag.group(0)))
        text = _ID.sub(lambda m: f' id="{prefix}{m.group(1)}"' if m.group(1) in referenced else "", text)
        return text.replace('xlink:href="#', f'href="#{prefix}').replace("url(#", f"url(#{prefix}")

    svg = re.sub(r">\s*\n\s*<", "><", _TAG.sub(rewrite, svg))
    root_end = svg.index(">") + 1
    root = svg[:root_end].replace(' xmlns:xlink="http://www.w3.org/1999/xlink"', "")
    attributes = ' role="img"'
    if default_style:
        attributes += "".join(f' {name.strip()}="{value.strip()}"' for name, value in
                              (declaration.split(":") for declaration in default_style.group(1).split(";")))
    root = root.replace("<svg", "<svg" + attributes, 1)
    return f"{root}<title>{escape(title, quote=False)}</title>{svg[root_end:].strip()}"
