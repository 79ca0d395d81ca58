"""Terminal rendering of results: tables with a bar per probability."""

from __future__ import annotations

import json
from typing import Sequence

from .results import Sample, ScoreResult, TokenProb

BAR_WIDTH = 30
_EIGHTHS = " ▏▎▍▌▋▊▉"


def bar(fraction: float, width: int = BAR_WIDTH) -> str:
    """A horizontal bar, 1/8-character resolution, for a fraction in [0, 1]."""
    eighths = round(max(0.0, min(1.0, fraction)) * width * 8)
    full, part = divmod(eighths, 8)
    return "█" * full + (_EIGHTHS[part] if part else "")


def percent(p: float) -> str:
    if p != p:  # NaN
        return "n/a"
    if p >= 0.001 or p == 0:
        return f"{100 * p:.1f}%"
    return f"{p:.1e}"


def quoted(text: str) -> str:
    """A token or answer shown so that spaces and newlines are visible."""
    return json.dumps(text, ensure_ascii=False)


def score_table(result: ScoreResult) -> str:
    width = max(9, *(len(quoted(c.text)) for c in result.candidates))
    top = max(c.normalized for c in result.candidates) or 1.0
    lines = [f"{'candidate':<{width}}  {'prob':>8}  {'normalized':>10}"]
    for c in result.candidates:
        lines.append(f"{quoted(c.text):<{width}}  {percent(c.prob):>8}  {percent(c.normalized):>10}"
                     f"  {bar(c.normalized / top)}")
    lines.append(f"coverage: {percent(result.coverage)} of the probability mass is on these "
                 f"{len(result.candidates)} candidates")
    return "\n".join(lines)


def top_table(tokens: Sequence[TokenProb]) -> str:
    width = max(5, *(len(quoted(t.token)) for t in tokens))
    top = tokens[0].prob or 1.0
    lines = [f"{'token':<{width}}  {'id':>7}  {'prob':>8}"]
    for t in tokens:
        lines.append(f"{quoted(t.token):<{width}}  {t.id:>7}  {percent(t.prob):>8}  "
                     f"{bar(t.prob / top)}")
    lines.append(f"these {len(tokens)} tokens hold {percent(sum(t.prob for t in tokens))} "
                 "of the next-token probability")
    return "\n".join(lines)


def sample_list(samples: Sequence[Sample]) -> str:
    lines = []
    for i, s in enumerate(samples, start=1):
        cut = "" if s.finish_reason == "stop" else "  [cut at max tokens]"
        text = s.text.replace("\n", "\n    ")
        lines.append(f"{i:>3}. {text}{cut}")
    return "\n".join(lines)
