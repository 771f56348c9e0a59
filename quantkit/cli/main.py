"""The `quantkit` command group: logging set up once per command, and library errors, Ctrl-C and SIGTERM turned
into one line and an exit status. The commands live in the modules beside it."""

from __future__ import annotations

import logging

import click

from quantkit.cli.evaluate import check, compare, eval_command
from quantkit.cli.model import generate, verify
from quantkit.cli.quantize import backends, quantize
import quantkit.dist as dist
from quantkit.errors import QuantkitError
from quantkit.io.files import Terminated, os_error_line, terminate_as_exception
from quantkit.version import __version__

INTERRUPTED = 128 + 2  # the exit status of a command stopped by Ctrl-C (SIGINT), as shells report it
DATA_PARALLEL = ("eval", "compare", "quantize")  # the commands that share their work over torchrun's ranks


class QuantkitGroup(click.Group):
    """Turns library errors into one-line `Error: ...` messages with exit code 1; Ctrl-C exits 130 and SIGTERM
    (handled for the whole command) 143, each with one line saying what was kept."""

    def invoke(self, ctx):
        with dist.process_group():  # under torchrun: this rank joins the others for the command
            try:
                with terminate_as_exception():
                    return super().invoke(ctx)
            except QuantkitError as e:
                said_by_main(ctx, 1)  # every rank has the error (dist.collective)
                raise click.ClickException(str(e)) from None
            except Terminated as e:  # the atomic writers removed what they had started; quantize says what it kept
                said_by_main(ctx, Terminated.exit_code)  # torchrun stops every rank
                click.echo(f"Error: {str(e) or 'terminated by SIGTERM; nothing was left half-written'}", err=True)
                ctx.exit(Terminated.exit_code)
            except KeyboardInterrupt as e:
                said_by_main(ctx, INTERRUPTED)
                click.echo(f"\nError: {str(e) or 'interrupted (Ctrl-C); nothing was left half-written'}", err=True)
                ctx.exit(INTERRUPTED)
            except click.ClickException as e:  # a usage error: every rank has it
                said_by_main(ctx, e.exit_code)
                raise
            except OSError as e:  # outside the atomic writers (whose errors are QuantkitErrors already): one line
                raise click.ClickException(os_error_line(e)) from None


def said_by_main(ctx, code: int):
    """Under torchrun, a rank other than 0 exits with `code` here, silently: rank 0 says the line once."""
    if not dist.is_main():
        ctx.exit(code)


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


@click.group(cls=QuantkitGroup, commands=[generate, eval_command, compare, quantize, verify, check, backends])
@click.version_option(__version__, prog_name="quantkit")
@click.option("-v", "--verbose", is_flag=True, help="Log progress details to stderr.")
def main(verbose: bool):
    """Quantize Llama 2 models and measure what it cost."""
    command = click.get_current_context().invoked_subcommand
    if dist.active() and command not in DATA_PARALLEL:
        raise QuantkitError(f"quantkit {command} runs in one process: run it without torchrun (it has "
                            f"{dist.world_size()} ranks; {', '.join(DATA_PARALLEL)} run data-parallel)")
    root = logging.getLogger()
    existing = list(root.handlers)
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for handler in root.handlers:
        if handler not in existing:  # the stderr handler of this command (not a host application's)
            handler.addFilter(OncePerCommand())
    if not verbose:  # CPU builds of torchao warn at import about CUDA-only extensions: noise for a user
        for name in ("torchao", "torch.utils._pytree"):
            logging.getLogger(name).setLevel(logging.ERROR)
