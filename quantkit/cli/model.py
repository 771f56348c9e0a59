"""`quantkit generate` and `quantkit verify`: run a model, check a directory."""

from __future__ import annotations

import json
import sys

import click

from quantkit.cli.options import DTYPE_CHOICE
from quantkit.errors import QuantkitError
from quantkit.formats.reader import load_model
from quantkit.model.tokenizer import load_tokenizer
from quantkit.model.generate import SamplingConfig, generate as generate_ids
from quantkit.model.tokenizer import TextStream
from quantkit.quant.linear import int4_kernels


@click.command()
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
    from quantkit.formats.gguf import is_gguf
    from quantkit.formats.reader import open_checkpoint

    if is_gguf(model):
        raise QuantkitError(f"{model}: a .gguf carries no tokenizer.model for quantkit's generate: run it in llama.cpp "
                            f"(llama-cli -m {model}), or measure it with quantkit eval {model} --base DIR")
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


@click.command()
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
