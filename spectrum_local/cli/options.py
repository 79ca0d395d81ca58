"""The options commands share: messages, batch jobs, the model (local or --server), and the
options of an operation, derived from its ``spectrum_local.ops`` model by ``from_model``."""

from __future__ import annotations

import functools
import typing

import click
from annotated_types import Ge, Gt, Le, Lt

from .. import formats
from ..errors import SpectrumError
from ..ops import LoadOptions, Options

EXAMPLES = """
\b
Examples:
  spectrum-local score -d "Roll two six-sided dice. What is the sum of their values?" -c 2..12
  spectrum-local sample -d "Board games" -o Catan -o Chess -n 8
  spectrum-local top -d "A random US state" -k 10
  spectrum-local enumerate -d "Roll two six-sided dice. What is the sum of their values?"
  spectrum-local score -c 1..5 --batch in.jsonl --out out.jsonl --server http://gpu-box:8000
  spectrum-local info --model spectrum-gemma-3-12b-v1-Q4_K_M.gguf
  spectrum-local eval --suite basic --vs spectrum-gemma-3-12b-v1-F16.gguf
  spectrum-local convert tsor13/spectrum-gemma-3-12b-v1 --outtype q4_k_m
"""


def group(*options):
    """One decorator for a group of options shared by several commands."""
    def decorate(command):
        for option in reversed(options):
            command = option(command)
        return command
    return decorate


# -- options derived from an ops model --------------------------------------------------------

class BoundedOption(click.Option):
    """An option whose bounds the ops model checks (so its message is the API's), shown in
    --help as click shows a range: [default: 1; 1<=x<=10000]."""

    def __init__(self, *args, bounds: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.bounds = bounds

    def get_help_extra(self, ctx: click.Context):
        extra = super().get_help_extra(ctx)
        if self.bounds:
            extra["range"] = self.bounds
        return extra


def from_model(options: type[Options], *, skip: tuple[str, ...] = ()):
    """A click option for each field of ``options`` (but ``skip``): ``--max-tokens`` for
    max_tokens, ``-n`` for a one-letter name, ``--x/--no-x`` for a flag, with the field's
    default and help. Click only parses the text; ``options.check`` validates the values."""
    decorators = []
    for name, field in options.model_fields.items():
        if name in skip:
            continue
        flag = f"-{name}" if len(name) == 1 else "--" + name.replace("_", "-")
        kind = _plain_type(field.annotation)
        if kind is bool:
            decorators.append(click.option(f"{flag}/--no-{flag[2:]}", name, default=field.default,
                                           show_default=True, help=field.description))
            continue
        decorators.append(click.option(
            flag, name, cls=BoundedOption, type=kind, default=field.default,
            show_default=field.default not in (None, ""), help=field.description,
            bounds=_bounds(field.metadata)))
    return group(*decorators)


def _plain_type(annotation) -> type:
    """int for ``int``, ``int | None`` and ``Annotated[int, ...] | None``."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is not None and args:
        return _plain_type(args[0])
    return annotation


def _bounds(metadata: list) -> str | None:
    """The field's bounds, written as click writes a range: "1<=x", "0<x<=1"."""
    low = next((m for m in metadata if isinstance(m, (Ge, Gt))), None)
    high = next((m for m in metadata if isinstance(m, (Le, Lt))), None)
    if low is None and high is None:
        return None
    text = "x"
    if low is not None:
        text = (f"{low.ge}<=" if isinstance(low, Ge) else f"{low.gt}<") + text
    if high is not None:
        text += f"<={high.le}" if isinstance(high, Le) else f"<{high.lt}"
    return text


# -- messages -------------------------------------------------------------------------------

class MessageCommand(click.Command):
    """Keeps the command-line order of -d/-i/-o, so input/output pairs interleave as typed
    (Click on its own groups a repeated option's values together)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        _, _, order = self.make_parser(ctx).parse_args(args=list(args))
        ctx.meta["message_order"] = [p.name for p in order if p.name in formats.ROLES]
        return super().parse_args(ctx, args)


message_options = group(
    click.option("--description", "-d", multiple=True,
                 help="What to generate: a description of the distribution."),
    click.option("--input", "-i", "input", multiple=True,
                 help="An example input (repeatable; pairs with the -o that follows it)."),
    click.option("--output", "-o", multiple=True,
                 help="An example output (repeatable; order on the command line is kept)."),
    click.option("--messages", "messages_file", type=click.Path(allow_dash=True),
                 help='JSON file (or - for stdin) holding [{"role": ..., "content": ...}]; '
                      "its messages come before any -d/-i/-o."),
)


batch_options = group(
    click.option("--batch", "batch_in", metavar="IN.jsonl",
                 help="Run one prompt per JSON line of IN.jsonl (- for stdin): "
                      '{"id", "messages", ...this command\'s options}. -d/-i/-o messages '
                      "come before each line's; the command's options are the defaults."),
    click.option("--out", "batch_out", metavar="OUT.jsonl", type=click.Path(dir_okay=False),
                 help="With --batch: one result per line, with the input line's id, "
                      "flushed as it completes."),
    click.option("--resume", is_flag=True,
                 help="With --batch: skip the ids already in OUT (restart a killed job)."),
    click.option("--strict", is_flag=True,
                 help="With --batch: stop at the first malformed line instead of "
                      "reporting and skipping it."),
    click.option("--parallel", type=click.IntRange(min=1), metavar="N",
                 help="With --batch: lines in flight. Default: 16 with --server (the server "
                      "batches them), 1 locally (consecutive lines reuse the prefix cache; "
                      "more merges their decodes). Results stay in input order."),
)

json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")


# -- the model ------------------------------------------------------------------------------

class LoraSpec(click.ParamType):
    """``PATH[:SCALE]``: the scale is split off only when the text after the last colon is a
    number, so ``C:\\adapters\\a.gguf`` and ``REPO_ID:FILE.gguf`` stay whole paths."""

    name = "PATH[:SCALE]"

    def convert(self, value, param, ctx) -> tuple[str, float]:
        if isinstance(value, tuple):
            return value
        path, colon, scale = value.rpartition(":")
        if colon and path:
            try:
                return path, float(scale)  # its range is checked with the model's options
            except ValueError:
                pass
        return value, 1.0


local_model_options = group(
    click.option("--model", "-m", metavar="GGUF",
                 help="A .gguf file, or REPO_ID:FILE.gguf on the Hugging Face hub. "
                      "Default: $SPECTRUM_LOCAL_MODEL, else the small demo model."),
    click.option("--format", "format_name", type=click.Choice(sorted(formats.FORMATS)),
                 help="The prompt format; default: read from the GGUF (with --server: from "
                      "the tokenizer's control tokens)."),
    from_model(LoadOptions, skip=("batch",)),
    click.option("--lora", "lora", multiple=True, type=LoraSpec(),
                 help="A GGUF LoRA adapter to apply, with an optional scale (default 1), e.g. "
                      "--lora dice.gguf:0.5 (repeatable; a local path or REPO_ID:FILE.gguf). "
                      "Make one from a PEFT adapter with: spectrum-local convert-lora."),
    click.option("--no-lora", "no_lora", is_flag=True,
                 help="Leave out the adapter that comes with the default model (its Gemma 3 "
                      "270M base alone)."),
)

server_options = group(
    click.option("--server", "servers", multiple=True, metavar="URL",
                 help="Use the model of a server instead of a local one: spectrum-local serve "
                      "or vLLM (e.g. http://gpu-box:8000). Repeat for replicas of one model: "
                      "requests go to the least busy."),
    click.option("--api-key", envvar="SPECTRUM_LOCAL_API_KEY", metavar="KEY",
                 help="With --server: sent as 'Authorization: Bearer KEY' "
                      "(env: SPECTRUM_LOCAL_API_KEY)."),
    click.option("--tokenizer", metavar="PATH",
                 help="With a vLLM --server: the served model's tokenizer (a folder, a "
                      "tokenizer.json or a hub id). Default: the served model's id."),
)


def model_options(command):
    """The local model options and --server; the command gets ``open_model()`` instead."""
    from .common import load_model

    @functools.wraps(command)
    def with_model(*args, model, format_name, gpu_layers, threads, ctx, lora, no_lora,
                   servers, api_key, tokenizer, **kwargs):
        def open_model():
            if not servers:
                if tokenizer:
                    raise click.UsageError("--tokenizer goes with --server")
                return load_model(model, format_name, gpu_layers, threads, ctx, lora, no_lora)
            local = [name for name, value in (("--model", model), ("--gpu-layers", gpu_layers),
                                              ("--threads", threads), ("--ctx", ctx),
                                              ("--lora", lora or None),
                                              ("--no-lora", no_lora or None))
                     if value is not None]
            if local:
                raise click.UsageError(f"{', '.join(local)} set up a local model; with --server "
                                       "the server's model answers")
            try:
                from ..remote import connect
            except ImportError as e:
                raise SpectrumError(f"--server needs the remote extra: pip install "
                                    f"'spectrum-local[remote]' ({e})") from None
            return connect(servers, api_key=api_key, tokenizer=tokenizer, format=format_name)
        return command(*args, open_model=open_model, **kwargs)

    return local_model_options(server_options(with_model))
