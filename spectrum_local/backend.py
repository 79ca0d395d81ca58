"""What the operations need from a backend, written once: ``read`` (log-probabilities along
token paths, the prefix cache) and ``generate`` (samples), plus tokens. ``Engine`` implements it
on llama.cpp; ``Scheduler`` on an engine shared by many concurrent callers. The derived reads
(a prompt's next-token logits, candidate continuations, vLLM's prompt log-probs) live here, so
both backends answer them the same way."""

from __future__ import annotations

from dataclasses import dataclass, field
from threading import Event
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class SamplerSettings:
    """llama.cpp's sampler chain. The defaults are the model card's: temperature 1, no
    truncation, no penalty, i.e. exactly the model's distribution."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repeat_penalty: float = 1.0

    @property
    def truncates(self) -> bool:
        """Whether the chain sorts or cuts the candidate list (anything but plain "dist")."""
        return (self.top_k > 0 or self.top_p < 1.0 or self.min_p > 0.0
                or self.temperature == 0.0)


class Busy(Exception):
    """Live samples hold the room a read needs; it can run after they advance."""


@dataclass(frozen=True)
class Path:
    """A token sequence to read along: the log-probability of each of ``tokens[first:]`` given
    the tokens before it; with ``top`` not None also each token's rank and the ``top`` most
    likely alternatives (0: ranks only); and the whole next-token logits row after the last
    token if ``final``."""

    tokens: Sequence[int]
    first: int
    top: int | None = None
    final: bool = False

    @property
    def wants_nothing(self) -> bool:
        return self.first >= len(self.tokens) and not self.final


@dataclass(frozen=True)
class PathResult:
    logprobs: np.ndarray  # of tokens[first:]
    ranks: list[int] | None = None  # with top: 1 + how many tokens are more likely
    tops: list[tuple[tuple[int, float], ...]] | None = None  # with top: (id, logprob), best first
    row: np.ndarray | None = None  # with final: the logits after the last token


@dataclass(frozen=True)
class PositionLogprobs:
    token: int
    logprob: float
    rank: int
    top: tuple[tuple[int, float], ...]


@dataclass(frozen=True)
class Step:
    """One generated token of one of a job's samples."""

    index: int  # which sample
    token: int
    logprob: float | None  # with logprobs: log-softmax of the raw logits (before temperature
    top: tuple[tuple[int, float], ...] | None  # or truncation), and the best (id, logprob)


@dataclass
class Generation:
    tokens: list[int] = field(default_factory=list)  # without the stop token
    finish_reason: str = "length"  # "stop", "length", or "abort" (cancelled)
    stop_token: int | None = None  # the stop token that ended it
    steps: list[Step] = field(default_factory=list)  # one per token
    stop_step: Step | None = None  # the stop token's step (vLLM counts it in logprobs)


class Backend:
    """The reads every backend derives from its ``read(paths, keep)``. A backend also has
    ``tokenize``, ``detokenize``, ``control_token``, ``token_text``, ``n_vocab``, ``generate``,
    ``describe`` and ``close`` (see ``Engine``)."""

    whole_rows = True  # reads can return a whole next-token logits row (Path.final)

    def read(self, paths: Sequence[Path], keep: Sequence[int] | None = None, *,
             cancel: Event | None = None) -> list[PathResult]:
        """What each path asks for (see ``Path``); afterwards the prefix cache holds ``keep``.
        Setting ``cancel`` stops a long read between its decodes (``Cancelled``)."""
        raise NotImplementedError

    def prompt_logits(self, prompt: Sequence[int], *, cancel: Event | None = None) -> np.ndarray:
        """Next-token logits after ``prompt``."""
        return self.read([Path(prompt, len(prompt), final=True)], keep=prompt,
                         cancel=cancel)[0].row

    def next_tokens(self, prompt: Sequence[int], k: int, *,
                    cancel: Event | None = None) -> tuple[tuple[int, float], ...]:
        """The ``k`` most likely tokens after ``prompt``: (id, logprob), best first. A server
        backend asks for them (it has no whole row to give)."""
        row = self.prompt_logits(prompt, cancel=cancel)
        return best_tokens(row, k, float(logsumexp(row)))

    def continuation_logprobs(self, prompt: Sequence[int],
                              continuations: Sequence[tuple[int, Sequence[int]]], *,
                              cancel: Event | None = None) -> list[np.ndarray]:
        """For each ``(start, tokens)``, the log-probability of each of ``tokens`` placed at
        positions start.. after ``prompt[:start]``. ``start`` is normally ``len(prompt)``; it is
        smaller when a tokenizer merges the continuation into the prompt's last text."""
        paths = [Path([*prompt[:start], *tokens], start) for start, tokens in continuations]
        return [r.logprobs for r in self.read(paths, keep=prompt, cancel=cancel)]

    def prompt_logprobs(self, tokens: Sequence[int], top: int = 0, *,
                        cancel: Event | None = None) -> list[PositionLogprobs]:
        """Log-probability, rank and the ``top`` most likely alternatives at positions 1.. of
        ``tokens`` (vLLM's prompt_logprobs)."""
        if len(tokens) < 2:
            return []
        result = self.read([Path(tokens, 1, top=top)], keep=tokens, cancel=cancel)[0]
        return [PositionLogprobs(int(t), float(lp), rank, alternatives) for t, lp, rank, alternatives
                in zip(tokens[1:], result.logprobs, result.ranks, result.tops)]


def logsumexp(rows: np.ndarray) -> np.ndarray:
    """Per-row log-sum-exp: exp in float32 (fast over a 262k vocabulary), sums in float64."""
    peak = rows.max(axis=-1, keepdims=True)
    sums = np.exp(rows - peak).sum(axis=-1, dtype=np.float64)
    return peak[..., 0].astype(np.float64) + np.log(sums)


def best_tokens(row: np.ndarray, k: int, lse: float) -> tuple[tuple[int, float], ...]:
    """The ``k`` most likely (id, logprob) of a logits row, best first."""
    if k <= 0:
        return ()
    best = np.argpartition(-row, k - 1)[:k]
    best = best[np.argsort(-row[best], kind="stable")]
    return tuple((int(t), float(row[t] - lse)) for t in best)


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
