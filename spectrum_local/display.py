"""Terminal rendering of results: tables with a bar per probability."""

from __future__ import annotations

import json
import sys
import time
from typing import Sequence, TextIO

from .results import EnumerateResult, Sample, ScoreResult, TokenProb

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


def enumerate_table(result: EnumerateResult) -> str:
    outputs = result.outputs
    width = max(6, *(len(quoted(o.text)) for o in outputs)) if outputs else 6
    top = max((o.text_prob for o in outputs), default=0.0) or 1.0
    lines = [f"{'output':<{width}}  {'prob':>8}"]
    for o in outputs:
        shown = percent(o.text_prob)  # other spellings, when they change the number shown
        other = (f"  (text: {shown}, other tokenisations included)"
                 if shown != percent(o.prob) else "")
        lines.append(f"{quoted(o.text):<{width}}  {percent(o.prob):>8}  "
                     f"{bar(o.text_prob / top)}{other}")
    reasons = {"coverage": "the coverage asked for was reached",
               "min_prob": "no output left can reach --min-prob",
               "max_outputs": "--max-outputs were listed",
               "max_decoded": "the --max-decoded budget was spent",
               "exhausted": "no path was left to expand"}
    lines.append(f"coverage: these {len(outputs)} outputs hold {percent(result.coverage)} of the "
                 f"probability; at most {percent(result.unexplored)} is unexplored")
    cut = (f"; {percent(result.cut)} is no output (longer than --max-tokens, or ended "
           "otherwise)" if result.cut >= 0.001 else "")
    lines.append(f"stopped: {reasons[result.stopped]} ({result.decoded:,} tokens decoded){cut}")
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


def eval_tables(report: dict) -> str:
    """An eval report (``EvalReport.to_dict()``) as one table per task type, each task a row
    with a bar for its headline number, then the mean over the type's tasks."""
    compared = "vs" in report
    columns = _COMPARE_COLUMNS if compared else _EVAL_COLUMNS
    sections = []
    for kind, spec in columns.items():
        rows = [t for t in report["tasks"] if t["type"] == kind]
        if not rows:
            continue
        means = report["summary"][kind]
        mean_row = {"id": f"mean of {len(rows)}", "metrics": means} if not compared else \
            {**means, "id": f"mean of {len(rows)}", "a": {"metrics": means["a"]},
             "b": {"metrics": means["b"]}}
        sections.append(_table(kind, spec, rows, mean_row))
    if compared:
        sections.append(f"a = {report['model']}\nb = {report['vs']}")
    return "\n\n".join(sections)


def _number(digits: int = 3):
    def show(value) -> str:
        return "n/a" if value is None else f"{value:.{digits}f}"
    return show


def _metric(name: str, show=_number(), model: str | None = None):
    """A column reading ``metrics[name]`` (of model "a" or "b" in a comparison)."""
    def get(row: dict):
        source = row[model] if model else row
        return show(source["metrics"].get(name))
    return get


def _field(name: str, show=_number()):
    return lambda row: show(row[name]) if name in row else ""


def _sparkline(values) -> str:
    """A tiny curve: one block per value, scaled between the smallest and the largest."""
    blocks = "▁▂▃▄▅▆▇█"
    low, high = min(values), max(values)
    span = (high - low) or 1.0
    return "".join(blocks[round((v - low) / span * 7)] for v in values)


def _share(value) -> str:
    return "n/a" if value is None else percent(value)


class _Bar(str):
    """A column header whose cells are bars (left-aligned)."""


def _bar_of(value, scale: float = 1.0) -> str:
    return "" if value is None else bar(value / scale, 20)


_LN2 = 0.6931471805599453  # the largest JS divergence
_EVAL_COLUMNS = {
    "distribution": [("coverage", _metric("coverage", _share)),
                     ("JS", _metric("js_divergence")), ("KL", _metric("kl_divergence")),
                     ("cross-ent", _metric("cross_entropy")),
                     ("mode", _metric("mode_match", _number(2))),
                     ("repr", _metric("representativeness")),
                     (_Bar("JS / ln 2"),
                      lambda row: _bar_of(row["metrics"].get("js_divergence"), _LN2))],
    "generation": [("valid", _metric("valid_fraction", _share)),
                   ("unique/valid", _metric("unique_of_valid", _share)),
                   ("unique", _metric("unique_valid", _number(1))),
                   ("set cov", _metric("valid_set_coverage", _share)),
                   ("collision", _metric("pairwise_collision")),
                   ("entropy", _metric("normalized_entropy")),
                   ("cut", _field("cut_at_max_tokens", _number(0))),
                   (_Bar("valid"), lambda row: _bar_of(row["metrics"].get("valid_fraction")))],
    "steerability": [("loss k0", _metric("first_loss")), ("loss kmax", _metric("last_loss")),
                     ("excess", _metric("excess_loss")), ("slope/k", _metric("slope", _number(4))),
                     (_Bar("loss vs k"), lambda row: _sparkline(row["loss"]) if "loss" in row
                      else "")],
}
_COMPARE_COLUMNS = {
    "distribution": [("JS(a,b)", _field("js_between", _number(4))),
                     ("KL 1st tok", _field("first_token_kl", _number(4))),
                     ("JS a", _metric("js_divergence", model="a")),
                     ("JS b", _metric("js_divergence", model="b")),
                     ("cov a", _metric("coverage", _share, "a")),
                     ("cov b", _metric("coverage", _share, "b")),
                     (_Bar("JS(a,b) / ln 2"), lambda row: _bar_of(row.get("js_between"), _LN2))],
    "generation": [("KL 1st tok", _field("first_token_kl", _number(4))),
                   ("valid a", _metric("valid_fraction", _share, "a")),
                   ("valid b", _metric("valid_fraction", _share, "b")),
                   ("uniq/valid a", _metric("unique_of_valid", _share, "a")),
                   ("uniq/valid b", _metric("unique_of_valid", _share, "b"))],
    "steerability": [("KL 1st tok", _field("first_token_kl", _number(4))),
                     ("loss kmax a", _metric("last_loss", model="a")),
                     ("loss kmax b", _metric("last_loss", model="b")),
                     ("slope a", _metric("slope", _number(4), "a")),
                     ("slope b", _metric("slope", _number(4), "b"))],
}


def _table(kind: str, columns, rows: list[dict], mean_row: dict) -> str:
    cells = [[str(r["id"])] + [get(r) for _, get in columns] for r in [*rows, mean_row]]
    headers = [kind] + [header for header, _ in columns]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    left = [i == 0 or isinstance(h, _Bar) for i, h in enumerate(headers)]

    def line(values) -> str:
        return "  ".join(v.ljust(widths[i]) if left[i] else v.rjust(widths[i])
                         for i, v in enumerate(values)).rstrip()
    rule = "-" * (sum(widths) + 2 * (len(headers) - 1))
    return "\n".join([line(headers), rule, *(line(c) for c in cells[:-1]), rule, line(cells[-1])])


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
