"""eval and tune: measuring and training a model's distributions (their work is in
``spectrum_local.eval`` and ``spectrum_local.tune``)."""

from __future__ import annotations

import contextlib
import json
import os

import click

from .. import display
from ..errors import InputError
from ..ops import MAX_THREADS
from ..textfile import open_results
from .common import load_model
from .options import json_option, local_model_options


@click.command("eval", epilog="""
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
                   "eval_distributional.py does (see docs/eval.md: then a candidate's "
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
             model, format_name, gpu_layers, threads, ctx, lora, no_lora, as_json):
    """Measure how well the model matches distributions.

    TASKS.jsonl holds one task per line: "distribution" (candidates and their true
    probabilities: coverage, JS and KL divergence, cross-entropy, mode match), "generation"
    (n samples and a validator: validity, uniqueness, collisions, entropy) or "steerability"
    (examples: the loss of example k+1 given the first k). docs/eval.md gives the format and
    the formulas.
    """
    from ..eval import evaluate as run_eval, load_tasks

    if resume and not out_file:
        raise click.UsageError("--resume goes with --out")
    tasks = load_tasks(tasks_file, suite)  # bad lines fail before a model is loaded
    if plot_file:
        from ..plot import check_available
        check_available()
        if not os.path.isdir(os.path.dirname(os.path.abspath(plot_file))):
            raise InputError(f"the folder of --plot {plot_file} does not exist")
    # The output is opened, locked and read before the models load (which settings made its
    # results is checked once they have).
    with (open_results(out_file, resume=resume, source=tasks_file) if out_file
          else contextlib.nullcontext()) as out:
        first = load_model(model, format_name, gpu_layers, threads, ctx, lora, no_lora)
        # "--vs default": the default model with its adapter (what `eval --no-lora` leaves out).
        second = (load_model(None if vs_model == "default" else vs_model, None, gpu_layers, threads,
                        ctx) if vs_model else None)
        report = run_eval(first, tasks, vs=second, seed=seed, end_token=not no_end_token,
                          out=out).to_dict()
    if plot_file:
        from ..plot import plot_report
        plot_report(report, plot_file)
    if as_json:
        click.echo(json.dumps(report, ensure_ascii=False))
    else:
        click.echo(display.eval_tables(report))
    if plot_file:
        click.echo(f"plot: {plot_file}", err=True)


@click.command(epilog="""
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
    at about a second per task on a laptop CPU; 8B models want a GPU (see docs/adapters.md).
    Needs the tune extra: pip install 'spectrum-local[tune]'.
    """
    from ..tune import TuneSettings, tune as run_tune

    settings = TuneSettings(rank=rank, alpha=alpha, learning_rate=learning_rate, steps=steps,
                            batch_size=batch_size, held_out=held_out_fraction, seed=seed)
    result = run_tune(tasks_file, out, model=model, weights=weights, held_out=held_out_file,
                      settings=settings, resume=resume, threads=threads,
                      progress=lambda line: click.echo(line, err=True))
    click.echo(result.summary())


COMMANDS = [evaluate, tune]
