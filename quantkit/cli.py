"""The quantkit command line: flags -> config objects -> library calls. Nothing else lives here."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click

import quantkit
from quantkit.errors import QuantkitError
from quantkit.model.generate import SamplingConfig, generate as generate_ids
from quantkit.model.tokenizer import TextStream

DTYPE_CHOICE = click.Choice(["fp32", "fp16", "bf16"])


class QuantkitGroup(click.Group):
    """Turns library errors into one-line `Error: ...` messages with exit code 1."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except QuantkitError as e:
            raise click.ClickException(str(e)) from None


@click.group(cls=QuantkitGroup)
@click.version_option(quantkit.__version__, prog_name="quantkit")
@click.option("-v", "--verbose", is_flag=True, help="Log progress details to stderr.")
def main(verbose: bool):
    """Quantize Llama 2 models and measure what it cost."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


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
    tokenizer = quantkit.load_tokenizer(model)
    llm = quantkit.load(model, dtype=dtype)
    if chat:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        ids = tokenizer.encode_chat(messages)
    else:
        ids = tokenizer.encode(prompt)
    stream = TextStream(tokenizer, prefix=[] if chat else ids)

    def emit(token):
        if int(token[0]) != tokenizer.eos_id:
            click.echo(stream.push(int(token[0])), nl=False)
            sys.stdout.flush()

    if not chat:
        click.echo(prompt, nl=False)
    generate_ids(llm, [ids], sampling, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, on_token=emit)
    click.echo()


@main.command("eval")
@click.argument("model")
@click.option("--dataset", "dataset", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="A local text file to measure perplexity on.")
@click.option("--seq-len", default=2048, show_default=True, help="Window length in tokens.")
@click.option("--batch-size", default=1, show_default=True, help="Windows per forward pass.")
@click.option("--dtype", type=DTYPE_CHOICE, default=None, help="Compute dtype [default: the checkpoint's].")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def eval_command(model, dataset, seq_len, batch_size, dtype, as_json):
    """Perplexity of MODEL on a text file (GPTQ protocol: one BOS, non-overlapping windows)."""
    from eval import perplexity

    if not dataset.is_file():
        raise click.BadParameter(f"{dataset}: no such file", param_hint="--dataset")
    text = dataset.read_text(encoding="utf-8")
    result = perplexity(quantkit.load(model, dtype=dtype), quantkit.load_tokenizer(model), text,
                        seq_len=seq_len, batch_size=batch_size)
    if as_json:
        click.echo(json.dumps({"model": str(model), "dataset": str(dataset), **result.to_dict()}, indent=2))
    else:
        click.echo(f"perplexity {result.ppl:.4f} over {result.n_tokens} tokens "
                   f"({result.n_windows} windows of {result.seq_len}) on {dataset}")
