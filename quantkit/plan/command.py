"""`quantkit plan`: the planner's command (added to the command group by quantkit.entry; the CLI never imports it)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from quantkit.cli.options import (IGNORE_FLAG, LAYER_CALIBRATION_FLAGS, OUTPUT_FLAGS, RECIPE_FLAG, chosen_config,
                                  export_options, method_options, option_group)
from quantkit.run.calibrator import CalibrationOptions


def plan_calibration(calib, calib_mode, calib_field, n_samples, seed, seq_len, device, calib_dtype, calib_batch_size,
                     offload_activations):
    """The calibration a plan assumes: the flags' n_samples, seq_len, device, dtype, batch and where the activations
    live (the data is not read)."""
    return CalibrationOptions(calib, n_samples=n_samples, seq_len=seq_len, seed=seed, mode=calib_mode,
                              text_field=calib_field, device=device, dtype=calib_dtype, batch_size=calib_batch_size,
                              offload_activations=offload_activations)


@click.command()
@click.argument("model")
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Where the output would go: adds its free disk.")
@RECIPE_FLAG
@method_options()
@option_group("calibration", *LAYER_CALIBRATION_FLAGS, build=plan_calibration)
@option_group("export", *OUTPUT_FLAGS, build=export_options)
@IGNORE_FLAG
@click.option("--nproc", type=click.IntRange(min=1), default=1, show_default=True,
              help="Plan a data-parallel run of this many torchrun ranks (torchrun --nproc-per-node): memory per rank.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON (bytes and seconds).")
def plan(model, output, recipe, method_choice, calibration, export, ignore, nproc, as_json):
    """Estimate what quantizing MODEL takes (peak RAM and GPU, output and work-directory size, time) before it runs.

    MODEL is a directory, a hub id, or a preset (llama2-7b, llama2-13b, llama2-70b: fp16, no weights needed).
    Options as `quantize` takes them; calibration data is not read (only --n-samples and --seq-len count).
    """
    from quantkit.plan.planner import make_plan, plan_table

    config = chosen_config(method_choice, recipe, calibrated=calibration.source is not None)
    result = make_plan(model, config, export=export, calibration=calibration, ignore=tuple(ignore), out_dir=output,
                       nproc=nproc)
    click.echo(json.dumps(result.to_dict(), indent=2) if as_json else plan_table(result))
