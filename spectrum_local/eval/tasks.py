"""The task file of ``spectrum-local eval``: one task per JSON line, of three types
(docs/eval.md): ``distribution`` (messages, candidates, target_probs), ``generation``
(messages, n, a validator) and ``steerability`` (a description and examples). ``load_tasks``
reads a file or a built-in suite into the task classes below, every bad line reported with its
number."""

from __future__ import annotations

import json
import math
import random
import re
import warnings
from collections import Counter
from dataclasses import dataclass
from importlib import resources
from typing import Union

from .. import candidates as candidate_specs
from .. import formats
from ..batch import check_line
from ..errors import InputError
from ..ops import SampleOptions
from ..textfile import check_unicode, jsonl_lines, parse_json_line, read_text

SUITES = ("basic",)
DEFAULT_K = (0, 1, 2, 4, 8)
DEFAULT_N = 100
DEFAULT_MAX_TOKENS = 32
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
                task = parse_task(parse_json_line(line), number)
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


def parse_task(obj, number: int) -> Task:
    """One task from its parsed JSON line (``number``: the line's, the id of a task without
    one)."""
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
    options = SampleOptions.check(n=obj.get("n", DEFAULT_N),
                                  max_tokens=obj.get("max_tokens", DEFAULT_MAX_TOKENS))
    return GenerationTask(ident, messages, options.n, options.max_tokens, Validator(kind, value))


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
