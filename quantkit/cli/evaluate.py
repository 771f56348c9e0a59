"""`quantkit eval`, `compare` and `check`: measure models against a base."""

from __future__ import annotations

import json
from pathlib import Path

import click

from quantkit.cli.options import (CALIBRATION_FLAGS, DTYPE_CHOICE, MethodChoice, build_config, calibration_options,
                                  check_calib_applies, dataset_options, emit_report, load_eval_data, method_options,
                                  option_group)
from quantkit.errors import QuantkitError
from quantkit.model.tokenizer import load_tokenizer


@click.command("eval")
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
    eval_windows = load_eval_data(model, data, output, base)
    if sensitivity:
        options.sensitivity = sensitivity_options(model, sensitivity, method_choice, calibration, data.seq_len,
                                                  options.device)
    report = run_eval(model, eval_windows, base=base, base_logits=base_logits, save_logits=save_logits, top_k=top_k,
                      options=options)
    if report is None:  # a rank other than 0 under torchrun: rank 0 prints and writes the report
        return
    if save_logits is not None and not output.as_json:
        click.echo(f"saved {model}'s log-probs to {save_logits}")
    emit_report(report, output)


def sensitivity_options(model, unit, method_choice: MethodChoice, calibration: dict, seq_len: int, device) -> dict:
    from quantkit.backends import Recipe, needs_calibration
    from quantkit.run.calibrator import calibration_tensor
    from quantkit.formats.reader import open_checkpoint

    config = build_config(method_choice)
    options = calibration_options(**calibration, seq_len=seq_len, device=device)
    check_calib_applies(config, options is not None)
    tokens = None
    if needs_calibration(Recipe.of(config)):
        if options is None:
            raise click.UsageError(f"--sensitivity with --method {method_choice.method} needs --calib")
        tokens = calibration_tensor(options, open_checkpoint(model))
    return {"unit": unit, "config": config, "calibration": tokens}


@click.command()
@click.argument("base")
@click.argument("models", nargs=-1, required=True)
@click.option("--base-logits", type=click.Path(dir_okay=False, path_type=Path),
              help="BASE's log-probs saved with `quantkit eval BASE --save-logits`: BASE is then not run.")
@dataset_options
def compare(base, models, base_logits, data, options, output):
    """Compare quantized MODELS with BASE in one table: size, bits/weight, perplexity, KL, top-1, tokens/s."""
    from quantkit.eval.compare import run_compare

    eval_windows = load_eval_data(base, data, output)
    report = run_compare(base, list(models), eval_windows, base_logits=base_logits, options=options)
    if report is not None:  # None on a rank other than 0 under torchrun: rank 0 prints and writes the report
        emit_report(report, output)


@click.command()
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
    report = run_check(out, base, data, CheckOptions(tolerance=tolerance, windows=windows, runtime_dtype=dtype))
    click.echo(json.dumps(report, indent=2) if as_json else to_text(report))
    if failed(report):
        bad = ", ".join(row["runtime"] for row in report["rows"] if row["passed"] is False)
        raise QuantkitError(f"{out}: {bad} did not load it or added more than {tolerance:g} nats of mean KL "
                            f"against quantkit's model (see above)")
