"""`quantkit quantize` and `quantkit backends`."""

from __future__ import annotations

import json
from pathlib import Path

import click

from quantkit.cli.options import (IGNORE_FLAG, LAYER_CALIBRATION_FLAGS, OUTPUT_FLAGS, RECIPE_FLAG, calibration_options,
                                  chosen_config, export_options, method_options, option_group)
from quantkit.run.export import ExportOptions


@click.command()
@click.argument("model")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path),
              help="Output directory (one file, OUT.gguf, for --format gguf).")
@RECIPE_FLAG
@method_options()
@option_group("calibration", *LAYER_CALIBRATION_FLAGS, build=calibration_options)
@option_group("export", *OUTPUT_FLAGS,
              click.option("--max-shard-size", default=ExportOptions.max_shard_size, show_default=True,
                           help="Largest safetensors shard."),
              click.option("--force", is_flag=True, help="Replace OUTPUT if it exists; without --resume, also discard "
                                                         "what a previous run to OUTPUT left."),
              build=export_options)
@IGNORE_FLAG
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
    if summary is None:  # a rank other than 0 under torchrun: rank 0 prints the summary
        return
    if as_json:
        click.echo(json.dumps(summary.to_dict(), indent=2))
        return
    mb = 1e6
    click.echo(f"wrote {summary.output} ({summary.format}, {summary.layers} layers) in {summary.seconds:.1f} s: "
               f"{summary.bytes_before / mb:.1f} MB -> {summary.bytes_after / mb:.1f} MB "
               f"({summary.bytes_before / max(summary.bytes_after, 1):.2f}x smaller), "
               f"{summary.bits_per_weight:.2f} bits per weight (decoder linears, scales included)")
    if summary.seconds_per_layer is not None:
        phases = ", ".join(f"{p} {s:.2g}" for p, s in summary.phases.items() if p != "assemble" and s >= 0.005)
        click.echo(f"{summary.seconds_per_layer:.2g} s per layer; seconds over the run: {phases}")
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


def config_defaults(cls) -> dict:
    """A config class's fields with their defaults (what -O KEY=VALUE sets); None for a required field."""
    import dataclasses

    return {f.name: None if f.default is dataclasses.MISSING else f.default for f in dataclasses.fields(cls)}


@click.command()
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
