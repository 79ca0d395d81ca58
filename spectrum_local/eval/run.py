"""Running one task on one model: its metrics (``metrics.py``) and what they were computed
from."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from .. import metrics
from ..errors import InputError
from ..model import SpectrumModel
from .tasks import DistributionTask, GenerationTask, SteerabilityTask, Task


@dataclass(frozen=True)
class TaskResult:
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
