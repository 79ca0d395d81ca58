"""What the operation commands do alike: gather the messages, load the model, run one prompt or
a --batch job, print JSON."""

from __future__ import annotations

import json
import time
import warnings

import click

from .. import formats
from ..errors import InputError
from ..model import SpectrumModel, load
from ..ops import LoadOptions, Options
from ..textfile import read_text


def messages(ctx: click.Context, description, input, output, messages_file) -> list[dict]:
    """The messages of --messages, then -d/-i/-o in command-line order (not yet validated)."""
    found = []
    if messages_file:
        found += _read_messages_file(messages_file)
    values = {"description": list(description), "input": list(input), "output": list(output)}
    for role in ctx.meta.get("message_order", []):
        found.append({"role": role, "content": values[role].pop(0)})
    return found


def _read_messages_file(path: str) -> list:
    text = read_text(path, "messages file")
    name = "stdin" if path == "-" else path
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"messages from {name} are not valid JSON: {e.msg} at line {e.lineno}, "
                         f"column {e.colno}") from None
    if not isinstance(parsed, list):
        raise InputError(f'messages from {name} must be a JSON list of {{"role", "content"}} objects')
    return parsed


def load_model(model, format_name, gpu_layers, threads, ctx, lora=(),
               no_lora=False) -> SpectrumModel:
    """The local model, its numbers checked first (one line, before anything loads)."""
    LoadOptions.check(gpu_layers=gpu_layers, threads=threads, ctx=ctx)
    spectrum_model = load(model, format=format_name, gpu_layers=gpu_layers, threads=threads,
                          ctx=ctx, lora=lora, no_lora=no_lora)
    if spectrum_model.notice:
        click.echo(spectrum_model.notice, err=True)
    return spectrum_model


def emit_json(model: SpectrumModel, **fields) -> None:
    click.echo(json.dumps({"model": model.path, "format": model.format, **fields},
                          ensure_ascii=False))


def run(operation: str, options: Options | dict, messages: list[dict], open_model, run_one,
        batch_in, batch_out, resume, strict, parallel) -> None:
    """Either the single prompt of the command line, or a --batch job over a JSONL file whose
    lines' options default to ``options`` (checked already; a dict when some are missing)."""
    if not batch_in:
        if batch_out or resume or strict or parallel:
            raise click.UsageError("--out, --resume, --strict and --parallel go with --batch")
        parsed = formats.parse_messages(messages)  # fail fast, before loading the model
        run_one(open_model(), parsed)
        return
    from ..batch import open_batch

    if not batch_out:
        raise click.UsageError("--batch needs --out OUT.jsonl")
    if messages:
        with warnings.catch_warnings():  # each line adds its own messages: check roles only
            warnings.simplefilter("ignore")
            formats.parse_messages(messages)
    defaults = options.model_dump() if isinstance(options, Options) else options
    # The files first (the output opened, locked and checked, the input read): their errors
    # come at once, not after the model has loaded.
    with open_batch(operation, batch_in, batch_out, defaults=defaults, resume=resume,
                    strict=strict,
                    report=lambda line: click.echo(f"warning: {line}", err=True)) as batch:
        model = open_model()
        start = time.monotonic()
        summary = batch.run(model, messages, parallel)
    click.echo(summary.line(time.monotonic() - start), err=True)
