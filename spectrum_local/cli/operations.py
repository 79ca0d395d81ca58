"""The operations (score, sample, top, enumerate) and info: each validates its options with
its ``ops`` model, then runs one prompt or a --batch job."""

from __future__ import annotations

import json

import click

from .. import candidates as candidate_specs
from .. import display
from ..errors import InputError
from ..ops import EnumerateOptions, SampleOptions, ScoreOptions, TopOptions
from . import common
from .options import (EXAMPLES, MessageCommand, batch_options, from_model, json_option,
                      message_options, model_options)


def operation(name: str, options, *own, skip=(), epilog: str = EXAMPLES):
    """A command of the operation ``name``: the messages, its ``own`` options, the fields of
    ``options`` (but ``skip``), the batch and model options, --json."""
    def decorate(function):
        for decorator in reversed([message_options, *own, from_model(options, skip=skip),
                                   batch_options, model_options, json_option,
                                   click.pass_context]):
            function = decorator(function)
        return click.command(name, cls=MessageCommand, epilog=epilog)(function)
    return decorate


@operation("score", ScoreOptions,
           click.option("--candidates", "-c", "candidate_specs_", multiple=True, metavar="SPEC",
                        help="Candidates: a range 2..12 or 0..100..10 (inclusive), or a comma "
                             'list "Fred,John" (repeatable).'),
           click.option("--candidates-file", multiple=True, type=click.Path(dir_okay=False),
                        help="A file with one candidate per line, kept exactly (repeatable)."),
           skip=("candidates",))
def score(ctx, description, input, output, messages_file, candidate_specs_, candidates_file,
          batch_in, batch_out, resume, strict, parallel, open_model, as_json, **values):
    """Probability of each candidate answer as a whole output.

    For each candidate: P(its tokens, then the end-of-output token | prompt). Coverage is the
    sum over candidates (the mass the model puts on the set); normalized = prob / coverage.
    Repeated candidates are scored once; an empty candidate is an error.
    """
    messages = common.messages(ctx, description, input, output, messages_file)
    candidates = candidate_specs.collect(candidate_specs_, candidates_file)
    if candidates:
        options = ScoreOptions.check(candidates=candidates, **values)
    elif batch_in:  # each line gives its candidates; the other options are checked now
        options = ScoreOptions.check(candidates=["-"], **values).model_dump(
            exclude={"candidates"})
    else:
        raise InputError("no candidates: give --candidates (e.g. -c 2..12) or --candidates-file")

    def run_one(m, parsed):
        result = m.score(parsed, **options.model_dump())
        if as_json:
            common.emit_json(m, coverage=result.coverage,
                             candidates=[c.to_dict() for c in result.candidates])
        else:
            click.echo(display.score_table(result))

    common.run("score", options, messages, open_model, run_one, batch_in, batch_out, resume,
               strict, parallel)


@operation("sample", SampleOptions)
def sample(ctx, description, input, output, messages_file, batch_in, batch_out, resume, strict,
           parallel, open_model, as_json, **values):
    """Draw N i.i.d. outputs.

    The defaults are the model card's: temperature 1 and no truncation, i.e. samples from
    exactly the distribution the model was trained to match. Each output ends at the
    end-of-output token or after --max-tokens.
    """
    options = SampleOptions.check(**values)

    def run_one(m, parsed):
        samples = m.sample(parsed, **options.model_dump())
        if as_json:
            common.emit_json(m, samples=[s.to_dict() for s in samples])
        else:
            click.echo(display.sample_list(samples))

    common.run("sample", options, common.messages(ctx, description, input, output, messages_file),
               open_model, run_one, batch_in, batch_out, resume, strict, parallel)


@operation("top", TopOptions)
def top(ctx, description, input, output, messages_file, batch_in, batch_out, resume, strict,
        parallel, open_model, as_json, **values):
    """The K most likely first tokens of the output, with their probabilities."""
    options = TopOptions.check(**values)

    def run_one(m, parsed):
        tokens = m.top(parsed, **options.model_dump())
        if as_json:
            common.emit_json(m, tokens=[t.to_dict() for t in tokens])
        else:
            click.echo(display.top_table(tokens))

    common.run("top", options, common.messages(ctx, description, input, output, messages_file),
               open_model, run_one, batch_in, batch_out, resume, strict, parallel)


@operation("enumerate", EnumerateOptions, epilog="""
\b
Examples:
  spectrum-local enumerate -d "Roll two six-sided dice. What is the sum of their values?"
  spectrum-local enumerate -d "Pick a US state" --coverage 0.99 --max-outputs 60
  spectrum-local enumerate -d "A random word" --min-prob 0.01 --json
""")
def enumerate_outputs(ctx, description, input, output, messages_file, batch_in, batch_out,
                      resume, strict, parallel, open_model, as_json, **values):
    """The model's most probable complete outputs, each with its exact probability.

    A best-first search over the token tree, not sampling: most likely first, each output's
    probability is what `score` gives it, and "unexplored" is the mass of the paths never
    expanded: no output missing from the list holds more than that. It stops at the first of
    --coverage, --min-prob, --max-outputs and --max-decoded.
    """
    options = EnumerateOptions.check(**values)

    def run_one(m, parsed):
        result = m.enumerate(parsed, **options.model_dump())
        if as_json:
            common.emit_json(m, **result.to_dict())
        else:
            click.echo(display.enumerate_table(result))

    common.run("enumerate", options,
               common.messages(ctx, description, input, output, messages_file), open_model,
               run_one, batch_in, batch_out, resume, strict, parallel)


@click.command()
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


COMMANDS = [score, sample, top, enumerate_outputs, info]
