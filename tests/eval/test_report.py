"""The report renderer: schema, JSON/Markdown/HTML, atomic writes, SVG plots, and a real browser render."""

import collections
import json
import math
import os
import re
import shutil
import struct
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
import zlib
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import pytest
from matplotlib.font_manager import FontProperties
from matplotlib.textpath import TextToPath

from quantkit.eval import plots
from quantkit.eval.report import SCHEMA_VERSION, load_schema, to_html, to_json, to_markdown, write_report
from quantkit.errors import QuantkitError

N_LAYERS = 32
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")
KL_KEYS = ("mean", "stderr", "max", "p99_9", "p99", "p90", "median", "p10", "p5", "p1", "min")
DELTA_P_KEYS = ("mean", "stderr", "rms", "rms_stderr", "max", "p99_9", "p99", "p95", "p90", "p75", "median", "p25",
                "p10", "p5", "p1", "p0_1", "min")


# --- example reports ------------------------------------------------------------------------------------------


def kl_stats(mean):
    """Plausible per-token KL statistics around `mean` (heavy upper tail)."""
    return {"mean": mean, "stderr": mean / 75, "max": mean * 900, "p99_9": mean * 60, "p99": mean * 12,
            "p90": mean * 2.5, "median": mean * 0.4, "p10": mean * 0.05, "p5": mean * 0.02, "p1": mean * 0.004,
            "min": mean * 1e-4}


def delta_p_stats(spread):
    return {"mean": -spread / 10, "stderr": spread / 400, "rms": spread, "rms_stderr": spread / 300,
            "max": spread * 9, "p99_9": spread * 5, "p99": spread * 3, "p95": spread * 1.5, "p90": spread * 0.9,
            "p75": spread * 0.2, "median": -spread / 50, "p25": -spread * 0.3, "p10": -spread, "p5": -spread * 1.6,
            "p1": -spread * 3.2, "p0_1": -spread * 5.5, "min": -spread * 9.5}


def kl_histogram(mean, n_tokens=100_000):
    """Counts of a log-normal-ish KL distribution over 40 log-spaced bins from 1e-7 to 10 nats."""
    edges = [10 ** (-7 + 8 * i / 40) for i in range(41)]
    centre = math.log10(mean) - 0.4
    weights = [math.exp(-((math.log10(math.sqrt(lo * hi)) - centre) / 0.8) ** 2 / 2)
               for lo, hi in zip(edges, edges[1:])]
    return {"edges": edges, "counts": [round(n_tokens * w / sum(weights)) for w in weights]}


def fidelity(kl_mean, top1, source="in-memory", top_k=None):
    return {"source": source, "top_k": top_k, "kl": kl_stats(kl_mean), "top1": {"agreement": top1, "stderr": 0.0005},
            "top5_overlap": top1 - 0.02, "delta_p": delta_p_stats(kl_mean * 20), "nll_correlation": 0.99871,
            "ln_ppl_ratio": {"value": 0.0468, "stderr": 0.0011}, "kl_histogram": kl_histogram(kl_mean)}


def layer_errors(method, scale):
    """Relative output errors of every linear, larger in the first and last layers, plus the lm_head."""
    errors = [{"name": f"model.layers.{layer}.{linear}", "layer": layer, "method": method,
               "relative_error": round(scale * (1 + 0.5 * math.cos(layer / 5) + 0.1 * index), 6), "kind": "output"}
              for layer in range(N_LAYERS) for index, linear in enumerate(LINEARS)]
    return errors + [{"name": "lm_head", "layer": None, "method": method, "relative_error": scale / 2,
                      "kind": "output"}]


def model_entry(name, method, ppl, bits=None, size=None, speed=None, fidelity_section=None, errors=(),
                sensitivity=None):
    return {"name": name, "path": f"/models/{name}", "method": method, "bits_per_weight": bits, "size_bytes": size,
            "tokens_per_s": speed, "perplexity": {"ppl": ppl, "ppl_stderr": 0.0312, "nll": math.log(ppl),
                                                  "nll_stderr": 0.0057, "n_tokens": 341_469},
            "fidelity": fidelity_section, "layer_errors": list(errors), "sensitivity": sensitivity}


def full_report():
    linear_sensitivity = {"unit": "linear", "method": "gptq w4 g128", "rows": [
        {"name": linear, "kl_mean": 1e-4 * (1 + index % 4) * (3 if "down" in linear else 1), "kl_stderr": 2e-6,
         "ppl": 5.48 + 0.001 * index} for index, linear in enumerate(LINEARS)]}
    layer_sensitivity = {"unit": "layer", "method": "int4 g128", "rows": [
        {"name": f"layer {layer}", "kl_mean": 4e-5 * (1 + 8 * math.exp(-layer) + 0.3 * math.sin(layer)),
         "kl_stderr": 1e-6, "ppl": 5.47 + 0.002 * layer} for layer in range(N_LAYERS)]}
    return {
        "schema": "quantkit-eval-report", "schema_version": 1, "quantkit_version": "0.1.0",
        "created": "2025-01-31T12:00:00Z",
        "command": "quantkit compare meta-llama/Llama-2-7b-hf out/int4 out/gptq out/nf4 --dataset wikitext2",
        "dataset": {"name": "wikitext2", "protocol": "windows", "seq_len": 2048, "stride": None, "n_windows": 166,
                    "n_tokens": 341_469, "fingerprint": "sha256:3f2a9c"},
        "base": model_entry("Llama-2-7b fp16", "fp16", 5.4721, bits=16.0, size=13_476_839_424, speed=21.3),
        "models": [
            model_entry("int4", "int4 g128", 5.7346, bits=4.156, size=3_858_050_048, speed=48.75,
                        fidelity_section=fidelity(9.0e-4, 0.9712), errors=layer_errors("int4 g128", 0.06),
                        sensitivity=layer_sensitivity),
            model_entry("gptq", "gptq w4 g128", 5.6612, bits=4.25, size=3_901_227_008, speed=45.1,
                        fidelity_section=fidelity(6.1e-4, 0.9768), errors=layer_errors("gptq w4 g128", 0.04),
                        sensitivity=linear_sensitivity),
            model_entry("nf4", "bnb-nf4", 5.6950, bits=4.127, size=3_835_000_000, speed=None,
                        fidelity_section=fidelity(7.2e-4, 0.9741, source="base-logits", top_k=64)),
        ],
        "tp": {"model": "Llama-2-7b fp16", "reference": "fp32, pretraining_tp=1",
               "rows": [{"dtype": "fp16", "tp": 1, "max_abs_dlogit": 0.0625, "kl_mean": 2.1e-6, "kl_p99": 1.9e-5,
                         "top1": 0.9991, "ppl": 5.4722},
                        {"dtype": "fp16", "tp": 2, "max_abs_dlogit": 0.125, "kl_mean": 7.5e-6, "kl_p99": 6.8e-5,
                         "top1": 0.9979, "ppl": 5.4724},
                        {"dtype": "bf16", "tp": 2, "max_abs_dlogit": 0.5, "kl_mean": 6.0e-6, "kl_p99": 5.1e-5,
                         "top1": 0.9950, "ppl": 5.4770}],
               "unsupported": [{"tp": 3, "reason": "hidden size 4096 is not divisible by 3"}]},
    }


def minimal_report(bits=4.156):
    return {
        "schema": "quantkit-eval-report", "schema_version": 1, "quantkit_version": "0.1.0",
        "created": "2025-01-31T12:00:00Z", "command": None,
        "dataset": {"name": "demo.txt", "protocol": "sliding", "seq_len": 512, "stride": 256, "n_windows": 12,
                    "n_tokens": 3_072, "fingerprint": "sha256:00aa"},
        "base": None,
        "models": [model_entry("demo-int4", "int4 g128", 18.2345, bits=bits)],
        "tp": None,
    }


FULL_SVG_COUNT = 5  # ppl vs bits, KL distribution, per-layer error, two sensitivity charts


def validate(report):
    jsonschema.validate(json.loads(to_json(report)), load_schema(), cls=jsonschema.Draft202012Validator)


def table_lines(markdown):
    return [line for line in markdown.splitlines() if line.startswith("|")]


def row_cells(line):
    return [cell.strip() for cell in line.strip("|").split(" | ")]


# --- schema -----------------------------------------------------------------------------------------------------


def test_the_schema_is_a_valid_draft_2020_12_schema():
    schema = load_schema()
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["properties"]["schema_version"] == {"const": SCHEMA_VERSION}


@pytest.mark.parametrize("make_report", [full_report, minimal_report, lambda: minimal_report(bits=None)])
def test_example_reports_validate(make_report):
    validate(make_report())


def _drop_perplexity_key(report):
    del report["models"][0]["perplexity"]["ppl"]


def _drop_layer_errors(report):
    del report["models"][0]["layer_errors"]


@pytest.mark.parametrize("corrupt", [
    lambda r: r.pop("dataset"),
    _drop_perplexity_key,
    _drop_layer_errors,
    lambda r: r["dataset"].update(seq_len="2048"),
    lambda r: r["models"][0].update(size_bytes=12.5),
    lambda r: r["models"][0]["fidelity"]["top1"].update(agreement=1.5),
    lambda r: r["models"][0]["fidelity"]["kl"].pop("p99"),
    lambda r: r["models"][0]["fidelity"]["kl_histogram"]["edges"].__setitem__(0, 0.0),
    lambda r: r["tp"]["rows"][0].update(dtype="int8"),
    lambda r: r["dataset"].update(protocol="chunks"),
    lambda r: r.update(schema_version=2),
    lambda r: r.update(schema="something-else"),
    lambda r: r.update(models=[]),
    lambda r: r.update(extra=1),
    lambda r: r["models"][0].update(fidelity={"source": "in-memory"}),
], ids=["no dataset", "no ppl", "no layer_errors", "seq_len string", "size float", "agreement > 1", "kl no p99",
        "edge zero", "tp dtype", "protocol", "schema_version 2", "schema name", "no models", "extra key",
        "partial fidelity"])
def test_invalid_reports_are_rejected_by_the_schema(corrupt):
    report = full_report()
    corrupt(report)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(report, load_schema(), cls=jsonschema.Draft202012Validator)


@pytest.mark.parametrize("render", [to_json, to_markdown, to_html])
def test_renderers_refuse_another_schema_version(render):
    report = full_report()
    report["schema_version"] = 2
    with pytest.raises(QuantkitError, match="schema_version 1"):
        render(report)


def test_json_round_trips_and_refuses_nan():
    report = full_report()
    assert json.loads(to_json(report)) == report
    report["models"][0]["perplexity"]["ppl"] = float("nan")
    with pytest.raises(QuantkitError, match="NaN"):
        to_json(report)


# --- Markdown ---------------------------------------------------------------------------------------------------


def test_markdown_summary_table_has_base_first_and_formatted_numbers():
    markdown = to_markdown(full_report())
    assert markdown.startswith("# ")
    assert ("Dataset: wikitext2 \u2014 protocol windows, seq_len 2048, stride \u2013, 341,469 tokens in 166 "
            "windows") in markdown
    lines = table_lines(markdown)
    assert row_cells(lines[0]) == ["model", "method", "bits/weight", "size (MB)", "perplexity \u00b1 stderr",
                                   "\u0394ppl vs base", "mean KL \u00b1 stderr", "KL p99", "top-1 agreement (%)",
                                   "tokens/s"]
    assert row_cells(lines[2]) == ["Llama-2-7b fp16 (base)", "fp16", "16.00", "13,476.84", "5.4721 \u00b1 0.0312",
                                   "\u2013", "\u2013", "\u2013", "\u2013", "21.3"]
    assert row_cells(lines[3]) == ["int4", "int4 g128", "4.16", "3,858.05", "5.7346 \u00b1 0.0312",
                                   "+0.2625 (+4.80%)", "9.000e-04 \u00b1 1.20e-05", "1.080e-02", "97.12 \u00b1 0.05",
                                   "48.8"]
    assert row_cells(lines[5])[0] == "nf4" and row_cells(lines[5])[-1] == "\u2013"  # no tokens/s measured


def test_markdown_compares_each_model_to_the_noise_floor():
    markdown = to_markdown(full_report())
    assert "- int4: mean KL 9.000e-04 = 120\u00d7 the pretraining_tp noise floor (7.500e-06)" in markdown
    assert "- gptq: mean KL 6.100e-04 = 81\u00d7 the pretraining_tp noise floor (7.500e-06)" in markdown


def test_markdown_fidelity_noise_floor_sensitivity_and_layer_sections():
    report = full_report()
    markdown = to_markdown(report)
    rows = {row_cells(line)[0]: row_cells(line) for line in table_lines(markdown)}
    # KL table: percentiles in scientific notation
    assert "| int4 | 9.000e-04 \u00b1 1.20e-05 | 8.100e-01 | 5.400e-02 | 1.080e-02 |" in markdown
    # Delta p in percentage points, signed; agreement table with the logits source
    dp = report["models"][1]["fidelity"]["delta_p"]
    assert f"| gptq | {dp['mean'] * 100:+.2f} \u00b1 {dp['stderr'] * 100:.2g} | {dp['rms'] * 100:.2f} \u00b1" \
        in markdown
    assert "| int4 | -0.18 \u00b1 0.0045 | 1.80 \u00b1 0.006 | +16.20 |" in markdown
    assert "| nf4 | base-logits (top-64) | 97.41 \u00b1 0.05 | 95.41 | 0.99871 | +0.04680 \u00b1 0.00110 |" in markdown
    # tp table and what could not run
    assert "| fp16 | 2 | 0.125 | 7.500e-06 | 6.800e-05 | 99.79 | 5.4724 |" in markdown
    assert "- tp=3: hidden size 4096 is not divisible by 3" in markdown
    # sensitivity sorted by mean KL, most sensitive first
    sensitivity = [row_cells(line) for line in table_lines(markdown)
                   if re.match(r"\| \d+ \| (mlp|self_attn)\.", line)]
    kls = [float(cells[2].split(" ")[0]) for cells in sensitivity]
    assert len(kls) == len(LINEARS) and kls == sorted(kls, reverse=True)
    assert sensitivity[0][:2] == ["1", "mlp.down_proj"]
    # per-layer errors: mean over the layer's linears and the worst linear, per model
    int4_layer0 = [e["relative_error"] for e in report["models"][0]["layer_errors"] if e["layer"] == 0]
    assert rows["0"][1] == f"{sum(int4_layer0) / len(int4_layer0):.4g}"
    assert rows["0"][2] == f"mlp.down_proj {max(int4_layer0):.4g}"
    assert rows["lm_head"][1] == "0.03"
    worst = max(report["models"][0]["layer_errors"], key=lambda error: error["relative_error"])
    assert worst["name"] == "model.layers.0.mlp.down_proj"
    assert (f"- int4: worst linear model.layers.0.mlp.down_proj (int4 g128), relative error "
            f"{worst['relative_error']:.4g}") in markdown


def test_minimal_markdown_has_only_the_summary():
    markdown = to_markdown(minimal_report())
    lines = table_lines(markdown)
    assert len(lines) == 3
    assert row_cells(lines[2]) == ["demo-int4", "int4 g128", "4.16", "\u2013", "18.2345 \u00b1 0.0312", "\u2013",
                                   "\u2013", "\u2013", "\u2013", "\u2013"]
    assert "stride 256" in markdown
    for absent in ("Fidelity", "Noise floor", "Sensitivity", "Per-layer", "noise floor", "```"):
        assert absent not in markdown


def test_markdown_escapes_table_pipes():
    report = minimal_report()
    report["models"][0]["method"] = "rtn|w3"
    assert "| rtn\\|w3 |" in to_markdown(report)


# --- HTML -------------------------------------------------------------------------------------------------------


SVG_NAMESPACE = "http://www.w3.org/2000/svg"


def assert_self_contained(html):
    assert not re.search(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", html, re.IGNORECASE)
    assert not re.search(r"<script", html, re.IGNORECASE)
    assert not re.search(r"<link[^>]*stylesheet", html, re.IGNORECASE)
    assert not re.search(r"<(?:image|img|iframe|object|embed|foreignObject)\b", html, re.IGNORECASE)
    assert "@import" not in html and "@font-face" not in html
    # url() and href only point inside the page (a plot's clip paths and markers)
    assert all(target.startswith("#") for target in re.findall(r"url\(\s*['\"]?([^)'\"]*)", html))
    assert all(target.startswith("#") for target in re.findall(r"""\bhref\s*=\s*["']([^"']*)""", html))
    # the only URL anywhere is the SVG namespace (no xlink, no RDF metadata, no DOCTYPE/DTD link)
    assert set(re.findall(r"https?://[^\s\"'<>)]+", html)) <= {SVG_NAMESPACE}


@pytest.mark.parametrize("make_report, svg_count", [(full_report, FULL_SVG_COUNT), (minimal_report, 1),
                                                    (lambda: minimal_report(bits=None), 0)])
def test_html_is_self_contained_with_one_plot_per_available_dataset(make_report, svg_count):
    report = make_report()
    html = to_html(report)
    assert html.startswith("<!DOCTYPE html>")
    assert_self_contained(html)
    assert html.count("<svg") == svg_count == html.count("<figcaption>")
    for entry in [report["base"] or {}, *report["models"]]:
        assert entry.get("name", "") in html


def test_html_has_the_markdown_tables():
    report = full_report()
    html = to_html(report)
    separator = re.compile(r"\| :?--:?( \| :?--:?)* \|")
    markdown_tables = sum(1 for line in to_markdown(report).splitlines() if separator.fullmatch(line))
    assert html.count("<table>") == markdown_tables == 8
    assert "<td class=\"num\">+0.2625 (+4.80%)</td>" in html
    assert "120\u00d7 the pretraining_tp noise floor" in html


def test_html_escapes_text():
    report = minimal_report()
    report["models"][0]["name"] = "a<b>&c"
    report["models"][0]["method"] = '"quoted" <method>'
    html = to_html(report)
    assert "a&lt;b&gt;&amp;c" in html and "a<b>" not in html
    assert "<method>" not in html


# --- write_report -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix, check", [
    (".json", lambda text: json.loads(text) == full_report()),
    (".md", lambda text: text.startswith("# quantkit")),
    (".html", lambda text: text.startswith("<!DOCTYPE html>") and text.count("<svg") == FULL_SVG_COUNT),
    (".HTML", lambda text: text.startswith("<!DOCTYPE html>")),
])
def test_write_report_picks_the_format_by_suffix(tmp_path, suffix, check):
    path = write_report(full_report(), str(tmp_path / f"report{suffix}"))
    assert path == tmp_path / f"report{suffix}"
    assert check(path.read_text(encoding="utf-8"))
    assert os.listdir(tmp_path) == [path.name]  # no temp file left behind


def test_write_report_refuses_an_unknown_suffix(tmp_path):
    path = tmp_path / "report.txt"
    with pytest.raises(QuantkitError) as raised:
        write_report(full_report(), path)
    message = str(raised.value)
    assert "\n" not in message and str(path) in message
    assert all(suffix in message for suffix in (".json", ".md", ".html"))
    assert not os.listdir(tmp_path)


def test_write_report_needs_an_existing_directory(tmp_path):
    with pytest.raises(QuantkitError, match="does not exist"):
        write_report(full_report(), tmp_path / "missing" / "report.json")
    (tmp_path / "taken.json").mkdir()
    with pytest.raises(QuantkitError, match="is a directory"):
        write_report(full_report(), tmp_path / "taken.json")


@pytest.mark.parametrize("suffix", [".json", ".md", ".html"])
def test_a_failing_render_writes_nothing_and_keeps_the_old_file(tmp_path, suffix):
    broken = full_report()
    broken["models"][0]["perplexity"]["ppl"] = float("nan") if suffix == ".json" else None
    path = tmp_path / f"report{suffix}"
    with pytest.raises((QuantkitError, TypeError)):
        write_report(broken, path)
    assert not os.listdir(tmp_path)

    path.write_text("previous report", encoding="utf-8")
    with pytest.raises((QuantkitError, TypeError)):
        write_report(broken, path)
    assert path.read_text(encoding="utf-8") == "previous report"
    assert os.listdir(tmp_path) == [path.name]


def test_a_failing_replace_keeps_the_old_file_and_removes_the_temp_file(tmp_path, monkeypatch):
    path = tmp_path / "report.html"
    path.write_text("previous report", encoding="utf-8")

    def refuse(source, destination):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(QuantkitError, match="cannot write there: permission denied") as raised:
        write_report(full_report(), path)
    assert str(path) in str(raised.value)
    assert path.read_text(encoding="utf-8") == "previous report"
    assert os.listdir(tmp_path) == [path.name]


def test_an_unwritable_directory_is_a_quantkit_error_naming_the_report(tmp_path, monkeypatch):
    path = tmp_path / "report.md"
    real_open = os.open

    def refuse_temporaries(file, *args, **kwargs):  # what a read-only directory does (chmod does not stop root)
        if str(file).endswith(".tmp"):
            raise PermissionError(13, "Permission denied")
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(os, "open", refuse_temporaries)
    with pytest.raises(QuantkitError) as raised:
        write_report(full_report(), path)
    assert str(raised.value) == f"{path}: cannot write there: permission denied: fix the directory's permissions or " \
                                "write elsewhere"
    assert not os.listdir(tmp_path)


# --- plots ------------------------------------------------------------------------------------------------------


def parse_svg(svg):
    root = ElementTree.fromstring(svg)  # well-formed XML, or this raises
    assert root.tag == f"{{{SVG_NAMESPACE}}}svg"
    assert not re.search(r"\bnan\b|\binf\b", svg, re.IGNORECASE)
    assert not svg.startswith("<?xml") and "<!DOCTYPE" not in svg  # inline in HTML as it is
    return root


def svg_texts(svg):
    """The text of every <text> element, in document order."""
    return ["".join(element.itertext()) for element in parse_svg(svg).iter(f"{{{SVG_NAMESPACE}}}text")]


def positioned_texts(svg):
    """{text: (x, y)} of every <text> element."""
    return {"".join(element.itertext()): (float(element.get("x")), float(element.get("y")))
            for element in parse_svg(svg).iter(f"{{{SVG_NAMESPACE}}}text")}


def page_svgs(html):
    return re.findall(r"<svg\b.*?</svg>", html, re.DOTALL)


def markers(svg, color):
    """How many markers of `color` are drawn (the plotted points, plus one in the legend)."""
    return len(re.findall(rf'<use href="#[^"]+" x="[^"]+" y="[^"]+" style="fill: {color}', svg))


def assert_evenly_spaced(values):
    steps = [b - a for a, b in zip(values, values[1:])]
    assert steps and all(math.isclose(step, steps[0], rel_tol=1e-3) for step in steps), values


def test_plots_handle_empty_single_and_undrawable_data():
    for svg in (plots.scatter_plot([], x_title="x", y_title="y", figure_id="a"),
                plots.line_plot([plots.Series("a", [], [])], x_title="x", y_title="y", figure_id="b"),
                plots.step_plot([plots.StepSeries("a", [0.0, -1.0], [1.0])], x_title="x", y_title="y", figure_id="c"),
                plots.bar_chart([], [], x_title="x", y_title="y", figure_id="d")):
        assert svg_texts(svg) == ["no data"]
    single = plots.scatter_plot([plots.Series("only", [4.0], [5.0], ["int4"])], x_title="bits", y_title="ppl",
                                figure_id="single")
    assert {"int4", "only", "bits", "ppl"} <= set(svg_texts(single)) and "no data" not in single
    log_line = plots.line_plot([plots.Series("a", [0.0, -1.0, 1e-3, 1.0, float("nan")], [1.0, 2.0, 3.0, 4.0, 5.0])],
                               x_title="x", y_title="y", log_x=True, figure_id="log-line")
    assert markers(log_line, plots.PALETTE[0]) == 2 + 1  # only the two positive x survive (+ the legend's)
    assert {"10\u207b\u00b3", "1"} <= set(svg_texts(log_line))
    step = plots.step_plot([plots.StepSeries("kl", [0.0, 1e-6, 1e-5, 1e-4], [0.2, 0.5, 0.3])],
                           x_title="KL", y_title="fraction", references=[plots.ReferenceLine(-1.0, "never", "x")],
                           figure_id="step")
    assert "never" not in step and "kl" in svg_texts(step)
    flat = plots.bar_chart(["a", "b"], [plots.BarSeries("zero", [0.0, None], [float("nan"), 1.0])], x_title="c",
                           y_title="v", figure_id="flat")
    assert {"a", "b", "c", "v"} <= set(svg_texts(flat))


def test_plot_text_is_escaped():
    svg = plots.scatter_plot([plots.Series("<series>", [1.0, 2.0], [1.0, 2.0], ["a&b", "<i>"])],
                             x_title="x<1", y_title="y>2", references=[plots.ReferenceLine(1.5, "ref & co")],
                             figure_id="escaped")
    assert {"a&b", "<i>", "x<1", "y>2", "ref & co", "<series>"} <= set(svg_texts(svg))
    assert parse_svg(svg).find(f"{{{SVG_NAMESPACE}}}title").text == "y>2 vs x<1"


def test_log_axis_ticks_are_decades_evenly_spaced():
    svg = plots.step_plot([plots.StepSeries("kl", [1e-7, 1e-6, 1e-3, 1.0], [0.1, 0.6, 0.3])], x_title="KL",
                          y_title="fraction", figure_id="log")
    texts = positioned_texts(svg)
    decades = ["10\u207b\u2077", "10\u207b\u2076", "10\u207b\u2075", "10\u207b\u2074", "10\u207b\u00b3",
               "10\u207b\u00b2", "10\u207b\u00b9", "1"]
    assert set(decades) <= set(texts)
    assert_evenly_spaced([texts[label][0] for label in decades])  # a log axis: decades equally far apart


def text_boxes(svg, wanted):
    """{text: (x0, y0, x1, y1)} in SVG units for the <text> elements in `wanted`, measured with the font's metrics."""
    boxes = {}
    for element in parse_svg(svg).iter(f"{{{SVG_NAMESPACE}}}text"):
        text = "".join(element.itertext())
        if text in wanted:
            style = dict(item.split(": ", 1) for item in element.get("style").split("; "))
            size = float(style["font-size"].removesuffix("px"))
            width, _, _ = TextToPath().get_text_width_height_descent(text, FontProperties("DejaVu Sans", size=size),
                                                                     ismath=False)
            x, baseline = float(element.get("x")), float(element.get("y"))
            x0 = {"start": x, "middle": x - width / 2, "end": x - width}[style["text-anchor"]]
            boxes[text] = (x0, baseline - 0.76 * size, x0 + width, baseline + 0.24 * size)
    return boxes


def test_scatter_labels_overlap_neither_each_other_nor_the_points():
    # three points nearly on top of each other (the far fourth squeezes them): labels must spread around them
    labels = ["first", "second", "third", "far"]
    series = [plots.Series("models", [4.0, 4.0, 4.02, 16.0], [5.0, 5.002, 5.001, 6.0], labels)]
    svg = plots.scatter_plot(series, x_title="bits", y_title="ppl", figure_id="crowded",
                             references=[plots.ReferenceLine(5.001, "base")])
    boxes = text_boxes(svg, {*labels, "base"})
    assert set(boxes) == {*labels, "base"}
    dots = [(float(x), float(y)) for x, y in
            re.findall(rf'<use href="#[^"]+" x="([^"]+)" y="([^"]+)" style="fill: {plots.PALETTE[0]}', svg)][:4]
    assert len(dots) == 4
    dot_boxes = [(x - 5, y - 5, x + 5, y + 5) for x, y in dots]

    def overlap(a, b):
        return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]

    placed = list(boxes.values())
    for index, box in enumerate(placed):
        assert not any(overlap(box, other) for other in placed[index + 1:] + dot_boxes), (box, boxes, dots)


def test_a_figure_id_must_be_an_id():
    with pytest.raises(ValueError, match="figure_id"):
        plots.line_plot([plots.Series("a", [1.0], [1.0])], x_title="x", y_title="y", figure_id="two words")


def test_the_report_plots_show_their_titles_axes_and_legends():
    svgs = page_svgs(to_html(full_report()))
    assert len(svgs) == FULL_SVG_COUNT
    perplexity, kl, layer_error, layer_sensitivity, linear_sensitivity = (svg_texts(svg) for svg in svgs)
    assert {"bits per weight", "perplexity", "base: Llama-2-7b fp16", "models", "fp16", "int4 g128", "gptq w4 g128",
            "bnb-nf4", "base 5.4721"} <= set(perplexity)
    assert {"KL(base\u2016model) per token, nats", "fraction of tokens", "int4", "gptq", "nf4", "tp noise floor",
            "10\u207b\u2077", "10\u207b\u2074", "1", "10"} <= set(kl)
    assert {"decoder layer", "mean relative output error", "int4", "gptq", "0", "16"} <= set(layer_error)
    assert {"layer", "mean KL (nats)", "layer 0", "layer 1"} <= set(layer_sensitivity)
    assert {"linear", "mean KL (nats)", *LINEARS} <= set(linear_sensitivity)
    titles = [parse_svg(svg).find(f"{{{SVG_NAMESPACE}}}title").text for svg in svgs]
    assert titles == ["perplexity vs bits per weight", "fraction of tokens vs KL(base\u2016model) per token, nats",
                      "mean relative output error vs decoder layer", "mean KL (nats) per layer",
                      "mean KL (nats) per linear"]
    kl_ticks = positioned_texts(svgs[1])
    assert_evenly_spaced([kl_ticks[label][0] for label in ("10\u207b\u2076", "10\u207b\u2075", "10\u207b\u2074")])
    # text stays text, in the page's font
    assert all("font-family: 'DejaVu Sans', sans-serif" in svg for svg in svgs)
    assert all(len(svg) < 50_000 for svg in svgs)


def test_the_report_renders_byte_identical_twice_and_in_another_process():
    html = to_html(full_report())
    assert to_html(full_report()) == html
    # another interpreter, another hash seed: nothing depends on the process (time, ids, dict order)
    code = ("import json, sys; from quantkit.eval.report import to_html; "
            "sys.stdout.write(to_html(json.load(sys.stdin)))")
    result = subprocess.run([sys.executable, "-c", code], input=json.dumps(full_report()), capture_output=True,
                            text=True, encoding="utf-8", timeout=300, env={**os.environ, "PYTHONHASHSEED": "12345"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout == html


def test_plots_render_the_same_from_several_threads():
    def render(index):
        return plots.step_plot([plots.StepSeries("kl", [1e-6, 1e-5, 1e-4, 1e-3], [0.2, 0.5, 0.3])], x_title="KL",
                               y_title="fraction", figure_id=f"thread-{index % 2}")

    with ThreadPoolExecutor(max_workers=4) as pool:
        svgs = list(pool.map(render, range(4)))
    assert svgs[0::2] == [render(0)] * 2 and svgs[1::2] == [render(1)] * 2


def test_ids_are_unique_in_the_page_and_every_reference_stays_in_its_plot():
    html = to_html(full_report())
    ids = re.findall(r'\bid="([^"]*)"', html)
    assert ids and [name for name, count in collections.Counter(ids).items() if count > 1] == []
    for svg in page_svgs(html):
        own = set(re.findall(r'\bid="([^"]*)"', svg))
        references = re.findall(r'(?:href="#|url\(#)([^")]+)', svg)
        assert references and set(references) <= own
    assert "xlink" not in html and "<style" not in html.split("</head>")[1]  # no page-wide style from a plot


def test_rendering_does_not_use_agg(monkeypatch):
    from matplotlib.backends import backend_agg

    def refuse(*args, **kwargs):
        raise AssertionError("the report's plots went through Agg")

    monkeypatch.setattr(backend_agg.RendererAgg, "__init__", refuse)
    assert len(page_svgs(to_html(full_report()))) == FULL_SVG_COUNT


# --- a real browser ---------------------------------------------------------------------------------------------

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--no-first-run", "--disable-sync", "--disable-default-apps",
                  "--virtual-time-budget=2000", "--window-size=1280,2400")


@pytest.fixture
def chromium():
    executable = shutil.which("chromium")
    if executable is None:
        pytest.skip("chromium is not installed: the headless-browser render of the HTML report is not checked")
    return executable


def run_chromium(chromium, tmp_path, *arguments):
    command = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", *arguments]
    return subprocess.run(command, capture_output=True, timeout=120, env={**os.environ, "HOME": str(tmp_path)})


def png_size_and_pixels(data):
    """(width, height) from the IHDR chunk and the decompressed IDAT bytes (filtered scanlines)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    idat, offset = b"", 8
    while offset < len(data):
        length, kind = struct.unpack(">I4s", data[offset:offset + 8])
        if kind == b"IDAT":
            idat += data[offset + 8:offset + 8 + length]
        offset += 12 + length
    return (width, height), zlib.decompress(idat)


def test_chromium_renders_the_html_report(chromium, tmp_path):
    html_path = write_report(full_report(), tmp_path / "report.html")
    png_path = tmp_path / "report.png"
    result = run_chromium(chromium, tmp_path, f"--screenshot={png_path}", html_path.as_uri())
    assert png_path.is_file(), result.stderr.decode(errors="replace")[-2000:]
    data = png_path.read_bytes()
    (width, height), pixels = png_size_and_pixels(data)
    assert (width, height) == (1280, 2400)
    assert len(data) > 50_000  # a blank page compresses to a few KB
    assert len(set(pixels[: len(pixels) // 2])) > 50  # many distinct byte values: text, lines and colours


def test_chromium_keeps_the_svg_plots_in_the_dom(chromium, tmp_path):
    report = full_report()
    html_path = write_report(report, tmp_path / "report.html")
    result = run_chromium(chromium, tmp_path, "--dump-dom", html_path.as_uri())
    dom = result.stdout.decode()
    assert result.returncode == 0, result.stderr.decode(errors="replace")[-2000:]
    assert dom.count("<svg") == FULL_SVG_COUNT
    assert len(re.findall(r"<figure", dom)) == FULL_SVG_COUNT
    for entry in [report["base"], *report["models"]]:
        assert entry["name"] in dom
