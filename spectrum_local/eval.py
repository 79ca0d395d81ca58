"""``spectrum-local eval``: how well a model matches distributions, and what a change to it
(quantization, an adapter) costs.

A task file holds one task per JSON line, of three types (README, "Evaluate"):
- ``distribution``: messages, candidates and the target distribution over them; the model's
  candidate probabilities (``score``) against the target;
- ``generation``: messages, ``n`` samples and a validator; validity and diversity of the samples;
- ``steerability``: a description and examples; the loss of example k+1 given the first k,
  for several k, from one read along each ordering of the examples.
The metrics are in ``metrics.py``. ``compare`` runs the tasks on two models and reports how far
apart their distributions are: the quantization report.
"""

from __future__ import annotations

import json
import math
import random
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Union

import numpy as np

from . import candidates as candidate_specs
from . import formats, metrics
from .backend import logsumexp
from .batch import check_line
from .display import Progress
from .errors import InputError
from .model import MAX_SAMPLES, SpectrumModel
from .results import _Result
from .textfile import (ResultsFile, check_unicode, jsonl_lines, open_results,
                       parse_json_line, read_text)

SUITES = ("basic",)
DEFAULT_K = (0, 1, 2, 4, 8)
DEFAULT_N = 100
DEFAULT_MAX_TOKENS = 32
FIRST_TOKENS = 20  # per model, for the first-token KL of a comparison
TARGET_TOLERANCE = 1e-6  # how far from 1 a target's sum may be

_NUMBER = (int, float)
FIELDS: dict[str, dict[str, type | tuple[type, ...]]] = {
    "distribution": {"messages": list, "candidates": (list, str), "target_probs": list,
                     "ordinal": bool},
    "generation": {"messages": list, "n": int, "max_tokens": int, "valid": list, "regex": str,
                   "int_range": list},
    "steerability": {"description": str, "examples": list, "k": list, "orderings": int,
                     "optimal_loss": _NUMBER},
}


# -- tasks ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DistributionTask:
    id: str | int
    messages: list
    candidates: list[str]
    target: list[float]
    ordinal: bool = False


@dataclass(frozen=True)
class Validator:
    """What makes a generated answer (stripped of surrounding whitespace) valid: one of a
    list of strings, a full match of a regular expression, or an integer in [lo, hi]."""

    kind: str  # "valid", "regex" or "int_range"
    value: object

    def __call__(self, answer: str) -> bool:
        if self.kind == "valid":
            return answer in self.value  # type: ignore[operator]
        if self.kind == "regex":
            return re.fullmatch(self.value, answer) is not None  # type: ignore[arg-type]
        low, high = self.value  # type: ignore[misc]
        return re.fullmatch(r"[+-]?\d+", answer) is not None and low <= int(answer) <= high

    @property
    def size(self) -> int | None:
        """How many valid answers there are (None for a regex)."""
        if self.kind == "valid":
            return len(self.value)  # type: ignore[arg-type]
        if self.kind == "int_range":
            low, high = self.value  # type: ignore[misc]
            return high - low + 1
        return None


@dataclass(frozen=True)
class GenerationTask:
    id: str | int
    messages: list
    n: int
    max_tokens: int
    validator: Validator


@dataclass(frozen=True)
class SteerabilityTask:
    id: str | int
    description: str | None
    examples: list[dict]  # {"input"?, "output"}
    k: tuple[int, ...]
    orderings: int = 1
    optimal_loss: float | None = None  # the process's entropy per output, when known

    def messages(self, examples: list[dict]) -> list[dict]:
        messages = [{"role": "description", "content": self.description}] \
            if self.description is not None else []
        for example in examples:
            if "input" in example:
                messages.append({"role": "input", "content": example["input"]})
            messages.append({"role": "output", "content": example["output"]})
        return messages

    def orders(self, seed: int) -> list[list[dict]]:
        """The file's order, then ``orderings - 1`` seeded shuffles (the same for every model
        and run with this seed), each cut to the examples the largest k needs."""
        rng = random.Random(f"{seed}:{self.id}")
        orders = [list(self.examples)]
        orders += [rng.sample(self.examples, len(self.examples))
                   for _ in range(self.orderings - 1)]
        return [order[:max(self.k) + 1] for order in orders]


Task = Union[DistributionTask, GenerationTask, SteerabilityTask]


def load_tasks(path: str | None = None, suite: str | None = None) -> list[Task]:
    """The tasks of a JSONL file (``-``: stdin) or of a built-in suite. Every bad line is
    reported, with its number, in one InputError."""
    if (path is None) == (suite is None):
        raise InputError("give a task file or --suite, not both" if path else
                         f"give a task file (JSONL) or --suite ({', '.join(SUITES)})")
    if suite is not None:
        if suite not in SUITES:
            raise InputError(f"unknown suite {suite!r}; built in: {', '.join(SUITES)}")
        name = f"suite {suite}"
        text = resources.files("spectrum_local").joinpath("suites", f"{suite}.jsonl") \
            .read_text(encoding="utf-8")
    else:
        name = "stdin" if path == "-" else path
        text = read_text(path, "task file")
    tasks, errors, seen = [], [], set()
    for number, line in enumerate(jsonl_lines(text), start=1):
        if not line.strip():
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", UserWarning)  # a warned-about prompt is an error
                task = _parse_task(parse_json_line(line), number)
            if json.dumps(task.id) in seen:
                raise InputError(f"duplicate id {task.id!r}")
            seen.add(json.dumps(task.id))
            tasks.append(task)
        except (InputError, UserWarning) as e:
            errors.append(f"{name} line {number}: {e}")
    if errors:
        more = f"\n... and {len(errors) - 20} more bad lines" if len(errors) > 20 else ""
        raise InputError("\n".join(errors[:20]) + more)
    if not tasks:
        raise InputError(f"{name} holds no tasks")
    return tasks


def _parse_task(obj, number: int) -> Task:
    if not isinstance(obj, dict):
        raise InputError("a task must be a JSON object")
    check_unicode(obj, "the task")
    kind = obj.get("type")
    if kind not in FIELDS:
        raise InputError(f'"type" must be one of {", ".join(FIELDS)}, got {kind!r}')
    ident = check_line(obj, number, FIELDS[kind], f"a {kind} task", also={"type"})
    return {"distribution": _distribution, "generation": _generation,
            "steerability": _steerability}[kind](ident, obj)


def _messages(obj: dict) -> list[dict]:
    if "messages" not in obj:
        raise InputError('"messages" is required')
    formats.parse_messages(obj["messages"])
    return obj["messages"]


def _distribution(ident, obj: dict) -> DistributionTask:
    messages = _messages(obj)
    if "candidates" not in obj or "target_probs" not in obj:
        raise InputError('a distribution task needs "candidates" and "target_probs"')
    candidates = candidate_specs.resolve(obj["candidates"])
    if not all(isinstance(c, str) and c for c in candidates):
        raise InputError("candidates must be non-empty strings")
    repeated = [c for c, count in Counter(candidates).items() if count > 1]
    if repeated:
        raise InputError(f"repeated candidate(s): {', '.join(map(repr, repeated[:5]))}")
    target = obj["target_probs"]
    if len(target) != len(candidates):
        raise InputError(f"{len(target)} target_probs for {len(candidates)} candidates")
    if not all(isinstance(p, _NUMBER) and not isinstance(p, bool) and math.isfinite(p)
               for p in target):
        raise InputError("target_probs must be finite numbers")
    if min(target) < 0:
        raise InputError("target_probs must not be negative")
    if abs(math.fsum(target) - 1) > TARGET_TOLERANCE:
        raise InputError(f"target_probs sum to {math.fsum(target):.9g}, not 1")
    return DistributionTask(ident, messages, candidates, [float(p) for p in target],
                            obj.get("ordinal", False))


def _generation(ident, obj: dict) -> GenerationTask:
    messages = _messages(obj)
    kinds = [kind for kind in ("valid", "regex", "int_range") if kind in obj]
    if len(kinds) != 1:
        raise InputError('a generation task needs exactly one validator: "valid" (a list of '
                         'strings), "regex" or "int_range" [lo, hi]')
    kind, value = kinds[0], obj[kinds[0]]
    if kind == "valid" and not (value and all(isinstance(v, str) for v in value)):
        raise InputError('"valid" must be a non-empty list of strings')
    if kind == "regex":
        try:
            re.compile(value)
        except re.error as e:
            raise InputError(f'"regex" does not compile: {e}') from None
    if kind == "int_range":
        if not (len(value) == 2 and all(isinstance(v, int) and not isinstance(v, bool)
                                        for v in value) and value[0] <= value[1]):
            raise InputError('"int_range" must be [lo, hi], two integers with lo <= hi')
        value = tuple(value)
    if kind == "valid":
        value = frozenset(value)
    n, max_tokens = obj.get("n", DEFAULT_N), obj.get("max_tokens", DEFAULT_MAX_TOKENS)
    if not 1 <= n <= MAX_SAMPLES:
        raise InputError(f'"n" must be between 1 and {MAX_SAMPLES}')
    if max_tokens < 1:
        raise InputError('"max_tokens" must be at least 1')
    return GenerationTask(ident, messages, n, max_tokens, Validator(kind, value))


def _steerability(ident, obj: dict) -> SteerabilityTask:
    examples = obj.get("examples")
    if not examples:
        raise InputError('a steerability task needs "examples": [{"input"?, "output"}, ...]')
    for i, example in enumerate(examples):
        if not (isinstance(example, dict) and isinstance(example.get("output"), str)
                and set(example) <= {"input", "output"}
                and isinstance(example.get("input", ""), str)):
            raise InputError(f'example {i} must be {{"output": text}} or '
                             f'{{"input": text, "output": text}}')
    ks = obj.get("k", list(DEFAULT_K))
    if not ks or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 0 for k in ks) \
            or len(set(ks)) != len(ks):
        raise InputError('"k" must be a list of distinct whole numbers >= 0')
    if max(ks) + 1 > len(examples):
        raise InputError(f"k up to {max(ks)} needs at least {max(ks) + 1} examples, "
                         f"got {len(examples)}")
    orderings = obj.get("orderings", 1)
    if not 1 <= orderings <= 100:
        raise InputError('"orderings" must be between 1 and 100')
    optimal = obj.get("optimal_loss")
    if optimal is not None and not (math.isfinite(optimal) and optimal >= 0):
        raise InputError('"optimal_loss" must be a finite number >= 0 (nats)')
    return SteerabilityTask(ident, obj.get("description"), examples, tuple(sorted(ks)),
                            orderings, None if optimal is None else float(optimal))


# -- running ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class TaskResult(_Result):
    """One task's metrics, and what they were computed from (``detail``: the candidates with
    the target and model probabilities, the answers with their counts, the loss curve)."""

    id: str | int
    type: str
    metrics: dict
    detail: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"id": self.id, "type": self.type, "metrics": self.metrics, **self.detail}

    @classmethod
    def from_dict(cls, record: dict) -> "TaskResult":
        rest = {k: v for k, v in record.items() if k not in ("id", "type", "metrics")}
        return cls(record["id"], record["type"], record["metrics"], rest)


def run_task(model: SpectrumModel, task: Task, *, seed: int = 0,
             end_token: bool = True) -> TaskResult:
    try:
        if isinstance(task, DistributionTask):
            return _run_distribution(model, task, end_token)
        if isinstance(task, GenerationTask):
            return _run_generation(model, task, seed)
        return _run_steerability(model, task, seed)
    except InputError as e:  # e.g. a prompt longer than the context: say which task
        raise InputError(f"task {task.id!r}: {e}") from None


def _run_distribution(model: SpectrumModel, task: DistributionTask,
                      end_token: bool) -> TaskResult:
    scored = model.score(task.messages, task.candidates, end_token=end_token)
    logprobs = [c.logprob for c in scored.candidates]
    probs = metrics.normalize_logprobs(logprobs)
    values = {
        "coverage": scored.coverage,
        "js_divergence": metrics.js_divergence(task.target, probs),
        "kl_divergence": metrics.kl_divergence(task.target, probs),
        "cross_entropy": metrics.cross_entropy(task.target, probs),
        "mode_match": metrics.mode_match(task.target, probs),
    }
    if task.ordinal:
        values["representativeness"] = metrics.representativeness(task.target, probs)
    return TaskResult(task.id, "distribution", values, {
        "candidates": task.candidates, "target": task.target, "probs": probs.tolist(),
        "logprobs": logprobs, "ordinal": task.ordinal})


def _run_generation(model: SpectrumModel, task: GenerationTask, seed: int) -> TaskResult:
    samples = model.sample(task.messages, task.n, max_tokens=task.max_tokens, seed=seed)
    answers = [s.text.strip() for s in samples]
    valid = [a for a in answers if task.validator(a)]
    distinct = set(valid)
    size = task.validator.size
    values = {
        "valid_fraction": len(valid) / len(answers),
        "unique_of_valid": len(distinct) / len(valid) if valid else 0.0,
        "unique_valid": len(distinct),
        "valid_set_coverage": len(distinct) / size if size else None,
        "pairwise_collision": metrics.pairwise_collision(valid),
        "normalized_entropy": metrics.normalized_entropy(valid, size),
    }
    counts = Counter(answers).most_common()
    return TaskResult(task.id, "generation", values, {
        "n": task.n, "valid_set_size": size,
        "cut_at_max_tokens": sum(s.finish_reason != "stop" for s in samples),
        "answers": [{"text": text, "count": count, "valid": task.validator(text)}
                    for text, count in counts]})


def _run_steerability(model: SpectrumModel, task: SteerabilityTask, seed: int) -> TaskResult:
    by_ordering = []
    for examples in task.orders(seed):
        # Example k+1 is output number k: one read per ordering, logits only where needed.
        logprobs = model.output_logprobs(task.messages(examples), outputs=task.k)
        by_ordering.append([-lp for lp in logprobs])
    curve = np.mean(by_ordering, axis=0).tolist()
    values = {"first_loss": curve[0], "last_loss": curve[-1],
              "slope": metrics.slope(task.k, curve)}
    if task.optimal_loss is not None:
        values["excess_loss"] = curve[-1] - task.optimal_loss
    return TaskResult(task.id, "steerability", values, {
        "k": list(task.k), "loss": curve, "loss_by_ordering": by_ordering,
        "optimal_loss": task.optimal_loss})


# -- comparing two models ---------------------------------------------------------------------

@dataclass(frozen=True)
class Comparison(_Result):
    """One task on two models: each one's result, their metrics' differences (b - a), the JS
    divergence between their candidate distributions, and the first-token KL(a || b)."""

    id: str | int
    type: str
    a: TaskResult
    b: TaskResult
    js_between: float | None  # distribution tasks only
    first_token_kl: float | None  # None when the vocabularies differ
    diff: dict

    def to_dict(self) -> dict:
        return {"id": self.id, "type": self.type, "a": self.a.to_dict(), "b": self.b.to_dict(),
                "js_between": self.js_between, "first_token_kl": self.first_token_kl,
                "diff": self.diff}

    @classmethod
    def from_dict(cls, record: dict) -> "Comparison":
        return cls(record["id"], record["type"], TaskResult.from_dict(record["a"]),
                   TaskResult.from_dict(record["b"]), record["js_between"],
                   record["first_token_kl"], record["diff"])


def compare_task(a: SpectrumModel, b: SpectrumModel, task: Task, *, seed: int = 0,
                 end_token: bool = True) -> Comparison:
    result_a = run_task(a, task, seed=seed, end_token=end_token)
    result_b = run_task(b, task, seed=seed, end_token=end_token)
    js_between = None
    if result_a.type == "distribution":
        js_between = metrics.js_divergence(result_a.detail["probs"], result_b.detail["probs"])
    diff = {name: result_b.metrics[name] - value for name, value in result_a.metrics.items()
            if value is not None and result_b.metrics.get(name) is not None}
    return Comparison(task.id, result_a.type, result_a, result_b, js_between,
                      first_token_kl(a, b, task_prompt(task)), diff)


def task_prompt(task: Task) -> list[dict]:
    """The prompt a task's first output token follows (a steerability task's: the largest k's,
    in the file's order: the examples before that output, and its input if it has one)."""
    if isinstance(task, SteerabilityTask):
        last = max(task.k)
        messages = task.messages(task.examples[:last])
        if "input" in task.examples[last]:
            messages.append({"role": "input", "content": task.examples[last]["input"]})
        return messages
    return task.messages


def first_token_kl(a: SpectrumModel, b: SpectrumModel, messages: list[dict],
                   k: int = FIRST_TOKENS) -> float | None:
    """KL(a || b) of the first output token over the union of both models' ``k`` most likely
    tokens, each model's probabilities renormalised over that union. None when the two
    vocabularies differ (token ids would not mean the same text)."""
    row_a = a.engine.prompt_logits(a.prompt_tokens(messages))
    row_b = b.engine.prompt_logits(b.prompt_tokens(messages))
    union = sorted(set(np.argsort(-row_a)[:k].tolist()) | set(np.argsort(-row_b)[:k].tolist()))
    if len(row_a) != len(row_b) or any(a.engine.token_text(t) != b.engine.token_text(t)
                                       for t in union):
        return None
    lp_a = row_a[union].astype(np.float64)
    lp_b = row_b[union].astype(np.float64)
    lp_a -= logsumexp(lp_a)
    lp_b -= logsumexp(lp_b)
    return float(np.sum(np.exp(lp_a) * (lp_a - lp_b)))


# -- a whole run ------------------------------------------------------------------------------

@dataclass(frozen=True)
class EvalReport(_Result):
    """The results of a run over a task file, with each task type's means (``summary``)."""

    model: str
    format: str
    seed: int
    end_token: bool
    tasks: list  # TaskResult, or Comparison with ``vs``
    vs: str | None = None

    def summary(self) -> dict:
        """Per task type: the mean of each metric over the tasks that have it (with ``vs``:
        each model's means, the differences', and the between-model measures')."""
        summary = {}
        for kind in FIELDS:
            results = [r for r in self.tasks if r.type == kind]
            if not results:
                continue
            if self.vs is None:
                summary[kind] = {**_means([r.metrics for r in results]), "tasks": len(results)}
                continue
            between = _means([{"js_between": r.js_between, "first_token_kl": r.first_token_kl}
                              for r in results])
            summary[kind] = {"a": _means([r.a.metrics for r in results]),
                             "b": _means([r.b.metrics for r in results]),
                             "diff": _means([r.diff for r in results]),
                             **between, "tasks": len(results)}
        return summary

    def to_dict(self) -> dict:
        head = {"model": self.model, **({"vs": self.vs} if self.vs else {}),
                "format": self.format, "seed": self.seed, "end_token": self.end_token}
        return {**head, "tasks": [r.to_dict() for r in self.tasks], "summary": self.summary()}


def _means(rows: list[dict]) -> dict:
    names = dict.fromkeys(name for row in rows for name in row)
    means = {}
    for name in names:
        values = [row[name] for row in rows if row.get(name) is not None]
        means[name] = float(np.mean(values)) if values else None
    return means


def evaluate(model: SpectrumModel, tasks: list[Task], *, vs: SpectrumModel | None = None,
             seed: int = 0, end_token: bool = True, out: str | ResultsFile | None = None,
             resume: bool = False, progress: bool = True) -> EvalReport:
    """Run ``tasks`` on ``model`` (and compare with ``vs``). With ``out``, each task's result
    is appended to that JSONL file as it completes; ``resume`` reads the results already
    there (from the same models and settings) and runs only the rest. ``out`` may also be a file
    that ``open_results`` opened (and read, with ``resume``): the command line opens it before
    loading the models."""
    if isinstance(out, (str, Path)):
        with open_results(out, resume=resume) as opened:
            return evaluate(model, tasks, vs=vs, seed=seed, end_token=end_token, out=opened,
                            progress=progress)
    run = {"model": model_label(model), "vs": model_label(vs) if vs else None, "seed": seed,
           "end_token": end_token}
    done = _read_done(out, run, tasks) if out is not None else {}
    results = []
    todo = [t for t in tasks if json.dumps(t.id) not in done]
    with Progress(len(todo), enabled=progress) as bar:
        for task in tasks:
            key = json.dumps(task.id)
            if key in done:
                result = done[key]
            else:
                result = (compare_task(model, vs, task, seed=seed, end_token=end_token) if vs
                          else run_task(model, task, seed=seed, end_token=end_token))
                if out is not None:
                    out.write({**run, **result.to_dict()})
                bar.advance()
            results.append(result)
    return EvalReport(run["model"], model.format, seed, end_token, results, run["vs"])


def model_label(model: SpectrumModel) -> str:
    """The model's file and its adapters: a base with and without an adapter are two models."""
    adapters = model.engine.describe().get("lora", [])
    return " + ".join([model.path] + [f"{Path(a['path']).name}:{a['scale']:g}" for a in adapters])


def _read_done(out: ResultsFile, run: dict, tasks: list[Task]) -> dict:
    """The results already in ``out`` (resume) by id (as JSON text), checked to come from this
    run: the model's label is known only once it has loaded."""
    ids = {json.dumps(t.id) for t in tasks}
    done = {}
    for number, record in enumerate(out.earlier, start=1):
        settings = {name: record.get(name) for name in run}
        if settings != run:
            different = ", ".join(f"{name} {settings[name]!r}" for name in run
                                  if settings[name] != run[name])
            raise InputError(f"{out.name} line {number} is from another run ({different}); "
                             "choose another --out or the same settings")
        if json.dumps(record["id"]) not in ids:
            raise InputError(f"{out.name} line {number}: task {record['id']!r} is not in these "
                             "tasks")
        kind = Comparison if run["vs"] else TaskResult
        done[json.dumps(record["id"])] = kind.from_dict(
            {k: v for k, v in record.items() if k not in run})
    return done

