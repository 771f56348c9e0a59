"""Render a `quantkit eval` / `quantkit compare` report (the dict report.schema.json describes).

JSON is the report itself. Markdown and HTML are rendered from one list of blocks (headings,
paragraphs, tables, figures), so both show the same tables; the HTML adds SVG plots and is a single
self-contained page: inline CSS and SVG, no scripts, nothing fetched. Each plot has its own figure id
(perplexity, kl-distribution, output-error, weight-error, sensitivity-<n>), so the element ids of the
inlined SVGs never clash.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from html import escape
from importlib import resources
from pathlib import Path
from typing import Callable, Sequence, Union

from quantkit.eval import fidelity, plots
from quantkit.errors import QuantkitError
from quantkit.io.files import check_writable, write_text
from quantkit.model.layout import local_name
from quantkit.quant.record import BITS_PER_WEIGHT

__all__ = ["SCHEMA_NAME", "SCHEMA_VERSION", "SUFFIXES", "check_report_path", "load_schema", "noise_floor", "to_html",
           "to_json", "to_markdown", "write_report"]

SCHEMA_NAME = "quantkit-eval-report"
SCHEMA_VERSION = 1
SUFFIXES = (".json", ".md", ".html")
MISSING = "\u2013"  # en dash: a value the report does not have

# (key, column label) from max to min; the percentiles are the ones eval/fidelity.py computes
KL_PERCENTILES = (("max", "max"), *((key, key.replace("_", ".")) for key in fidelity.KL_PERCENTILES), ("min", "min"))
DELTA_P_PERCENTILES = (("max", "max"), *((key, key.replace("_", ".")) for key in fidelity.DP_PERCENTILES),
                       ("min", "min"))
KINDS = (("output", "Relative error of each linear's output"), ("weight", "Relative error of each linear's weight"))


# --- public API -------------------------------------------------------------------------------------------------


def load_schema() -> dict:
    """The JSON Schema (draft 2020-12) of the report dict."""
    return json.loads(resources.files(__package__).joinpath("report.schema.json").read_text(encoding="utf-8"))


def to_json(report: dict) -> str:
    _check_version(report)
    try:
        return json.dumps(report, indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    except ValueError:
        raise QuantkitError("the report holds a NaN or infinite number, which JSON cannot represent") from None


def to_markdown(report: dict) -> str:
    _check_version(report)
    blocks = (_markdown_block(block) for block in _document(report, with_figures=False))
    return "\n\n".join(block for block in blocks if block) + "\n"


def to_html(report: dict) -> str:
    _check_version(report)
    title = f"quantkit report: {report['dataset']['name']}"
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{escape(title)}</title>\n<style>{HTML_STYLE}</style>\n</head>\n<body>\n"
            f"{_html_body(_document(report, with_figures=True))}\n</body>\n</html>\n")


def write_report(report: dict, path: Union[str, os.PathLike]) -> Path:
    """Write `report` as JSON, Markdown or HTML according to the suffix of `path`, atomically."""
    path = check_report_path(path)
    text = _renderer_for(path)(report)  # rendered first: a failing render writes nothing
    write_text(path, text)  # an OSError is one QuantkitError naming the path (quantkit.io.files.write_error)
    return path


def check_report_path(path: Union[str, os.PathLike]) -> Path:
    """The report path, if a report can be written there (suffix, directory): checked before any evaluation."""
    path = Path(path)
    _renderer_for(path)
    if path.is_dir():
        raise QuantkitError(f"cannot write the report to {path}: it is a directory; give a file name ending in "
                            f"{', '.join(SUFFIXES)}")
    if not path.parent.is_dir():
        raise QuantkitError(f"cannot write the report to {path}: the directory {path.parent} does not exist")
    check_writable(path)  # read-only, no permission, a name too long: refused before the evaluation
    return path


def _renderer_for(path: Path) -> Callable[[dict], str]:
    suffix = path.suffix.lower()
    if suffix == ".json":
        return to_json
    if suffix == ".md":
        return to_markdown
    if suffix == ".html":
        return to_html
    raise QuantkitError(f"cannot write a report to {path}: the file name must end in {', '.join(SUFFIXES)}")


def _check_version(report: dict) -> None:
    schema, version = report.get("schema"), report.get("schema_version")
    if schema != SCHEMA_NAME or version != SCHEMA_VERSION:
        raise QuantkitError(f"not a {SCHEMA_NAME} report of schema_version {SCHEMA_VERSION} (schema={schema!r}, "
                            f"schema_version={version!r}): this quantkit renders version {SCHEMA_VERSION} only")


# --- document blocks ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Heading:
    text: str
    level: int


@dataclass(frozen=True)
class _Paragraph:
    text: str


@dataclass(frozen=True)
class _Code:
    text: str


@dataclass(frozen=True)
class _Bullets:
    items: tuple[str, ...]


@dataclass(frozen=True)
class _Table:
    headers: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    text_columns: int = 1  # the leading columns hold text (left-aligned); the rest are numbers


@dataclass(frozen=True)
class _Figure:
    svg: str
    caption: str
    wide: bool = False


_Block = Union[_Heading, _Paragraph, _Code, _Bullets, _Table, _Figure]


def _document(report: dict, with_figures: bool) -> list[_Block]:
    blocks = [*_header(report), *_summary(report)]
    if with_figures:
        blocks += _overview_figures(report)
    return [*blocks, *_fidelity_section(report), *_noise_floor_section(report),
            *_layer_error_section(report, with_figures), *_sensitivity_section(report, with_figures)]


def _entries(report: dict) -> list[dict]:
    """The base (if any) first, then the models."""
    return ([report["base"]] if report.get("base") else []) + list(report["models"])


def _header(report: dict) -> list[_Block]:
    dataset = report["dataset"]
    blocks: list[_Block] = [
        _Heading("quantkit evaluation report", 1),
        _Paragraph(f"Created {report['created']} by quantkit {report['quantkit_version']}."),
    ]
    if report.get("command"):
        blocks.append(_Code(report["command"]))
    blocks.append(_Paragraph(
        f"Dataset: {dataset['name']} \u2014 protocol {dataset['protocol']}, seq_len {dataset['seq_len']}, "
        f"stride {_integer(dataset.get('stride'))}, {_integer(dataset['n_tokens'])} tokens in "
        f"{_integer(dataset['n_windows'])} windows (fingerprint {dataset['fingerprint']})."))
    return blocks


def _summary(report: dict) -> list[_Block]:
    base = report.get("base")
    headers = ("model", "method", "bits/weight", "size (MB)", "perplexity \u00b1 stderr", "\u0394ppl vs base",
               "mean KL \u00b1 stderr", "KL p99", "top-1 agreement (%)", "tokens/s")
    rows = tuple(_summary_row(entry, base, entry is base) for entry in _entries(report))
    blocks: list[_Block] = [_Heading("Summary", 2), _Table(headers, rows, text_columns=2),
                            _Paragraph(BITS_PER_WEIGHT[0].upper() + BITS_PER_WEIGHT[1:] + ".")]
    if any(entry.get("fidelity") for entry in report["models"]):
        blocks.append(_Paragraph("KL is KL(base\u2016model) per token in nats; top-1 agreement is how often the "
                                 "model's most likely next token is the base's; \u00b1 is one standard error."))
    arithmetic = [f"{entry['name']}: {entry['arithmetic']}" for entry in _entries(report)
                  if entry.get("arithmetic") and entry["arithmetic"] != "dense"]
    if arithmetic:
        blocks.append(_Paragraph("How the quantized linears computed these numbers (fp32 computes exactly, with "
                                 "dequantized weights; tokens/s always uses the int4 kernel where it fits): "
                                 + "; ".join(arithmetic) + "."))
    floor_sentences = _noise_floor_sentences(report)
    if floor_sentences:
        blocks.append(_Bullets(tuple(floor_sentences)))
    return blocks


def _summary_row(entry: dict, base: dict | None, is_base: bool) -> tuple[str, ...]:
    ppl = entry["perplexity"]
    fidelity = entry.get("fidelity") or {}
    kl, top1 = fidelity.get("kl"), fidelity.get("top1")
    delta = MISSING if is_base or base is None else _ppl_delta(ppl["ppl"], base["perplexity"]["ppl"])
    return (entry["name"] + (" (base)" if is_base else ""), entry["method"],
            _number(entry.get("bits_per_weight"), ".2f"), _megabytes(entry.get("size_bytes")),
            _plus_minus(ppl["ppl"], ppl["ppl_stderr"], ".4f"), delta,
            _kl_plus_minus(kl["mean"], kl["stderr"]) if kl else MISSING, _kl(kl["p99"]) if kl else MISSING,
            _percent_plus_minus(top1["agreement"], top1["stderr"]) if top1 else MISSING,
            _number(entry.get("tokens_per_s"), ",.1f"))


def noise_floor(tp_section: dict | None) -> float | None:
    """The largest mean KL among a tp section's tp > 1 rows: how far rounding alone moves the logits."""
    kls = [row["kl_mean"] for row in (tp_section or {}).get("rows", []) if row["tp"] > 1]
    return max(kls) if kls else None


def _noise_floor_sentences(report: dict) -> list[str]:
    floor = noise_floor(report.get("tp"))
    if floor is None or not floor > 0:  # a zero floor makes every ratio infinite: say nothing
        return []
    return [f"{entry['name']}: mean KL {_kl(entry['fidelity']['kl']['mean'])} = "
            f"{_ratio(entry['fidelity']['kl']['mean'] / floor)} the pretraining_tp noise floor ({_kl(floor)})"
            for entry in report["models"] if entry.get("fidelity")]


def _fidelity_section(report: dict) -> list[_Block]:
    measured = [entry for entry in report["models"] if entry.get("fidelity")]
    if not measured:
        return []
    base = report.get("base")
    reference = f"the base ({base['name']})" if base else "the base"
    kl_table = _Table(("model", "mean \u00b1 stderr", *(label for _, label in KL_PERCENTILES)), tuple(
        (entry["name"], _kl_plus_minus(entry["fidelity"]["kl"]["mean"], entry["fidelity"]["kl"]["stderr"]),
         *(_kl(entry["fidelity"]["kl"][key]) for key, _ in KL_PERCENTILES)) for entry in measured))
    delta_p_table = _Table(("model", "mean \u00b1 stderr", "RMS \u00b1 stderr",
                            *(label for _, label in DELTA_P_PERCENTILES)), tuple(_delta_p_row(e) for e in measured))
    agreement_table = _Table(("model", "logits", "top-1 agreement (%)", "top-5 overlap (%)", "NLL correlation",
                              "ln(PPL ratio) \u00b1 stderr"), tuple(_agreement_row(entry) for entry in measured),
                             text_columns=2)
    return [_Heading(f"Fidelity against {reference}", 2),
            _Paragraph("KL(base\u2016model) per token, nats:"), kl_table,
            _Paragraph("\u0394p = p_model(correct token) \u2212 p_base(correct token), in percentage points:"),
            delta_p_table,
            _Paragraph("Agreement: top-5 overlap is the mean share of the base's 5 most likely tokens that are also "
                       "in the model's; NLL correlation is Pearson's r of the per-token NLLs."),
            agreement_table]


def _delta_p_row(entry: dict) -> tuple[str, ...]:
    delta_p = entry["fidelity"]["delta_p"]
    return (entry["name"], f"{_points(delta_p['mean'])} \u00b1 {_percent_stderr(delta_p['stderr'])}",
            f"{_percent(delta_p['rms'])} \u00b1 {_percent_stderr(delta_p['rms_stderr'])}",
            *(_points(delta_p[key]) for key, _ in DELTA_P_PERCENTILES))


def _agreement_row(entry: dict) -> tuple[str, ...]:
    fidelity = entry["fidelity"]
    source = fidelity["source"]
    if source == "base-logits":
        source += f" (top-{fidelity['top_k']})" if fidelity.get("top_k") else " (full)"
    ratio = fidelity["ln_ppl_ratio"]
    return (entry["name"], source, _percent_plus_minus(fidelity["top1"]["agreement"], fidelity["top1"]["stderr"]),
            _percent(fidelity["top5_overlap"]), f"{fidelity['nll_correlation']:.5f}",
            f"{ratio['value']:+.5f} \u00b1 {ratio['stderr']:.5f}")


def _noise_floor_section(report: dict) -> list[_Block]:
    tp = report.get("tp")
    if not tp:
        return []
    rows = tuple((row["dtype"], str(row["tp"]), f"{row['max_abs_dlogit']:.4g}", _kl(row["kl_mean"]), _kl(row["kl_p99"]),
                  _percent(row["top1"]), f"{row['ppl']:.4f}") for row in tp["rows"])
    blocks: list[_Block] = [
        _Heading("Noise floor: pretraining_tp", 2),
        _Paragraph(f"{tp['model']} with pretraining_tp slicing, against {tp['reference']}: the logits move by "
                   f"rounding alone, which bounds how small a quantization KL can meaningfully be."),
        _Table(("dtype", "tp", "max |\u0394logit|", "mean KL", "KL p99", "top-1 agreement (%)", "perplexity"), rows),
    ]
    floor = noise_floor(report.get("tp"))
    if floor is not None:
        blocks.append(_Paragraph(f"Noise floor (largest mean KL with tp > 1): {_kl(floor)}."))
    if tp.get("unsupported"):
        blocks.append(_Paragraph("Not run:"))
        blocks.append(_Bullets(tuple(f"tp={item['tp']}: {item['reason']}" for item in tp["unsupported"])))
    return blocks


def _layer_error_section(report: dict, with_figures: bool) -> list[_Block]:
    entries = [entry for entry in _entries(report) if entry.get("layer_errors")]
    if not entries:
        return []
    blocks: list[_Block] = [_Heading("Per-layer error", 2)]
    for kind, description in KINDS:
        grouped = {entry["name"]: _group_by_layer(entry["layer_errors"], kind) for entry in entries}
        grouped = {name: groups for name, groups in grouped.items() if groups}
        if not grouped:
            continue
        blocks.append(_Heading(f"{kind.capitalize()} error", 3))
        blocks.append(_Paragraph(f"{description}, averaged over the linears of each decoder "
                                 f"layer; the worst linear of the layer beside it."))
        if with_figures:
            figure = _layer_error_figure(grouped, kind)
            if figure:
                blocks.append(figure)
        blocks.append(_layer_error_table(grouped))
        blocks.append(_Bullets(tuple(_worst_linear_sentence(name, groups) for name, groups in grouped.items())))
    return blocks


def _group_by_layer(errors: Sequence[dict], kind: str) -> dict[tuple, list[dict]]:
    """Errors of `kind` keyed by (0, layer index) or, for linears outside the decoder layers, (1, name)."""
    groups: dict[tuple, list[dict]] = {}
    for error in errors:
        if error["kind"] == kind:
            key = (0, error["layer"]) if error.get("layer") is not None else (1, error["name"])
            groups.setdefault(key, []).append(error)
    return dict(sorted(groups.items()))


def _layer_error_table(grouped: dict[str, dict[tuple, list[dict]]]) -> _Table:
    keys = sorted({key for groups in grouped.values() for key in groups})
    headers = ("layer", *(f"{name}: {column}" for name in grouped for column in ("mean", "worst linear")))
    rows = []
    for key in keys:
        cells = [str(key[1])]
        for groups in grouped.values():
            errors = groups.get(key)
            if not errors:
                cells += [MISSING, MISSING]
                continue
            worst = max(errors, key=lambda error: error["relative_error"])
            cells += [f"{_mean(e['relative_error'] for e in errors):.4g}",
                      f"{local_name(worst['name'])} {worst['relative_error']:.4g}"]
        rows.append(tuple(cells))
    return _Table(headers, tuple(rows))


def _worst_linear_sentence(name: str, groups: dict[tuple, list[dict]]) -> str:
    worst = max((error for errors in groups.values() for error in errors), key=lambda error: error["relative_error"])
    return f"{name}: worst linear {worst['name']} ({worst['method']}), relative error {worst['relative_error']:.4g}"


def _layer_error_figure(grouped: dict[str, dict[tuple, list[dict]]], kind: str) -> _Figure | None:
    series = []
    for name, groups in grouped.items():
        layers = [(key[1], _mean(e["relative_error"] for e in errors)) for key, errors in groups.items() if key[0] == 0]
        if layers:
            series.append(plots.Series(name, [layer for layer, _ in layers], [mean for _, mean in layers]))
    if not series:
        return None
    svg = plots.line_plot(series, x_title="decoder layer", y_title=f"mean relative {kind} error", integer_x=True,
                          y_from_zero=True, width=1160, height=360, figure_id=f"{kind}-error")
    return _Figure(svg, f"Relative {kind} error per decoder layer, the mean over the layer's linears.", wide=True)


def _sensitivity_section(report: dict, with_figures: bool) -> list[_Block]:
    entries = [entry for entry in _entries(report) if entry.get("sensitivity")]
    if not entries:
        return []
    blocks: list[_Block] = [_Heading("Sensitivity", 2)]
    for index, entry in enumerate(entries):
        sensitivity = entry["sensitivity"]
        rows = sorted(sensitivity["rows"], key=lambda row: row["kl_mean"], reverse=True)
        blocks.append(_Heading(f"{entry['name']}: per {sensitivity['unit']} ({sensitivity['method']})", 3))
        if with_figures and rows:
            blocks.append(_sensitivity_figure(entry["name"], sensitivity["unit"], rows, f"sensitivity-{index}"))
        blocks.append(_Table(("rank", sensitivity["unit"], "mean KL \u00b1 stderr", "perplexity"), tuple(
            (str(rank), row["name"], _kl_plus_minus(row["kl_mean"], row["kl_stderr"]), f"{row['ppl']:.4f}")
            for rank, row in enumerate(rows, start=1)), text_columns=2))
    return blocks


def _sensitivity_figure(name: str, unit: str, rows: Sequence[dict], figure_id: str) -> _Figure:
    wide = len(rows) > 16
    svg = plots.bar_chart([row["name"] for row in rows],
                          [plots.BarSeries(name, [row["kl_mean"] for row in rows], [row["kl_stderr"] for row in rows])],
                          x_title=unit, y_title="mean KL (nats)", width=1160 if wide else 600, height=400,
                          figure_id=figure_id)
    return _Figure(svg, f"{name}: mean KL(base\u2016model) per {unit}, most sensitive first; whiskers are one "
                        f"standard error.", wide=wide)


def _overview_figures(report: dict) -> list[_Block]:
    figures = [_perplexity_figure(report), _kl_figure(report)]
    return [figure for figure in figures if figure]


def _perplexity_figure(report: dict) -> _Figure | None:
    base = report.get("base")
    models = [entry for entry in report["models"] if entry.get("bits_per_weight") is not None]
    methods = [entry["method"] for entry in models]
    labels = [m if methods.count(m) == 1 else f"{m} ({entry['name']})" for m, entry in zip(methods, models)]
    series = []
    if base and base.get("bits_per_weight") is not None:
        series.append(plots.Series(f"base: {base['name']}", [base["bits_per_weight"]], [base["perplexity"]["ppl"]],
                                   [base["method"]]))
    if models:
        series.append(plots.Series("models", [e["bits_per_weight"] for e in models],
                                   [e["perplexity"]["ppl"] for e in models], labels))
    if not series:
        return None
    base_ppl = base["perplexity"]["ppl"] if base else None
    references = [plots.ReferenceLine(base_ppl, f"base {base_ppl:.4f}")] if base else []
    caption = "Perplexity against bits per weight, each point labelled with its method"
    caption += f"; the dashed line is the base ({base['name']})." if base else "."
    unplaced = [entry["name"] for entry in report["models"] if entry.get("bits_per_weight") is None]
    if unplaced:
        caption += f" Not shown (bits/weight unknown): {', '.join(unplaced)}."
    return _Figure(plots.scatter_plot(series, x_title="bits per weight", y_title="perplexity",
                                      references=references, figure_id="perplexity"), caption)


def _kl_figure(report: dict) -> _Figure | None:
    series = []
    for entry in report["models"]:
        histogram = (entry.get("fidelity") or {}).get("kl_histogram")
        total = sum(histogram["counts"]) if histogram else 0
        if total > 0:
            series.append(plots.StepSeries(entry["name"], histogram["edges"],
                                           [count / total for count in histogram["counts"]]))
    if not series:
        return None
    floor = noise_floor(report.get("tp"))
    references = [plots.ReferenceLine(floor, "tp noise floor", axis="x")] if floor and floor > 0 else []
    caption = ("Distribution of the per-token KL(base\u2016model) over log-spaced bins; y is the fraction of "
               "the model's tokens in each bin.")
    if references:
        caption += " Dashed: the pretraining_tp noise floor (largest mean KL with tp > 1)."
    return _Figure(plots.step_plot(series, x_title="KL(base\u2016model) per token, nats", y_title="fraction of tokens",
                                   references=references, figure_id="kl-distribution"), caption)


# --- number formats -----------------------------------------------------------------------------------------------


def _number(value: float | None, spec: str) -> str:
    return MISSING if value is None else format(value, spec)


def _integer(value: int | None) -> str:
    return _number(value, ",d")


def _kl(value: float | None) -> str:
    """Scientific: KLs span orders of magnitude (1e-6 for fp16 noise to 1e-1 for 2-bit)."""
    return _number(value, ".3e")


def _kl_plus_minus(value: float, stderr: float) -> str:
    return f"{_kl(value)} \u00b1 {_number(stderr, '.2e')}"


def _plus_minus(value: float, stderr: float | None, spec: str) -> str:
    return f"{format(value, spec)} \u00b1 {_number(stderr, spec)}"


def _percent(fraction: float | None) -> str:
    return MISSING if fraction is None else f"{fraction * 100:.2f}"


def _percent_plus_minus(fraction: float, stderr: float) -> str:
    return f"{_percent(fraction)} \u00b1 {_percent_stderr(stderr)}"


def _percent_stderr(fraction: float) -> str:
    """Two significant digits: a standard error is often below the 0.01 % the values are rounded to."""
    return f"{fraction * 100:.2g}"


def _points(probability: float) -> str:
    """A probability difference in percentage points, signed."""
    return f"{probability * 100:+.2f}"


def _megabytes(size_bytes: int | None) -> str:
    return MISSING if size_bytes is None else f"{size_bytes / 1e6:,.2f}"


def _ppl_delta(ppl: float, base_ppl: float) -> str:
    delta = ppl - base_ppl
    relative = f" ({delta / base_ppl * 100:+.2f}%)" if base_ppl else ""
    return f"{delta:+.4f}{relative}"


def _ratio(ratio: float) -> str:
    return f"{ratio:,.0f}\u00d7" if ratio >= 10 else f"{ratio:.2g}\u00d7"


def _mean(values) -> float:
    values = list(values)
    return math.fsum(values) / len(values)


# --- Markdown -----------------------------------------------------------------------------------------------------


def _markdown_block(block: _Block) -> str:
    if isinstance(block, _Heading):
        return f"{'#' * block.level} {block.text}"
    if isinstance(block, _Paragraph):
        return block.text
    if isinstance(block, _Code):
        fence = "`" * max(3, _longest_backtick_run(block.text) + 1)
        return f"{fence}\n{block.text}\n{fence}"
    if isinstance(block, _Bullets):
        return "\n".join(f"- {item}" for item in block.items)
    if isinstance(block, _Table):
        return _markdown_table(block)
    return ""  # figures exist only in the HTML


def _longest_backtick_run(text: str) -> int:
    longest = current = 0
    for character in text:
        current = current + 1 if character == "`" else 0
        longest = max(longest, current)
    return longest


def _markdown_table(table: _Table) -> str:
    align = [":--" if index < table.text_columns else "--:" for index in range(len(table.headers))]
    lines = [_markdown_row(table.headers), "| " + " | ".join(align) + " |"]
    lines += [_markdown_row(row) for row in table.rows]
    return "\n".join(lines)


def _markdown_row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cell.replace("|", "\\|").replace("\n", " ") for cell in cells) + " |"


# --- HTML ---------------------------------------------------------------------------------------------------------

HTML_STYLE = """
body { font-family: "DejaVu Sans", Helvetica, Arial, sans-serif; color: #1f2937; margin: 0 auto; max-width: 1200px;
       padding: 24px 32px 48px; font-size: 14px; line-height: 1.45; }
h1 { font-size: 24px; margin: 0 0 8px; }
h2 { font-size: 19px; margin: 32px 0 8px; border-bottom: 1px solid #e5e7eb; padding-bottom: 4px; }
h3 { font-size: 16px; margin: 20px 0 6px; }
pre { background: #f3f4f6; padding: 8px 12px; border-radius: 4px; overflow-x: auto; white-space: pre-wrap; }
.table-wrap { overflow-x: auto; margin: 8px 0 12px; }
table { border-collapse: collapse; font-size: 13px; }
th, td { padding: 4px 8px; border-bottom: 1px solid #e5e7eb; text-align: left; vertical-align: top; }
th { background: #f3f4f6; font-weight: 600; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tbody tr:nth-child(even) { background: #fafafa; }
.figures { display: grid; grid-template-columns: repeat(auto-fill, minmax(520px, 1fr)); gap: 16px 24px;
           margin: 16px 0; }
figure { margin: 0; }
figure.wide { grid-column: 1 / -1; }
figure svg { width: 100%; height: auto; display: block; }
figcaption { font-size: 13px; color: #4b5563; margin-top: 4px; }
"""


def _html_body(blocks: Sequence[_Block]) -> str:
    """Blocks as HTML; consecutive figures share one grid so they sit side by side."""
    parts: list[str] = []
    figures: list[str] = []
    for block in blocks:
        if isinstance(block, _Figure):
            figures.append(_html_figure(block))
            continue
        if figures:
            parts.append(f'<div class="figures">{"".join(figures)}</div>')
            figures = []
        parts.append(_html_block(block))
    if figures:
        parts.append(f'<div class="figures">{"".join(figures)}</div>')
    return "\n".join(parts)


def _html_block(block: _Block) -> str:
    if isinstance(block, _Heading):
        return f"<h{block.level}>{escape(block.text)}</h{block.level}>"
    if isinstance(block, _Paragraph):
        return f"<p>{escape(block.text)}</p>"
    if isinstance(block, _Code):
        return f"<pre><code>{escape(block.text)}</code></pre>"
    if isinstance(block, _Bullets):
        return "<ul>" + "".join(f"<li>{escape(item)}</li>" for item in block.items) + "</ul>"
    return _html_table(block)


def _html_table(table: _Table) -> str:
    def cell(tag: str, index: int, text: str) -> str:
        css = "" if index < table.text_columns else ' class="num"'
        return f"<{tag}{css}>{escape(text)}</{tag}>"

    head = "".join(cell("th", index, text) for index, text in enumerate(table.headers))
    body = "".join("<tr>" + "".join(cell("td", index, text) for index, text in enumerate(row)) + "</tr>"
                   for row in table.rows)
    return f'<div class="table-wrap"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def _html_figure(figure: _Figure) -> str:
    css = ' class="wide"' if figure.wide else ""
    return f"<figure{css}>{figure.svg}<figcaption>{escape(figure.caption)}</figcaption></figure>"
