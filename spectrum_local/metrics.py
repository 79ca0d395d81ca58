"""The evaluation metrics, one function each, with the definitions of the paper's evaluation
code (``tsor13/spectrum``: ``distributional_alignment/eval_distributional.py``,
``diverse_valid/eval_diverse_valid.py``, ``icl_classes/eval_icl.py``). Natural logarithms
throughout. Each is tested against an independent computation (scipy) in tests/test_eval.py.
"""

from __future__ import annotations

from collections import Counter
from typing import Sequence

import numpy as np

# The paper adds this to both distributions, then renormalises, before JS, KL and cross-entropy:
# a zero in the model's distribution would otherwise make KL and cross-entropy infinite.
SMOOTHING = 1e-6


def normalize_logprobs(logprobs: Sequence[float]) -> np.ndarray:
    """Probabilities proportional to exp(logprobs), computed in log space: well defined even
    when every exp(logprob) underflows to 0."""
    lp = np.asarray(logprobs, dtype=np.float64)
    shifted = np.exp(lp - lp.max())
    return shifted / shifted.sum()


def smooth(probs: Sequence[float]) -> np.ndarray:
    p = np.asarray(probs, dtype=np.float64) + SMOOTHING
    return p / p.sum()


def kl_divergence(target: Sequence[float], model: Sequence[float]) -> float:
    """KL(target || model) after smoothing."""
    p, q = smooth(target), smooth(model)
    return float(np.sum(p * np.log(p / q)))


def js_divergence(target: Sequence[float], model: Sequence[float]) -> float:
    """Jensen-Shannon divergence after smoothing: 0 (equal) to ln 2 (disjoint)."""
    p, q = smooth(target), smooth(model)
    m = (p + q) / 2
    js = 0.5 * np.sum(p * np.log(p / m)) + 0.5 * np.sum(q * np.log(q / m))
    return max(0.0, float(js))  # rounding can leave a divergence of ~0 just below it


def cross_entropy(target: Sequence[float], model: Sequence[float]) -> float:
    """H(target, model) after smoothing: the target's entropy plus KL(target || model)."""
    p, q = smooth(target), smooth(model)
    return float(-np.sum(p * np.log(q)))


def mode_match(target: Sequence[float], model: Sequence[float]) -> int:
    """1 if the model's most likely candidate is one of the target's most likely ones. The
    paper compares two argmaxes, which with a tied target (a uniform one) depends on the
    candidates' order; here any of the tied modes counts."""
    target = np.asarray(target, dtype=np.float64)
    return int(target[int(np.argmax(model))] == target.max())


def representativeness(target: Sequence[float], model: Sequence[float]) -> float:
    """1 - W1(target, model) / (max - min) over candidate positions 0..n-1 (OpinionQA's
    measure, for ordered candidates): 1 is identical, 0 all mass at opposite ends. On the
    normalised distributions, without smoothing (W1 is finite with zeros)."""
    p, q = np.asarray(target, dtype=np.float64), np.asarray(model, dtype=np.float64)
    if len(p) < 2:
        return 1.0
    # W1 on a line is the area between the two cumulative distributions (unit spacing).
    w1 = float(np.sum(np.abs(np.cumsum(p / p.sum()) - np.cumsum(q / q.sum()))[:-1]))
    return 1.0 - w1 / (len(p) - 1)


def pairwise_collision(answers: Sequence[str]) -> float:
    """The fraction of pairs of answers that are equal (0 with fewer than two answers)."""
    n = len(answers)
    if n < 2:
        return 0.0
    equal_pairs = sum(c * (c - 1) // 2 for c in Counter(answers).values())
    return equal_pairs / (n * (n - 1) // 2)


def entropy(counts: Sequence[int]) -> float:
    """Entropy of the empirical distribution of counts."""
    c = np.asarray([x for x in counts if x > 0], dtype=np.float64)
    p = c / c.sum()
    return float(-np.sum(p * np.log(p)))


def normalized_entropy(answers: Sequence[str], support: int | None = None) -> float | None:
    """Entropy of the answers over the most it could be: ln(min(number of answers, size of
    the valid set)). 1 is as spread as possible; None when no spread is possible (fewer than
    two answers, or a valid set of one)."""
    most = len(answers) if support is None else min(len(answers), support)
    if most < 2:
        return None
    return entropy(list(Counter(answers).values())) / float(np.log(most))


def slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Least-squares slope of ys against xs."""
    x, y = np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64)
    if len(x) < 2:
        return 0.0
    dx = x - x.mean()
    return float(np.sum(dx * (y - y.mean())) / np.sum(dx * dx))


def means(rows: Sequence[dict]) -> dict:
    """Each metric's mean over the rows that have it (None where none has a value): a run's
    summary by task type, and tune's report before and after."""
    names = dict.fromkeys(name for row in rows for name in row)
    values = {name: [row[name] for row in rows if row.get(name) is not None] for name in names}
    return {name: float(np.mean(got)) if got else None for name, got in values.items()}
