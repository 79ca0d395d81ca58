"""The ``spectrum-local`` command line: thin commands over the Python API.

This module is the group and its error handling; each family of verbs is a module of its own
(``operations``: score, sample, top, enumerate, info; ``serve``; ``evaluate``: eval, tune;
``convert``: convert, convert-lora), and ``options`` holds the options they share, derived from
``spectrum_local.ops`` where an operation's options are defined."""

from __future__ import annotations

import os
import signal
import sys
import warnings

import click

from ..errors import InputError, SpectrumError
from ..interrupts import raise_interrupt
from . import convert, evaluate, operations, serve
from .options import EXAMPLES, LoraSpec

__all__ = ["cli", "main", "LoraSpec"]


class SpectrumGroup(click.Group):
    """Turns the runtime's errors into one line and an exit code: 2 for bad input, 1 for a
    failure, 130 for Ctrl-C."""

    def invoke(self, ctx: click.Context):
        with warnings.catch_warnings():
            warnings.simplefilter("always", UserWarning)
            warnings.showwarning = _show_warning
            try:
                return super().invoke(ctx)
            except InputError as e:
                raise _Failure(str(e), 2) from None
            except SpectrumError as e:
                raise _Failure(str(e), 1) from None
            except KeyboardInterrupt:
                # An object the interrupt caught half-built may complain from its finalizer as
                # the process exits: noise after "interrupted", never a traceback.
                sys.unraisablehook = lambda unraisable: None
                click.echo("interrupted", err=True)
                ctx.exit(130)
            except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort):
                raise
            except Exception as e:  # a bug: still one line, unless asked for the traceback
                if os.environ.get("SPECTRUM_LOCAL_VERBOSE"):
                    raise
                raise _Failure(f"internal error: {type(e).__name__}: {e} (set "
                               "SPECTRUM_LOCAL_VERBOSE=1 for the traceback)", 1) from None


class _Failure(click.ClickException):
    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def _show_warning(message, category, filename, lineno, file=None, line=None):
    click.echo(f"warning: {message}", err=True)


@click.group(cls=SpectrumGroup, epilog=EXAMPLES)
@click.version_option(package_name="spectrum-local")
def cli():
    """Run spectrum-tuned language models offline: sample i.i.d. outputs, read next-token
    probabilities, and score whole candidate answers.

    A prompt is a description (-d), example inputs (-i) and example outputs (-o), or a JSON
    messages file. Message text is always plain text, never control tokens.
    """


for module in (operations, evaluate, serve, convert):
    for command in module.COMMANDS:
        cli.add_command(command)


def main() -> None:
    # SIGTERM (kill, a job manager) cleans up and exits like Ctrl-C; neither is lost inside a
    # callback from llama.cpp (see ``interrupts``).
    signal.signal(signal.SIGTERM, raise_interrupt)
    signal.signal(signal.SIGINT, raise_interrupt)
    cli(prog_name="spectrum-local")
