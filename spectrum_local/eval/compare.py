"""Comparing two models on a task (the quantization report): each one's result, the
differences of their metrics, and how far apart their distributions are."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import metrics
from ..backend import logsumexp
from ..model import SpectrumModel
from .run import TaskResult, run_task
from .tasks import SteerabilityTask, Task

FIRST_TOKENS = 20  # per model, for the first-token KL of a comparison


@dataclass(frozen=True)
class Comparison:
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
