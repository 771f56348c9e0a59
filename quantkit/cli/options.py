"""Options shared by several commands, each group handed to its command as one object (a config, CalibrationOptions,
ExportOptions, the eval options, the dataset, the report paths)."""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass
from pathlib import Path

import click

from quantkit.calibrate.sources import SEQ_LEN
from quantkit.dtypes import CHOICES
from quantkit.errors import QuantkitError
from quantkit.run.calibrator import CalibrationOptions
from quantkit.run.export import ExportOptions

DTYPE_CHOICE = click.Choice(CHOICES)


def click_params(options) -> list[click.Parameter]:
    """The parameters a sequence of click.option decorators creates, in order."""
    probe = lambda: None  # noqa: E731
    for option in options:
        option(probe)
    return list(probe.__click_params__)


def option_group(name: str, *options, build=dict):
    """Add click options to a command and hand their values to it as one object, `name` = build(**values)."""
    names = [p.name for p in click_params(options)]

    def decorate(f):
        @functools.wraps(f)
        def wrapper(*args, **kwargs):
            kwargs[name] = build(**{n: kwargs.pop(n) for n in names})
            return f(*args, **kwargs)
        for option in reversed(options):
            wrapper = option(wrapper)
        return wrapper
    return decorate


# -- method options, shared by quantize and eval --sensitivity --------------------------------------

@dataclass
class MethodChoice:
    """--method and the method's options: flags for the built-in fields, -O KEY=VALUE for any config field."""

    method: str | None
    flags: dict  # config field -> value given with its own flag
    pairs: tuple[str, ...]  # -O KEY=VALUE, as typed

    def given(self) -> bool:
        return any(v is not None for v in self.flags.values()) or bool(self.pairs)


def method_choice(method, option_pairs, **flags) -> MethodChoice:
    return MethodChoice(method, flags, option_pairs)


METHOD_FLAGS = (
    click.option("--method", help="Quantization method (see `quantkit backends`)."),
    click.option("--bits", type=int, help="Bits per weight (rtn, gptq)."),
    click.option("--group-size", type=int, help="Input columns per scale; -1 = per channel."),
    click.option("--sym/--asym", "symmetric", default=None, help="Symmetric or asymmetric (rtn, gptq)."),
    click.option("--threshold", type=float, help="LLM.int8 outlier threshold (bnb-int8)."),
    click.option("--double-quant/--no-double-quant", default=None, help="Quantize the absmax too (bnb-nf4/fp4)."),
    click.option("--blocksize", type=int, help="Block size (bnb-nf4/fp4)."),
    click.option("--compute-dtype", type=DTYPE_CHOICE, help="Compute dtype (bnb-nf4/fp4)."),
    click.option("--act-order", "desc_act", is_flag=True, default=None,
                 help="GPTQ: columns by decreasing Hessian diagonal."),
    click.option("--static-groups", is_flag=True, default=None, help="GPTQ: qparams fixed per group before act-order."),
    click.option("--damp", "damp_percent", type=float,
                 help="GPTQ: dampening, fraction of the mean Hessian diagonal [0.01]."),
    click.option("--true-sequential/--no-true-sequential", default=None,
                 help="GPTQ: q/k/v, o, gate/up, down in turn [on]."),
    click.option("--mse", is_flag=True, default=None, help="GPTQ: search each group's clipping range."),
    click.option("--awq", is_flag=True, default=None, help="GPTQ: AWQ's activation-aware scaling of each layer first."),
    click.option("-O", "--option", "option_pairs", multiple=True, metavar="KEY=VALUE",
                 help="Any field of the method's config (see `quantkit backends --json`), e.g. -O block_size=64; "
                      "the value is read as the field's type (int, float, true/false, text). Repeatable; plugin "
                      "backends' options too."))
method_options = functools.partial(option_group, "method_choice", *METHOD_FLAGS, build=method_choice)



FLAGS = {p.name: "/".join(p.opts[:1] + p.secondary_opts[:1])  # config field -> its flag, as help shows it
         for p in click_params(METHOD_FLAGS) if p.name not in ("method", "option_pairs")}


def flag(field_name: str) -> str:
    return FLAGS.get(field_name, f"-O {field_name}=...")


def parse_pairs(pairs: tuple[str, ...]) -> dict[str, str]:
    """-O KEY=VALUE pairs -> {KEY: text}, typed later by the config (QuantConfig.parse_strings)."""
    fields = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise click.BadParameter(f"{pair!r}: write KEY=VALUE, e.g. -O group_size=64", param_hint="-O/--option")
        if key == "method":
            raise click.BadParameter("the method is --method's, not an option: -O sets its config's fields",
                                     param_hint="-O/--option")
        if key in fields:
            raise click.BadParameter(f"{key} given twice: give it once", param_hint="-O/--option")
        fields[key] = text
    return fields


def build_config(choice: MethodChoice):
    """A backend config from --method, its flags and -O pairs; the config validates the values."""
    import dataclasses

    from quantkit.backends import BACKENDS, QuantConfig

    cls = BACKENDS.get(choice.method).config_cls
    fields = {f.name for f in dataclasses.fields(cls)}
    given = {k: v for k, v in choice.flags.items() if v is not None}
    wrong = sorted(set(given) - fields)
    if wrong:
        known = ", ".join(flag(f) for f in sorted(fields) if f != "block_size") or "none"
        raise click.UsageError(f"{', '.join(map(flag, wrong))} does not apply to --method {choice.method} "
                               f"(its options: {known}; any field with -O KEY=VALUE)")
    pairs = cls.parse_strings(parse_pairs(choice.pairs))
    both = sorted(set(pairs) & set(given))
    if both:
        raise click.UsageError(f"{', '.join(both)} given twice (a flag and -O): give it once")
    return QuantConfig.from_dict({"method": choice.method, **given, **pairs})


def chosen_config(choice: MethodChoice, recipe: Path | None, calibrated: bool):
    """The config (or Recipe) of --method and its options, or of --recipe FILE: exactly one of them; --calib
    (`calibrated`) only for calibrated methods. Shared by quantize and plan."""
    from quantkit.backends import Recipe

    if (choice.method is None) == (recipe is None):
        raise click.UsageError("give exactly one of --method and --recipe")
    if recipe is not None and choice.given():
        raise click.UsageError("method options (--bits, --group-size, -O, ...) go into the recipe file with --recipe")
    config = Recipe.from_file(recipe) if recipe is not None else build_config(choice)
    check_calib_applies(config, calibrated)
    return config


def check_calib_applies(config, calibrated: bool):
    """--calib only with a calibrated method (the library refuses the converse: a calibrated method without data)."""
    from quantkit.backends import Recipe, needs_calibration

    if calibrated and not needs_calibration(Recipe.of(config)):
        raise click.UsageError("--calib applies to calibrated methods (gptq) only")


# -- calibration, export and dataset options --------------------------------------------------------

class FormatChoice(click.Choice):
    """--format's choices: the format registry's names, read when the command runs (plugins included)."""

    def __init__(self):
        super().__init__([])

    @property
    def choices(self):
        from quantkit.formats import format_names

        return format_names()

    @choices.setter
    def choices(self, value):  # click.Choice.__init__ assigns it; the registry is the source
        pass


CALIB_HELP = ("Calibration data (gptq): wikitext2, c4, ptb, a text/jsonl/parquet/csv file, a saved dataset "
              "directory, or a .pt/.safetensors token tensor.")
CALIBRATION_FLAGS = (
    click.option("--calib", help=CALIB_HELP),
    click.option("--calib-mode", type=click.Choice(["random", "document"]), default=None,
                 help="Windows at random offsets of the joined text (GPTQ; default) or one per document (c4's default)."),
    click.option("--calib-field", default=CalibrationOptions.text_field, show_default=True,
                 help="Text field of .jsonl/.parquet/.csv sources."),
    click.option("--n-samples", default=CalibrationOptions.n_samples, show_default=True, help="Calibration windows."),
    click.option("--seed", default=CalibrationOptions.seed, show_default=True, help="Seed for sampling the windows."))
SEQ_LEN_FLAG = click.option("--seq-len", default=CalibrationOptions.seq_len, show_default=True,
                            help="Tokens per calibration window.")
# What quantize and plan both take: the recipe, how each layer is calibrated, the format and output dtype, --ignore.
RECIPE_FLAG = click.option("--recipe", type=click.Path(path_type=Path),
                           help="JSON/YAML recipe mapping module patterns to configs.")
LAYER_CALIBRATION_FLAGS = (
    *CALIBRATION_FLAGS, SEQ_LEN_FLAG,
    click.option("--device", default=CalibrationOptions.device, show_default=True,
                 help="Where each layer is calibrated (cpu, cuda)."),
    click.option("--calib-dtype", type=DTYPE_CHOICE, default=None,
                 help="What calibration computes in [default: fp32 on CPU, the checkpoint's dtype on CUDA]; never a "
                      "smaller range than the checkpoint's."),
    click.option("--calib-batch-size", default=CalibrationOptions.batch_size, show_default=True,
                 help="Calibration windows through a layer at once."),
    click.option("--offload-activations", is_flag=True,
                 help="Keep the calibration activations in CPU memory, each batch moved to --device when used (70B "
                      "on one 24 GB GPU); the same results."))
OUTPUT_FLAGS = (
    click.option("--format", "fmt", type=FormatChoice(), help="Export format [default: the method's first]."),
    click.option("--dtype", type=DTYPE_CHOICE, default=None,
                 help="dtype of what stays unquantized [default: the checkpoint's]."))
IGNORE_FLAG = click.option("--ignore", multiple=True, help="Regex of module names to keep unquantized (repeatable).")


def calibration_options(calib, calib_mode, calib_field, n_samples, seed, seq_len=CalibrationOptions.seq_len,
                        device=CalibrationOptions.device, calib_dtype=None, calib_batch_size=CalibrationOptions.batch_size,
                        offload_activations=False):
    if calib is None:
        for flag, given in (("--calib-dtype", calib_dtype is not None), ("--offload-activations", offload_activations),
                            ("--calib-batch-size", calib_batch_size != CalibrationOptions.batch_size)):
            if given:
                raise click.UsageError(f"{flag} applies with --calib (calibrated methods)")
        return None
    return CalibrationOptions(calib, n_samples=n_samples, seq_len=seq_len, seed=seed, mode=calib_mode,
                              text_field=calib_field, device=device, dtype=calib_dtype, batch_size=calib_batch_size,
                              offload_activations=offload_activations)


def export_options(fmt, dtype, max_shard_size=ExportOptions.max_shard_size, force=False):
    return ExportOptions(format=fmt, dtype=dtype, max_shard_size=max_shard_size, overwrite=force)


@dataclass
class DatasetChoice:
    dataset: str
    text_field: str
    seq_len: int
    stride: int | None


def eval_options(dtype, device, batch_size, speed, tps, tp_windows):
    from quantkit.eval.compare import EvalOptions

    return EvalOptions(compute_dtype=dtype, device=device, batch_size=batch_size, speed=speed, tps=parse_tps(tps),
                       tp_windows=tp_windows, command=" ".join(["quantkit"] + sys.argv[1:]))


def dataset_options(f):
    """The dataset, how the models run, and where the report goes: shared by eval and compare."""
    f = option_group(
        "output",
        click.option("--report", "reports", multiple=True, type=click.Path(dir_okay=False, path_type=Path),
                     help="Write the report: .json, .md or .html (repeatable)."),
        click.option("--json", "as_json", is_flag=True, help="Print the report as JSON."),
        build=ReportChoice)(f)
    f = option_group(
        "options",
        click.option("--dtype", type=DTYPE_CHOICE, default=None, help="Compute dtype [default: the checkpoint's]."),
        click.option("--device", default="cpu", show_default=True, help="Where the models run (cpu, cuda)."),
        click.option("--batch-size", default=1, show_default=True, help="Windows per forward pass."),
        click.option("--speed/--no-speed", default=True, show_default=True, help="Measure decode tokens/s."),
        click.option("--tp", "tps", multiple=True, help="pretraining_tp comparison (the noise floor): N (repeatable), "
                                                        "or 'auto' for those of 2, 4, 8 that divide the shapes."),
        click.option("--tp-windows", type=int, help="Windows in the tp comparison [default: what fits 1 GiB of logits]."),
        build=eval_options)(f)
    return option_group(
        "data",
        click.option("--dataset", default="wikitext2", show_default=True,
                     help="wikitext2 (test split), c4 (validation, GPTQ's c4-new), or a local .txt/.jsonl/.json/"
                          ".parquet/.csv file or datasets save_to_disk directory."),
        click.option("--text-field", default="text", show_default=True, help="Text field of .jsonl/.parquet/.csv."),
        click.option("--seq-len", default=SEQ_LEN, show_default=True, help="Window length in tokens."),
        click.option("--stride", type=int, help="Sliding windows every STRIDE tokens (Hugging Face protocol) "
                                                "[default: non-overlapping windows, the GPTQ protocol]."),
        build=DatasetChoice)(f)


@dataclass
class ReportChoice:
    reports: tuple[Path, ...]
    as_json: bool


def parse_tps(tps: tuple[str, ...]) -> list[int] | None:
    if not tps:
        return None
    if tps == ("auto",):
        return []
    try:
        return [int(tp) for tp in tps]
    except ValueError:
        raise click.BadParameter(f"{', '.join(tps)}: give integers or 'auto'", param_hint="--tp") from None


def load_eval_data(model, data: DatasetChoice, output: ReportChoice, base=None):
    """The evaluation windows, once the report paths are known to be writable (fail before the work); for a .gguf
    (no tokenizer.model) tokenized by its base's tokenizer."""
    from quantkit.eval import eval_data
    from quantkit.eval.report import check_report_path
    from quantkit.eval.compare import tokenizer_of
    from quantkit.formats.reader import model_config

    for path in output.reports:
        check_report_path(path)
    vocab_size = model_config(model).vocab_size  # ids the tokenizer gives beyond it are refused
    return eval_data(tokenizer_of(model, base), data.dataset, seq_len=data.seq_len, stride=data.stride,
                     text_field=data.text_field, vocab_size=vocab_size)


def emit_report(report: dict, output: ReportChoice):
    from quantkit.eval.report import to_json, to_markdown, write_report

    click.echo(to_json(report) if output.as_json else to_markdown(report))  # first: a failed write loses no number
    written, failed = [], []
    for path in output.reports:
        try:
            written.append(write_report(report, path))
        except QuantkitError as e:  # the other reports are still written; the first failure is the exit status
            failed.append(e)
    if written and not output.as_json:
        click.echo(f"report written to {', '.join(map(str, written))}")
    if failed:
        raise failed[0]
