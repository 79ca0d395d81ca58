"""The ``spectrum-local`` command line: thin commands over the Python API."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import time
import warnings

import click

from . import candidates as candidate_specs
from . import display, formats
from .engine import MAX_THREADS, MIN_CTX
from .errors import InputError, SpectrumError
from .model import SpectrumModel, load
from .textfile import open_results, read_text

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


class MessageCommand(click.Command):
    """Keeps the command-line order of -d/-i/-o, so input/output pairs interleave as typed
    (Click on its own groups a repeated option's values together)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        _, _, order = self.make_parser(ctx).parse_args(args=list(args))
        ctx.meta["message_order"] = [p.name for p in order if p.name in formats.ROLES]
        return super().parse_args(ctx, args)


def _options(*options):
    """One decorator for a group of options shared by several commands."""
    def decorate(command):
        for option in reversed(options):
            command = option(command)
        return command
    return decorate


message_options = _options(
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


batch_options = _options(
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


local_model_options = _options(
    click.option("--model", "-m", metavar="GGUF",
                 help="A .gguf file, or REPO_ID:FILE.gguf on the Hugging Face hub. "
                      "Default: $SPECTRUM_LOCAL_MODEL, else the small demo model."),
    click.option("--format", "format_name", type=click.Choice(sorted(formats.FORMATS)),
                 help="The prompt format; default: read from the GGUF (with --server: from "
                      "the tokenizer's control tokens)."),
    click.option("--gpu-layers", type=click.IntRange(min=-1),
                 help="Layers to offload to the GPU (-1: all). Default: all when llama.cpp "
                      "was built with Metal or CUDA, else 0."),
    click.option("--threads", type=click.IntRange(1, MAX_THREADS),
                 help="CPU threads (default: all cores)."),
    click.option("--ctx", "ctx_size", type=click.IntRange(min=MIN_CTX),
                 help="Context size in tokens: prompt plus what is scored or sampled. "
                      "Default: 4096, or the model's trained length if smaller."),
    click.option("--lora", "lora", multiple=True, type=LoraSpec(),
                 help="A GGUF LoRA adapter to apply, with an optional scale (default 1), e.g. "
                      "--lora dice.gguf:0.5 (repeatable; a local path or REPO_ID:FILE.gguf). "
                      "Make one from a PEFT adapter with: spectrum-local convert-lora."),
    click.option("--no-lora", "no_lora", is_flag=True,
                 help="Leave out the adapter that comes with the default model (its Gemma 3 "
                      "270M base alone)."),
)
server_options = _options(
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
    @functools.wraps(command)
    def with_model(*args, model, format_name, gpu_layers, threads, ctx_size, lora, no_lora,
                   servers, api_key, tokenizer, **kwargs):
        def open_model():
            if not servers:
                if tokenizer:
                    raise click.UsageError("--tokenizer goes with --server")
                return _load(model, format_name, gpu_layers, threads, ctx_size, lora, no_lora)
            local = [name for name, value in (("--model", model), ("--gpu-layers", gpu_layers),
                                              ("--threads", threads), ("--ctx", ctx_size),
                                              ("--lora", lora or None),
                                              ("--no-lora", no_lora or None))
                     if value is not None]
            if local:
                raise click.UsageError(f"{', '.join(local)} set up a local model; with --server "
                                       "the server's model answers")
            try:
                from .remote import connect
            except ImportError as e:
                raise SpectrumError(f"--server needs the remote extra: pip install "
                                    f"'spectrum-local[remote]' ({e})") from None
            return connect(servers, api_key=api_key, tokenizer=tokenizer, format=format_name)
        return command(*args, open_model=open_model, **kwargs)

    return local_model_options(server_options(with_model))


json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")


def _messages(ctx: click.Context, description, input, output, messages_file) -> list[dict]:
    """The messages of --messages, then -d/-i/-o in command-line order (not yet validated)."""
    messages = []
    if messages_file:
        messages += _read_messages_file(messages_file)
    values = {"description": list(description), "input": list(input), "output": list(output)}
    for role in ctx.meta.get("message_order", []):
        messages.append({"role": role, "content": values[role].pop(0)})
    return messages


def _run(operation: str, messages: list[dict], loader, run_one, defaults,
         batch_in, batch_out, resume, strict, parallel) -> None:
    """Either the single prompt of the command line, or a --batch job over a JSONL file."""
    if not batch_in:
        if batch_out or resume or strict or parallel:
            raise click.UsageError("--out, --resume, --strict and --parallel go with --batch")
        parsed = formats.parse_messages(messages)  # fail fast, before loading the model
        run_one(loader(), parsed)
        return
    from .batch import open_batch

    if not batch_out:
        raise click.UsageError("--batch needs --out OUT.jsonl")
    if messages:
        with warnings.catch_warnings():  # each line adds its own messages: check roles only
            warnings.simplefilter("ignore")
            formats.parse_messages(messages)
    # The files first (the output opened, locked and checked, the input read): their errors
    # come at once, not after the model has loaded.
    with open_batch(operation, batch_in, batch_out, defaults=defaults, resume=resume,
                    strict=strict,
                    report=lambda line: click.echo(f"warning: {line}", err=True)) as batch:
        model = loader()
        start = time.monotonic()
        summary = batch.run(model, messages, parallel)
    click.echo(summary.line(time.monotonic() - start), err=True)


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


def _load(model, format_name, gpu_layers, threads, ctx_size, lora=(),
          no_lora=False) -> SpectrumModel:
    spectrum_model = load(model, format=format_name, gpu_layers=gpu_layers, threads=threads,
                          ctx=ctx_size, lora=lora, no_lora=no_lora)
    if spectrum_model.notice:
        click.echo(spectrum_model.notice, err=True)
    return spectrum_model


def _emit_json(model: SpectrumModel, **fields) -> None:
    click.echo(json.dumps({"model": model.path, "format": model.format, **fields},
                          ensure_ascii=False))


@click.group(cls=SpectrumGroup, epilog=EXAMPLES)
@click.version_option(package_name="spectrum-local")
def cli():
    """Run spectrum-tuned language models offline: sample i.i.d. outputs, read next-token
    probabilities, and score whole candidate answers.

    A prompt is a description (-d), example inputs (-i) and example outputs (-o), or a JSON
    messages file. Message text is always plain text, never control tokens.
    """


@cli.command(cls=MessageCommand, epilog=EXAMPLES)
@message_options
@click.option("--candidates", "-c", "candidate_specs_", multiple=True, metavar="SPEC",
              help="Candidates: a range 2..12 or 0..100..10 (inclusive), or a comma list "
                   '"Fred,John" (repeatable).')
@click.option("--candidates-file", multiple=True, type=click.Path(dir_okay=False),
              help="A file with one candidate per line, kept exactly (repeatable).")
@batch_options
@model_options
@json_option
@click.pass_context
def score(ctx, description, input, output, messages_file, candidate_specs_, candidates_file,
          batch_in, batch_out, resume, strict, parallel, open_model, as_json):
    """Probability of each candidate answer as a whole output.

    For each candidate: P(its tokens, then the end-of-output token | prompt). Coverage is the
    sum over candidates (the mass the model puts on the set); normalized = prob / coverage.
    Repeated candidates are scored once; an empty candidate is an error.
    """
    messages = _messages(ctx, description, input, output, messages_file)
    candidates = candidate_specs.collect(candidate_specs_, candidates_file)
    if not candidates and not batch_in:
        raise InputError("no candidates: give --candidates (e.g. -c 2..12) or --candidates-file")

    def run_one(m, parsed):
        result = m.score(parsed, candidates)
        if as_json:
            _emit_json(m, coverage=result.coverage,
                       candidates=[c.to_dict() for c in result.candidates])
        else:
            click.echo(display.score_table(result))

    _run("score", messages, open_model, run_one, {"candidates": candidates} if candidates else {},
         batch_in, batch_out, resume, strict, parallel)


@cli.command(cls=MessageCommand, epilog=EXAMPLES)
@message_options
@click.option("-n", type=click.IntRange(min=1), default=1, show_default=True,
              help="How many i.i.d. outputs.")
@click.option("--max-tokens", type=click.IntRange(min=1), default=256, show_default=True,
              help="Stop an output after this many tokens.")
@click.option("--seed", type=int, help="Makes runs reproducible.")
@click.option("--temperature", type=click.FloatRange(min=0), default=1.0, show_default=True,
              help="1 is the model's own distribution; 0 is greedy.")
@click.option("--top-k", type=click.IntRange(min=0), default=0, show_default=True,
              help="Keep only the k most likely tokens (0: off).")
@click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=1.0,
              show_default=True, help="Nucleus truncation (1: off).")
@click.option("--min-p", type=click.FloatRange(0, 1), default=0.0, show_default=True,
              help="Drop tokens below min-p x the top probability (0: off).")
@click.option("--repeat-penalty", type=click.FloatRange(min=0, min_open=True), default=1.0,
              show_default=True, help="Penalise repeated tokens (1: off).")
@batch_options
@model_options
@json_option
@click.pass_context
def sample(ctx, description, input, output, messages_file, n, max_tokens, seed, temperature,
           top_k, top_p, min_p, repeat_penalty, batch_in, batch_out, resume, strict, parallel,
           open_model, as_json):
    """Draw N i.i.d. outputs.

    The defaults are the model card's: temperature 1 and no truncation, i.e. samples from
    exactly the distribution the model was trained to match. Each output ends at the
    end-of-output token or after --max-tokens.
    """
    settings = dict(n=n, max_tokens=max_tokens, seed=seed, temperature=temperature, top_k=top_k,
                    top_p=top_p, min_p=min_p, repeat_penalty=repeat_penalty)

    def run_one(m, parsed):
        samples = m.sample(parsed, **settings)
        if as_json:
            _emit_json(m, samples=[s.to_dict() for s in samples])
        else:
            click.echo(display.sample_list(samples))

    _run("sample", _messages(ctx, description, input, output, messages_file),
         open_model, run_one, settings, batch_in, batch_out, resume, strict, parallel)


@cli.command(cls=MessageCommand, epilog=EXAMPLES)
@message_options
@click.option("-k", type=click.IntRange(min=1), default=10, show_default=True,
              help="How many tokens to show.")
@click.option("--prefix", default="", help="Output text already written; show what follows it.")
@batch_options
@model_options
@json_option
@click.pass_context
def top(ctx, description, input, output, messages_file, k, prefix, batch_in, batch_out, resume,
        strict, parallel, open_model, as_json):
    """The K most likely first tokens of the output, with their probabilities."""

    def run_one(m, parsed):
        tokens = m.top(parsed, k, prefix=prefix)
        if as_json:
            _emit_json(m, tokens=[t.to_dict() for t in tokens])
        else:
            click.echo(display.top_table(tokens))

    _run("top", _messages(ctx, description, input, output, messages_file),
         open_model, run_one, {"k": k, "prefix": prefix}, batch_in, batch_out, resume, strict,
         parallel)


@cli.command("enumerate", cls=MessageCommand, epilog="""
\b
Examples:
  spectrum-local enumerate -d "Roll two six-sided dice. What is the sum of their values?"
  spectrum-local enumerate -d "Pick a US state" --coverage 0.99 --max-outputs 60
  spectrum-local enumerate -d "A random word" --min-prob 0.01 --json
""")
@message_options
@click.option("--coverage", type=click.FloatRange(0, 1, min_open=True), default=0.95,
              show_default=True, help="Stop once the outputs listed hold this much of the "
                                      "model's probability.")
@click.option("--min-prob", type=click.FloatRange(0, 1), default=0.0, show_default=True,
              help="List only outputs at least this likely; stop when none left can be.")
@click.option("--max-outputs", type=click.IntRange(min=1), default=100, show_default=True,
              help="List at most this many outputs.")
@click.option("--max-tokens", type=click.IntRange(min=1), default=32, show_default=True,
              help="Longest output followed, in tokens (longer ones count as cut).")
@click.option("--max-decoded", type=click.IntRange(min=0), default=20_000, show_default=True,
              help="The search's budget of decoded tokens, checked before each read.")
@batch_options
@model_options
@json_option
@click.pass_context
def enumerate_outputs(ctx, description, input, output, messages_file, coverage, min_prob,
                      max_outputs, max_tokens, max_decoded, batch_in, batch_out, resume, strict,
                      parallel, open_model, as_json):
    """The model's most probable complete outputs, each with its exact probability.

    A best-first search over the token tree, not sampling: most likely first, each output's
    probability is what `score` gives it, and "unexplored" is the mass of the paths never
    expanded: no output missing from the list holds more than that. It stops at the first of
    --coverage, --min-prob, --max-outputs and --max-decoded.
    """
    settings = dict(coverage=coverage, min_prob=min_prob, max_outputs=max_outputs,
                    max_tokens=max_tokens, max_decoded=max_decoded)

    def run_one(m, parsed):
        result = m.enumerate(parsed, **settings)
        if as_json:
            _emit_json(m, **result.to_dict())
        else:
            click.echo(display.enumerate_table(result))

    _run("enumerate", _messages(ctx, description, input, output, messages_file),
         open_model, run_one, settings, batch_in, batch_out, resume, strict, parallel)


@cli.command()
@model_options
@json_option
def info(open_model, as_json):
    """What a model file is and what llama.cpp was built with (with --server: what the server
    serves)."""
    details = open_model().info()
    details.pop("prompt_format")  # the server's info shows it; here it would drown the rest
    if as_json:
        click.echo(json.dumps(details, ensure_ascii=False))
        return
    for key, value in details.items():
        if key == "file_size":
            value = f"{value / 2**20:,.1f} MiB"
        elif key == "parameters":
            value = f"{value / 1e6:,.1f} M"
        elif key == "lora":
            value = ", ".join(f"{a['path']} (scale {a['scale']:g})" for a in value) or "none"
        elif isinstance(value, list):
            value = ", ".join(map(str, value))
        click.echo(f"{key.replace('_', ' '):<16} {value}")


@cli.command("eval", epilog="""
\b
Examples:
  spectrum-local eval --suite basic
  spectrum-local eval tasks.jsonl --out results.jsonl --plot results.png
  spectrum-local eval --suite basic -m model-Q4_K_M.gguf --vs model-F16.gguf
""")
@click.argument("tasks_file", required=False, metavar="[TASKS.jsonl]")
@click.option("--suite", type=click.Choice(["basic"]),
              help="A built-in suite whose true distributions are known exactly (dice, coins, "
                   "uniform choices, an urn; generation with validators; a biased coin's "
                   "examples).")
@click.option("--vs", "vs_model", metavar="GGUF",
              help="Run the same tasks on a second model and compare: JS divergence between "
                   "the two models' candidate distributions, first-token KL(model || vs), "
                   "and each metric's difference (vs - model). 'default' is the default "
                   "model with its adapter: eval --no-lora --vs default shows what the "
                   "adapter changes.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seeds the samples of generation tasks and the example orderings of "
                   "steerability tasks.")
@click.option("--no-end-token", "no_end_token", is_flag=True,
              help="Score candidates without the end-of-output token, as the paper's "
                   "eval_distributional.py does (see the README: then a candidate's "
                   "probability includes every longer output it begins).")
@click.option("--out", "out_file", metavar="OUT.jsonl", type=click.Path(dir_okay=False),
              help="Append each task's result to OUT.jsonl as it completes.")
@click.option("--resume", is_flag=True,
              help="With --out: keep the results already in OUT and run the other tasks.")
@click.option("--plot", "plot_file", metavar="FILE.png", type=click.Path(dir_okay=False),
              help="Draw target vs model distributions and the steerability curves "
                   "(needs the eval extra: matplotlib).")
@local_model_options
@json_option
def evaluate(tasks_file, suite, vs_model, seed, no_end_token, out_file, resume, plot_file,
             model, format_name, gpu_layers, threads, ctx_size, lora, no_lora, as_json):
    """Measure how well the model matches distributions.

    TASKS.jsonl holds one task per line: "distribution" (candidates and their true
    probabilities: coverage, JS and KL divergence, cross-entropy, mode match), "generation"
    (n samples and a validator: validity, uniqueness, collisions, entropy) or "steerability"
    (examples: the loss of example k+1 given the first k). The README gives the format and
    the formulas.
    """
    from .eval import evaluate as run_eval, load_tasks

    if resume and not out_file:
        raise click.UsageError("--resume goes with --out")
    tasks = load_tasks(tasks_file, suite)  # bad lines fail before a model is loaded
    if plot_file:
        from .plot import check_available
        check_available()
        if not os.path.isdir(os.path.dirname(os.path.abspath(plot_file))):
            raise InputError(f"the folder of --plot {plot_file} does not exist")
    # The output is opened, locked and read before the models load (which settings made its
    # results is checked once they have).
    with (open_results(out_file, resume=resume, source=tasks_file) if out_file
          else contextlib.nullcontext()) as out:
        first = _load(model, format_name, gpu_layers, threads, ctx_size, lora, no_lora)
        # "--vs default": the default model with its adapter (what `eval --no-lora` leaves out).
        second = (_load(None if vs_model == "default" else vs_model, None, gpu_layers, threads,
                        ctx_size) if vs_model else None)
        report = run_eval(first, tasks, vs=second, seed=seed, end_token=not no_end_token,
                          out=out).to_dict()
    if plot_file:
        from .plot import plot_report
        plot_report(report, plot_file)
    if as_json:
        click.echo(json.dumps(report, ensure_ascii=False))
    else:
        click.echo(display.eval_tables(report))
    if plot_file:
        click.echo(f"plot: {plot_file}", err=True)


@cli.command(epilog="""
\b
Examples:
  spectrum-local serve                                   # http://127.0.0.1:8717/
  spectrum-local serve --model spectrum-gemma-3-12b-v1-Q4_K_M.gguf --api-key s3cret
  curl -s localhost:8717/spectrum/v1/score --json '{"messages": [{"role": "description",
    "content": "Roll two six-sided dice. What is the sum of their values?"}],
    "candidates": "2..12"}'
""")
@local_model_options
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind. Anything but loopback exposes the model to the network: "
                   "give it an --api-key.")
@click.option("--port", type=click.IntRange(0, 65535), default=8717, show_default=True)
@click.option("--api-key", envvar="SPECTRUM_LOCAL_API_KEY", metavar="KEY",
              help="Require 'Authorization: Bearer KEY' on every API route "
                   "(env: SPECTRUM_LOCAL_API_KEY).")
@click.option("--cors-origin", multiple=True, metavar="ORIGIN",
              help="Let pages from ORIGIN call the API (repeatable; e.g. an Electron or Tauri "
                   "app's origin). Default: no cross-origin access.")
@click.option("--allowed-host", multiple=True, metavar="NAME",
              help="Accept requests whose Host header is NAME (repeatable; '*' for any). "
                   "Default: on a loopback --host, only this machine's names (localhost, "
                   "*.localhost, 127.x.x.x, [::1]), so a web page that re-points its own name "
                   "at this machine (DNS rebinding) is refused; on a network --host, any.")
@click.option("--request-timeout", type=click.FloatRange(min=0, min_open=True), default=30.0,
              show_default=True, metavar="SECONDS",
              help="Seconds a client has to send a request's headers, and again its body; "
                   "slower connections are closed (a slow body gets a 408).")
@click.option("--grace", type=click.FloatRange(min=0), default=10.0, show_default=True,
              help="On Ctrl-C or SIGTERM, seconds to let requests in flight finish.")
def serve(model, format_name, gpu_layers, threads, ctx_size, lora, no_lora, host, port,
          api_key, cors_origin, allowed_host, request_timeout, grace):
    """Keep one model loaded and answer HTTP: the native API, an OpenAI-compatible
    /v1/completions, and a web page at / that charts scores, top tokens and samples.

    Concurrent requests share decodes: samples advance together, scores go into one batch,
    and a prompt prefix already in the cache is not evaluated again. Needs the serve extra:
    pip install 'spectrum-local[serve]'.
    """
    try:
        import fastapi  # noqa: F401  the extra's packages, checked before the model loads
        import uvicorn  # noqa: F401

        from .server import check_address, is_loopback, serve as run_server
    except ImportError as e:
        raise SpectrumError(f"serve needs its extra: pip install 'spectrum-local[serve]' ({e})") \
            from None
    check_address(host, port)
    if not is_loopback(host) and not api_key:
        click.echo(f"warning: binding {host} without --api-key: anyone who can reach this "
                   "machine can use the model", err=True)
    run_server(_load(model, format_name, gpu_layers, threads, ctx_size, lora, no_lora), host=host,
               port=port, api_key=api_key, cors_origins=tuple(cors_origin),
               allowed_hosts=tuple(allowed_host), timeout=request_timeout, grace=grace)


@cli.command()
@click.argument("source")
@click.option("--out", "-o", type=click.Path(),
              help="Output .gguf file or folder. Default: ./NAME-OUTTYPE.gguf")
@click.option("--outtype", type=click.Choice(["f32", "f16", "bf16", "q8_0", "q6_k", "q5_k_m",
                                               "q4_k_m", "q4_0"]),
              default="f16", show_default=True,
              help="Weight type; the quantized types are made by llama.cpp's quantizer.")
@click.option("--format", "format_name", type=click.Choice(["auto", *sorted(formats.FORMATS)]),
              default="auto", show_default=True, help="The spectrum prompt format to embed.")
@click.option("--revision", help="Hub branch, tag or commit (hub sources only).")
@click.option("--force", is_flag=True, help="Replace an existing output file.")
@click.option("--keep-intermediate", is_flag=True,
              help="Keep the float GGUF a quantized type is made from.")
def convert(source, out, outtype, format_name, revision, force, keep_intermediate):
    """Convert a spectrum checkpoint to GGUF with the spectrum template embedded.

    SOURCE is a local checkpoint folder or a hub repo id such as
    tsor13/spectrum-gemma-3-12b-v1 (HF_HUB_OFFLINE=1 uses the cache only).

    \b
    Examples:
      spectrum-local convert tsor13/spectrum-gemma-3-12b-v1 --outtype q4_k_m
      spectrum-local convert ./my-checkpoint -o model-f16.gguf
    """
    try:
        from .convert import convert as run_conversion
    except ImportError as e:
        raise SpectrumError(f"the converter needs its extra: pip install 'spectrum-local[convert]' "
                            f"({e})") from None
    run_conversion(source, out, outtype=outtype, format=format_name, revision=revision,
                   force=force, keep_intermediate=keep_intermediate, progress=True)


@cli.command("convert-lora")
@click.argument("adapter_dir", type=click.Path())
@click.option("--base", required=True, type=click.Path(),
              help="The GGUF of the model the adapter was trained on (any quantization).")
@click.option("--out", "-o", type=click.Path(),
              help="Output .gguf file or folder. Default: ./NAME.gguf, NAME being the "
                   "adapter folder's name.")
@click.option("--force", is_flag=True, help="Replace an existing output file.")
def convert_lora(adapter_dir, base, out, force):
    """Convert a PEFT LoRA adapter to a GGUF adapter that llama.cpp applies to --base.

    ADAPTER_DIR holds adapter_config.json and adapter_model.safetensors, as PEFT's
    save_pretrained writes them.

    \b
    Examples:
      spectrum-local convert-lora ./my-adapter --base spectrum-gemma-3-12b-v1-Q4_K_M.gguf
      spectrum-local convert-lora ./my-adapter --base model-F16.gguf -o my-adapter.gguf
    """
    try:
        from .convert.lora import convert_lora as run_conversion
    except ImportError as e:
        raise SpectrumError(f"the converter needs its extra: pip install 'spectrum-local[convert]' "
                            f"({e})") from None
    run_conversion(adapter_dir, base, out, force=force, progress=True)


@cli.command(epilog="""
\b
Examples:
  spectrum-local tune tasks.jsonl -o my-adapter                 # the default model's base
  spectrum-local tune tasks.jsonl -o my-adapter --steps 400 --held-out held.jsonl
  spectrum-local tune tasks.jsonl -o my-adapter --resume        # after an interruption
  spectrum-local score --lora my-adapter/adapter.gguf -d "..." -c 2..12
""")
@click.argument("tasks_file", metavar="TASKS.jsonl", type=click.Path(dir_okay=False))
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False),
              help="A new (or empty) folder for the adapter, its GGUF, the log and checkpoints.")
@click.option("--model", "-m", metavar="GGUF",
              help="The base model's GGUF (a path or REPO_ID:FILE.gguf): its tokenizer, and "
                   "its weights unless --weights. Default: the default model's base.")
@click.option("--weights", metavar="FOLDER|REPO_ID",
              help="Train on the float checkpoint the GGUF was converted from instead of the "
                   "GGUF's (dequantized) weights.")
@click.option("--held-out", "held_out_file", metavar="HELD.jsonl",
              type=click.Path(dir_okay=False),
              help="Tasks to report on before and after (default: a --held-out-fraction of "
                   "TASKS, left out of training).")
@click.option("--held-out-fraction", type=click.FloatRange(0, 1, max_open=True), default=0.1,
              show_default=True)
@click.option("--steps", type=click.IntRange(min=1), default=200, show_default=True,
              help="Optimiser steps.")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True,
              help="Tasks per step.")
@click.option("--lr", "learning_rate", type=click.FloatRange(min=0, min_open=True),
              default=1e-3, show_default=True, help="Peak learning rate (warm-up, then cosine).")
@click.option("--rank", type=click.IntRange(min=1), default=16, show_default=True,
              help="LoRA rank, on every attention and MLP projection.")
@click.option("--alpha", type=click.FloatRange(min=0, min_open=True), default=32.0,
              show_default=True, help="LoRA alpha (the update is scaled by alpha / rank).")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seeds the initialisation, the held-out split and the task order.")
@click.option("--resume", is_flag=True, help="Continue the run whose checkpoint is in --out.")
@click.option("--threads", type=click.IntRange(1, MAX_THREADS),
              help="CPU threads for torch (default: all cores).")
def tune(tasks_file, out, model, weights, held_out_file, held_out_fraction, steps, batch_size,
         learning_rate, rank, alpha, seed, resume, threads):
    """Train a LoRA adapter that makes the model match target distributions.

    TASKS.jsonl holds distribution tasks in eval's format (messages, candidates,
    target_probs). The loss is the target-weighted negative log-likelihood of each candidate
    followed by the end-of-output token; it is the target's entropy exactly when the model's
    distribution over outputs is the target, and the log shows the excess over it. Writes
    OUT/adapter.gguf (for --lora), the PEFT adapter, log.jsonl, checkpoint.pt and
    report.json (held-out tasks before/after, measured by llama.cpp). A 270M model trains
    at about a second per task on a laptop CPU; 8B models want a GPU (see the README).
    Needs the tune extra: pip install 'spectrum-local[tune]'.
    """
    from .tune import TuneSettings, tune as run_tune

    settings = TuneSettings(rank=rank, alpha=alpha, learning_rate=learning_rate, steps=steps,
                            batch_size=batch_size, held_out=held_out_fraction, seed=seed)
    result = run_tune(tasks_file, out, model=model, weights=weights, held_out=held_out_file,
                      settings=settings, resume=resume, threads=threads,
                      progress=lambda line: click.echo(line, err=True))
    click.echo(result.summary())


def _terminate(signum, frame):
    raise KeyboardInterrupt


def main() -> None:
    # SIGTERM (kill, a job manager) cleans up and exits like Ctrl-C.
    signal.signal(signal.SIGTERM, _terminate)
    cli(prog_name="spectrum-local")
