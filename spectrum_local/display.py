"""Terminal rendering of results: tables with a bar per probability."""

from __future__ import annotations

import json
import sys
import time
from typing import Sequence, TextIO

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


class Progress:
    """A one-line progress bar on stderr with count, requests and tokens per second, and ETA;
    drawn only on a terminal (unless ``enabled`` says otherwise), at most five times a
    second."""

    def __init__(self, total: int, *, enabled: bool | None = True, stream: TextIO | None = None):
        self.total, self.done, self.tokens = total, 0, 0
        self.stream = stream or sys.stderr
        self.enabled = bool(enabled) and (stream is not None or self.stream.isatty())
        self.start = self.last_draw = time.monotonic()
        self.drawn = False

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        if self.drawn:
            self.stream.write("\n")
            self.stream.flush()

    def advance(self, tokens: int = 0) -> None:
        """One more done, with the tokens it scored or generated."""
        self.done += 1
        self.tokens += tokens
        now = time.monotonic()
        if self.enabled and (now - self.last_draw >= 0.2 or self.done == self.total):
            self.last_draw = now
            self.stream.write("\r" + self.render(now - self.start))
            self.stream.flush()
            self.drawn = True

    def render(self, elapsed: float) -> str:
        rate = self.done / elapsed if elapsed > 0 else 0.0
        left = (self.total - self.done) / rate if rate > 0 else float("nan")
        fraction = self.done / self.total if self.total else 1.0
        token_rate = self.tokens / elapsed if elapsed > 0 else 0.0
        return (f"{bar(fraction, 24):<24} {self.done}/{self.total}  {rate:.2f} req/s  "
                f"{token_rate:,.0f} tok/s  ETA {_duration(left)}  ")


def _duration(seconds: float) -> str:
    if seconds != seconds:
        return "?"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"
