"""The quantkit command line: flags -> config objects -> library calls. Nothing else lives here."""

from __future__ import annotations

import functools
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import click

from quantkit.formats.reader import load_model
from quantkit.model.checkpoint import load_tokenizer
from quantkit.version import __version__
from quantkit.dtypes import CHOICES
from quantkit.errors import QuantkitError
from quantkit.io.files import Terminated, os_error_line, terminate_as_exception
from quantkit.model.generate import SamplingConfig, generate as generate_ids
from quantkit.model.tokenizer import TextStream
from quantkit.quant.linear import int4_kernels

DTYPE_CHOICE = click.Choice(CHOICES)


INTERRUPTED = 128 + 2  # the exit status of a command stopped by Ctrl-C (SIGINT), as shells report it


class QuantkitGroup(click.Group):
    """Turns library errors into one-line `Error: ...` messages with exit code 1; Ctrl-C exits 130 and SIGTERM
    (handled for the whole command) 143, each with one line saying what was kept."""

    def invoke(self, ctx):
        try:
            with terminate_as_exception():
                return super().invoke(ctx)
        except QuantkitError as e:
            raise click.ClickException(str(e)) from None
        except Terminated as e:  # the atomic writers removed what they had started; quantize says what it kept
            click.echo(f"Error: {str(e) or 'terminated by SIGTERM; nothing was left half-written'}", err=True)
            ctx.exit(Terminated.exit_code)
        except KeyboardInterrupt as e:
            click.echo(f"\nError: {str(e) or 'interrupted (Ctrl-C); nothing was left half-written'}", err=True)
            ctx.exit(INTERRUPTED)
        except OSError as e:  # outside the atomic writers (whose errors are QuantkitErrors already): one line too
            raise click.ClickException(os_error_line(e)) from None


class OncePerCommand(logging.Filter):
    """Each warning once: a command opens a checkpoint several times (tokenizer, metadata, weights), and what
    the checkpoint reader warns about (a config dtype unlike the stored one, a stale index) is one fact."""

    def __init__(self):
        super().__init__()
        self.seen: set[tuple[str, str]] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        key = (record.name, record.getMessage())
        if key in self.seen:
            return False
        self.seen.add(key)
        return True


@click.group(cls=QuantkitGroup)
@click.version_option(__version__, prog_name="quantkit")
@click.option("-v", "--verbose", is_flag=True, help="Log progress details to stderr.")
def main(verbose: bool):
    """Quantize Llama 2 models and measure what it cost."""
    root = logging.getLogger()
    existing = list(root.handlers)
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for handler in root.handlers:
        if handler not in existing:  # the stderr handler of this command (not a host application's)
            handler.addFilter(OncePerCommand())
    if not verbose:  # CPU builds of torchao warn at import about CUDA-only extensions: noise for a user
        for name in ("torchao", "torch.utils._pytree"):
            logging.getLogger(name).setLevel(logging.ERROR)


@main.command()
@click.argument("model")
@click.argument("prompt")
@click.option("--max-new-tokens", default=64, show_default=True, help="Tokens to generate.")
@click.option("--temperature", default=0.0, show_default=True, help="0 = greedy; > 0 samples.")
@click.option("--top-p", default=1.0, show_default=True, help="Nucleus sampling mass.")
@click.option("--seed", type=int, default=None, help="Seed for sampling.")
@click.option("--chat", is_flag=True, help="Wrap the prompt in Llama-2-chat's [INST] format.")
@click.option("--system", default=None, help="System prompt (with --chat).")
@click.option("--dtype", type=DTYPE_CHOICE, default=None, help="Compute dtype [default: the checkpoint's].")
def generate(model, prompt, max_new_tokens, temperature, top_p, seed, chat, system, dtype):
    """Continue PROMPT with MODEL (a directory or hub id), streaming tokens to stdout."""
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
    if system is not None and not chat:
        raise click.UsageError("--system needs --chat")
    from quantkit.formats.reader import open_checkpoint

    tokenizer = load_tokenizer(model)
    if chat:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        ids = tokenizer.encode_chat(messages)
    else:
        ids = tokenizer.encode(prompt)
    tokenizer.check_ids(ids, open_checkpoint(model).config.vocab_size)  # before the weights are read
    llm = load_model(model, dtype=dtype)
    stream = TextStream(tokenizer, prefix=[] if chat else ids)

    def emit(token):
        if int(token[0]) != tokenizer.eos_id:
            click.echo(stream.push(int(token[0])), nl=False)
            sys.stdout.flush()

    if not chat:
        click.echo(prompt, nl=False)
    try:
        with int4_kernels(llm):  # generation runs on the fast kernel also in fp32 (measurements compute exactly)
            generate_ids(llm, [ids], sampling, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, on_token=emit)
    finally:
        click.echo()  # the text so far ends its line, also before an error


def option_group(name: str, *options, build=dict):
    """Add click options to a command and hand their values to it as one object, `name` = build(**values)."""
    probe = lambda: None  # noqa: E731  (collects the parameter names the options create)
    for option in options:
        option(probe)
    names = [p.name for p in probe.__click_params__]

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


method_options = functools.partial(
    option_group, "method_choice",
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
    click.option("-O", "--option", "option_pairs", multiple=True, metavar="KEY=VALUE",
                 help="Any field of the method's config (see `quantkit backends --json`), e.g. -O block_size=64; "
                      "the value is read as the field's type (int, float, true/false, text). Repeatable; plugin "
                      "backends' options too."),
    build=method_choice)

FLAGS = {"desc_act": "--act-order", "damp_percent": "--damp", "symmetric": "--sym/--asym",
         "double_quant": "--double-quant/--no-double-quant", "true_sequential": "--true-sequential/--no-true-sequential"}
FLAG_FIELDS = {"bits", "group_size", "symmetric", "threshold", "double_quant", "blocksize", "compute_dtype", "desc_act",
               "static_groups", "damp_percent", "true_sequential", "mse"}  # config fields with a flag of their own
BOOLEANS = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}


def flag(field_name: str) -> str:
    if field_name not in FLAG_FIELDS:
        return f"-O {field_name}=..."
    return FLAGS.get(field_name, "--" + field_name.replace("_", "-"))


def typed_value(key: str, text: str, field_type: str):
    """-O's text as the config field's declared type (dataclass annotations: int, float, bool, str)."""
    kind = field_type.split("|")[0].strip()
    try:
        if kind == "bool":
            return BOOLEANS[text.strip().lower()]
        if kind == "int":
            return int(text)
        if kind == "float":
            return float(text)
    except (KeyError, ValueError):
        want = {"bool": "true or false", "int": "an integer", "float": "a number"}[kind]
        raise click.BadParameter(f"{key}={text}: {key} is {want}", param_hint="-O/--option") from None
    return text


def parse_pairs(pairs: tuple[str, ...], field_types: dict[str, str]) -> dict:
    """-O KEY=VALUE pairs -> {KEY: value} typed by the config's fields; unknown keys pass on for the config to name."""
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
        fields[key] = typed_value(key, text, str(field_types[key])) if key in field_types else text
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
    types = {f.name: f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
             for f in dataclasses.fields(cls)}  # annotations are strings under `from __future__ import annotations`
    pairs = parse_pairs(choice.pairs, types)
    both = sorted(set(pairs) & set(given))
    if both:
        raise click.UsageError(f"{', '.join(both)} given twice (a flag and -O): give it once")
    return QuantConfig.from_dict({"method": choice.method, **given, **pairs})


def chosen_config(choice: MethodChoice, recipe: Path | None, calibrated: bool):
    """The config (or Recipe) of --method and its options, or of --recipe FILE: exactly one of them; --calib
    (`calibrated`) only for calibrated methods. Shared by quantize and plan."""
    from quantkit.backends import Recipe, needs_calibration

    if (choice.method is None) == (recipe is None):
        raise click.UsageError("give exactly one of --method and --recipe")
    if recipe is not None and choice.given():
        raise click.UsageError("method options (--bits, --group-size, -O, ...) go into the recipe file with --recipe")
    config = Recipe.from_file(recipe) if recipe is not None else build_config(choice)
    if calibrated and not needs_calibration(Recipe.of(config)):
        raise click.UsageError("--calib applies to calibrated methods (gptq) only")
    return config


# -- calibration, export and dataset options --------------------------------------------------------

CALIB_HELP = ("Calibration data (gptq): wikitext2, c4, ptb, a text/jsonl/parquet/csv file, a saved dataset "
              "directory, or a .pt/.safetensors token tensor.")
CALIBRATION_FLAGS = (
    click.option("--calib", help=CALIB_HELP),
    click.option("--calib-mode", type=click.Choice(["random", "document"]), default=None,
                 help="Windows at random offsets of the joined text (GPTQ; default) or one per document (c4's default)."),
    click.option("--calib-field", default="text", show_default=True, help="Text field of .jsonl/.parquet/.csv sources."),
    click.option("--n-samples", default=128, show_default=True, help="Calibration windows."),
    click.option("--seed", default=0, show_default=True, help="Seed for sampling the windows."))


def calibration_options(calib, calib_mode, calib_field, n_samples, seed, seq_len=2048, device="cpu",
                        calib_dtype=None):
    from quantkit.run.calibrator import CalibrationOptions

    if calib is None:
        if calib_dtype is not None:
            raise click.UsageError("--calib-dtype applies with --calib (calibrated methods)")
        return None
    return CalibrationOptions(calib, n_samples=n_samples, seq_len=seq_len, seed=seed, mode=calib_mode,
                              text_field=calib_field, device=device, dtype=calib_dtype)


def export_options(fmt, dtype, max_shard_size, force):
    from quantkit.run.export import ExportOptions

    return ExportOptions(format=fmt, dtype=dtype, max_shard_size=max_shard_size, overwrite=force)


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


@dataclass
class DatasetChoice:
    dataset: str
    text_field: str
    seq_len: int
    stride: int | None


def eval_options(dtype, device, batch_size, speed, tps, tp_windows):
    from quantkit.eval.compare import EvalOptions

    return EvalOptions(dtype=dtype, device=device, batch_size=batch_size, speed=speed, tps=parse_tps(tps),
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
        click.option("--seq-len", default=2048, show_default=True, help="Window length in tokens."),
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


def load_eval_data(model, data: DatasetChoice, output: ReportChoice):
    """The evaluation windows, once the report paths are known to be writable (fail before the work)."""
    from quantkit.eval import eval_data
    from quantkit.eval.report import check_report_path
    from quantkit.formats.reader import open_checkpoint

    for path in output.reports:
        check_report_path(path)
    vocab_size = open_checkpoint(model).config.vocab_size  # ids the tokenizer gives beyond it are refused
    return eval_data(load_tokenizer(model), data.dataset, seq_len=data.seq_len, stride=data.stride,
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


@main.command("eval")
@click.argument("model")
@click.option("--base", help="Reference model (normally the fp16 original): adds KL, top-1, delta-p against it.")
@click.option("--base-logits", type=click.Path(dir_okay=False, path_type=Path),
              help="The reference's log-probs saved with --save-logits, instead of --base (one model in memory).")
@click.option("--save-logits", type=click.Path(dir_okay=False, path_type=Path),
              help="Save MODEL's log-probs on this dataset to FILE (.qkl), a --base-logits for later runs.")
@click.option("--top-k", type=int, help="With --save-logits: keep the top K log-probs and the rest's mass only "
                                        "(~100x smaller; KL becomes a lower bound) [default: all, 16-bit].")
@click.option("--sensitivity", type=click.Choice(["layer", "linear"]),
              help="Quantize one decoder layer (or one linear type) at a time with --method and report its KL.")
@method_options()
@option_group("calibration", *CALIBRATION_FLAGS)
@dataset_options
def eval_command(model, base, base_logits, save_logits, top_k, sensitivity, method_choice, calibration, data,
                 options, output):
    """Perplexity of MODEL and, against --base or --base-logits, its logit fidelity (KL, top-1, delta-p).

    --sensitivity takes the same method options as quantize (--method, --bits, ..., -O KEY=VALUE) and,
    for calibrated methods, the same calibration options (windows of --seq-len tokens).
    """
    from quantkit.eval.compare import run_eval

    if top_k is not None and save_logits is None:
        raise click.UsageError("--top-k applies to --save-logits")
    if (sensitivity is None) != (method_choice.method is None):
        raise click.UsageError("--sensitivity and --method go together")
    if sensitivity is None and method_choice.given():
        raise click.UsageError("method options (--bits, --group-size, -O, ...) apply to --sensitivity only")
    eval_windows = load_eval_data(model, data, output)
    if sensitivity:
        options.sensitivity = sensitivity_options(model, sensitivity, method_choice, calibration, data.seq_len,
                                                  options.device)
    report = run_eval(model, eval_windows, base=base, base_logits=base_logits, save_logits=save_logits, top_k=top_k,
                      options=options)
    if save_logits is not None and not output.as_json:
        click.echo(f"saved {model}'s log-probs to {save_logits}")
    emit_report(report, output)


def sensitivity_options(model, unit, method_choice: MethodChoice, calibration: dict, seq_len: int, device) -> dict:
    from quantkit.backends import Recipe, needs_calibration
    from quantkit.run.calibrator import calibration_tensor
    from quantkit.formats.reader import open_checkpoint

    config = build_config(method_choice)
    options = calibration_options(**calibration, seq_len=seq_len, device=device)
    tokens = None
    if needs_calibration(Recipe.of(config)):
        if options is None:
            raise click.UsageError(f"--sensitivity with --method {method_choice.method} needs --calib")
        tokens = calibration_tensor(options, open_checkpoint(model))
    elif options is not None:
        raise click.UsageError("--calib applies to calibrated methods (gptq) only")
    return {"unit": unit, "config": config, "calibration": tokens}


@main.command()
@click.argument("base")
@click.argument("models", nargs=-1, required=True)
@click.option("--base-logits", type=click.Path(dir_okay=False, path_type=Path),
              help="BASE's log-probs saved with `quantkit eval BASE --save-logits`: BASE is then not run.")
@dataset_options
def compare(base, models, base_logits, data, options, output):
    """Compare quantized MODELS with BASE in one table: size, bits/weight, perplexity, KL, top-1, tokens/s."""
    from quantkit.eval.compare import run_compare

    eval_windows = load_eval_data(base, data, output)
    emit_report(run_compare(base, list(models), eval_windows, base_logits=base_logits, options=options), output)


@main.command()
@click.argument("model")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="Output directory.")
@click.option("--recipe", type=click.Path(path_type=Path), help="JSON/YAML recipe mapping module patterns to configs.")
@method_options()
@option_group("calibration", *CALIBRATION_FLAGS,
              click.option("--seq-len", default=2048, show_default=True, help="Tokens per calibration window."),
              click.option("--device", default="cpu", show_default=True,
                           help="Where each layer is calibrated (cpu, cuda)."),
              click.option("--calib-dtype", type=DTYPE_CHOICE, default=None,
                           help="What calibration computes in [default: fp32 on CPU, the checkpoint's dtype on CUDA]; "
                                "never a smaller range than the checkpoint's."),
              build=calibration_options)
@option_group("export",
              click.option("--format", "fmt", type=FormatChoice(), help="Export format [default: the method's first]."),
              click.option("--dtype", type=DTYPE_CHOICE, default=None,
                           help="dtype of what stays unquantized [default: the checkpoint's]."),
              click.option("--max-shard-size", default="5GB", show_default=True, help="Largest safetensors shard."),
              click.option("--force", is_flag=True, help="Replace OUTPUT if it exists; without --resume, also discard "
                                                         "what a previous run to OUTPUT left."),
              build=export_options)
@click.option("--ignore", multiple=True, help="Regex of module names to keep unquantized (repeatable).")
@click.option("--resume", is_flag=True, help="Continue a previous run to OUTPUT after its last finished layer "
                                             "(refused if the model, options or environment changed).")
@click.option("--keep-work/--no-keep-work", default=True, show_default=True,
              help="Keep the finished layers (.OUTPUT.quantkit-work) when the run stops, for --resume.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def quantize(model, output, recipe, method_choice, calibration, export, ignore, resume, keep_work, as_json):
    """Quantize MODEL layer by layer and write it to OUTPUT in an export format.

    Each finished layer is kept beside OUTPUT (.OUTPUT.quantkit-work) until the output is complete, so a run
    stopped by Ctrl-C, SIGTERM, a full disk, a crash or SIGKILL continues with --resume."""
    from quantkit.run.pipeline import quantize_checkpoint

    config = chosen_config(method_choice, recipe, calibrated=calibration is not None)
    summary = quantize_checkpoint(model, config, output, export=export, calibration=calibration, ignore=tuple(ignore),
                                  resume=resume, keep_work=keep_work)
    if as_json:
        click.echo(json.dumps(summary.to_dict(), indent=2))
        return
    mb = 1e6
    click.echo(f"wrote {summary.output} ({summary.format}, {summary.layers} layers) in {summary.seconds:.1f} s: "
               f"{summary.bytes_before / mb:.1f} MB -> {summary.bytes_after / mb:.1f} MB "
               f"({summary.bytes_before / max(summary.bytes_after, 1):.2f}x smaller), "
               f"{summary.bits_per_weight:.2f} bits per quantized weight")
    errors = [e for e in summary.errors if e["relative_error"] is not None]
    if errors:
        worst = max(errors, key=lambda e: e["relative_error"])
        kinds = " and ".join(sorted({e["kind"] for e in errors}))
        click.echo(f"relative {kinds} error per linear: mean {sum(e['relative_error'] for e in errors) / len(errors):.4f}, "
                   f"worst {worst['relative_error']:.4f} ({worst['name']}); --json lists them all")
    dead = [e for e in summary.errors if e.get("dead_inputs")]
    if dead:
        click.echo(f"dead inputs: {len(dead)} linears had input channels that were zero on every calibration token "
                   f"({sum(e['dead_inputs'] for e in dead)} in all; GPTQ set their weight columns to 0): calibrate on "
                   f"text that uses them; --json lists them")


@main.command()
@click.argument("directory")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def verify(directory, as_json):
    """Check DIRECTORY against its sha256 manifest, config.json and its format; exit 1 listing every problem."""
    from quantkit.formats.verify import verify_dir

    report = verify_dir(directory)
    for warning in report.warnings:
        click.echo(f"Warning: {warning}", err=True)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        click.echo("\n".join(report.problems) if report.problems else report.summary())
    if report.problems:
        raise QuantkitError(f"{report.directory}: {len(report.problems)} problem(s) found: restore the files named "
                            f"from a good copy, or quantize again")


@main.command()
@click.argument("out")
@click.option("--base", required=True, help="The model OUT was quantized from (normally the fp16 original).")
@click.option("--dataset", default="wikitext2", show_default=True,
              help="wikitext2, c4, or a local .txt/.jsonl/.json/.parquet/.csv file or save_to_disk directory.")
@click.option("--text-field", default="text", show_default=True, help="Text field of .jsonl/.parquet/.csv.")
@click.option("--seq-len", default=512, show_default=True, help="Window length in tokens.")
@click.option("--windows", default=4, show_default=True, help="How many windows run through every runtime.")
@click.option("--tolerance", default=1e-4, show_default=True, type=float,
              help="Mean KL (nats) a runtime may add against quantkit's fp32 model before check fails.")
@click.option("--dtype", type=DTYPE_CHOICE, default=None,
              help="dtype of every external runtime [default: what each serves: bf16 for GPTQ kernels, else fp32].")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def check(out, base, dataset, text_field, seq_len, windows, tolerance, dtype, as_json):
    """Run OUT through every runtime that serves its format and through quantkit; exit 1 if one adds error."""
    from quantkit.eval import eval_data
    from quantkit.eval.check import CheckOptions, failed, quantized_format, run_check, runtime_python, to_text
    from quantkit.formats.reader import open_checkpoint

    runtime_python(quantized_format(out))  # before the dataset is read
    if tolerance < 0:
        raise click.BadParameter(f"{tolerance}: give a KL of 0 or more", param_hint="--tolerance")
    data = eval_data(load_tokenizer(base), dataset, seq_len=seq_len, text_field=text_field,
                     vocab_size=open_checkpoint(base).config.vocab_size)
    report = run_check(out, base, data, CheckOptions(tolerance=tolerance, windows=windows, dtype=dtype))
    click.echo(json.dumps(report, indent=2) if as_json else to_text(report))
    if failed(report):
        bad = ", ".join(row["runtime"] for row in report["rows"] if row["passed"] is False)
        raise QuantkitError(f"{out}: {bad} did not load it or added more than {tolerance:g} nats of mean KL "
                            f"against quantkit's model (see above)")


def config_defaults(cls) -> dict:
    """A config class's fields with their defaults (what -O KEY=VALUE sets); None for a required field."""
    import dataclasses

    return {f.name: None if f.default is dataclasses.MISSING else f.default for f in dataclasses.fields(cls)}


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def backends(as_json):
    """List the quantization methods, what they need, and whether they are usable here."""
    from quantkit.backends import BACKENDS

    rows = [{"method": b.name, "calibration": b.needs_calibration, "devices": list(b.devices),
             "formats": list(b.formats) or ["any that holds it"], "usable": b.unusable_reason() is None,
             "why_not": b.unusable_reason(), "description": b.description, "options": config_defaults(b.config_cls)}
            for b in BACKENDS.all()]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for r in rows:
        status = "usable" if r["usable"] else f"NOT usable: {r['why_not']}"
        click.echo(f"{r['method']:<10} calibration={'yes' if r['calibration'] else 'no ':<3}  "
                   f"devices={','.join(r['devices']):<8}  formats={','.join(r['formats']):<25}  {status}")
        click.echo(f"{'':<10} {r['description']}")


def plan_calibration(calib, calib_mode, calib_field, n_samples, seed, seq_len=2048, device="cpu", calib_dtype=None):
    """The calibration a plan assumes: the flags' n_samples, seq_len, device and dtype (the data is not read)."""
    from quantkit.run.calibrator import CalibrationOptions

    return CalibrationOptions(calib, n_samples=n_samples, seq_len=seq_len, seed=seed, mode=calib_mode,
                              text_field=calib_field, device=device, dtype=calib_dtype)


@main.command()
@click.argument("model")
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Where the output would go: adds its free disk.")
@click.option("--recipe", type=click.Path(path_type=Path), help="JSON/YAML recipe mapping module patterns to configs.")
@method_options()
@option_group("calibration", *CALIBRATION_FLAGS,
              click.option("--seq-len", default=2048, show_default=True, help="Tokens per calibration window."),
              click.option("--device", default="cpu", show_default=True, help="Where each layer is calibrated."),
              click.option("--calib-dtype", type=DTYPE_CHOICE, default=None, help="What calibration computes in."),
              build=plan_calibration)
@option_group("export",
              click.option("--format", "fmt", type=FormatChoice(), help="Export format [default: the method's first]."),
              click.option("--dtype", type=DTYPE_CHOICE, default=None,
                           help="dtype of what stays unquantized [default: the checkpoint's]."),
              build=lambda fmt, dtype: export_options(fmt, dtype, "5GB", False))
@click.option("--ignore", multiple=True, help="Regex of module names to keep unquantized (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON (bytes and seconds).")
def plan(model, output, recipe, method_choice, calibration, export, ignore, as_json):
    """Estimate what quantizing MODEL takes (peak RAM and GPU, output and work-directory size, time) before it runs.

    MODEL is a directory, a hub id, or a preset (llama2-7b, llama2-13b, llama2-70b: fp16, no weights needed).
    Options as `quantize` takes them; calibration data is not read (only --n-samples and --seq-len count).
    """
    from quantkit.plan.planner import make_plan, plan_table

    config = chosen_config(method_choice, recipe, calibrated=calibration.source is not None)
    result = make_plan(model, config, export=export, calibration=calibration, ignore=tuple(ignore), out_dir=output)
    click.echo(json.dumps(result.to_dict(), indent=2) if as_json else plan_table(result))

