"""Typed results of the operations; each prints readably and turns into JSON."""

from __future__ import annotations

from dataclasses import asdict, dataclass


class _Result:
    def to_dict(self) -> dict:
        return asdict(self)  # type: ignore[call-overload]


@dataclass(frozen=True)
class Sample(_Result):
    text: str
    n_tokens: int
    finish_reason: str  # "stop": the model ended its output; "length": max_tokens was reached


@dataclass(frozen=True)
class TokenProb(_Result):
    token: str  # the token's text; control tokens appear as their marker, e.g. "<end_of_turn>"
    id: int
    prob: float
    logprob: float


@dataclass(frozen=True)
class CandidateScore(_Result):
    text: str
    logprob: float  # log P(candidate tokens, then the end-of-output token | prompt)
    prob: float
    normalized: float  # prob / coverage
    n_tokens: int  # tokens scored, the end-of-output token included


@dataclass(frozen=True)
class ScoreResult(_Result):
    coverage: float  # the probability mass the model puts on the whole candidate set
    candidates: list[CandidateScore]

    def best(self) -> CandidateScore:
        return max(self.candidates, key=lambda c: c.logprob)


@dataclass(frozen=True)
class EnumeratedOutput(_Result):
    text: str
    prob: float  # P(text's own tokens, then end-of-output | prompt): the number score gives it
    text_prob: float  # every token path the search found that spells text (prob, or more)
    logprob: float  # log prob
    n_tokens: int  # the text's tokens, the end-of-output token included


@dataclass(frozen=True)
class EnumerateResult(_Result):
    coverage: float  # the mass of the outputs listed (their text_prob summed)
    unexplored: float  # mass of partial outputs never expanded: at most this much is missing
    exhausted: bool  # nothing was left to expand
    stopped: str  # coverage, min_prob, max_outputs, max_decoded, or exhausted
    cut: float  # mass that is no output: cut at max_tokens, or ended by another EOG token
    decoded: int  # tokens decoded (each prefix the outputs share, once per read)
    outputs: list[EnumeratedOutput]
