"""Batch jobs: one prompt per JSON line in, one result per JSON line out, resumable.

Each result line carries its input line's ``id`` and is flushed as soon as it is computed, so a
killed job loses at most the line in flight; ``resume`` skips the ids already in the output
(dropping a torn last line first). A malformed line, or one a server refuses, is reported
with its number and skipped, or stops the job when ``strict``. ``open_batch`` does everything
that can fail on the files (the output opened and locked, the input read and checked) before
a model is loaded; ``BatchJob.run`` then runs the lines.

Results are written in input order. Locally, lines run one at a time by default, so consecutive
prompts that share a description and examples reuse the engine's cached prefix; with
``parallel`` > 1 they go through a ``Scheduler``, which merges concurrent reads into shared
decodes. Against a server, ``parallel`` requests are in flight (default 16): the server batches
them.
"""

from __future__ import annotations

import contextlib
import json
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

from .display import Progress
from .errors import InputError
from .model import SpectrumModel
from .ops import OPERATIONS
from .scheduler import Scheduler
from .textfile import (ResultsFile, check_unicode, jsonl_lines, open_results,
                       parse_json_line, read_text)

DEFAULT_PARALLEL = 16  # requests in flight against a server

def _run_score(model: SpectrumModel, messages: list, options: dict) -> dict:
    result = model.score(messages, **options)
    return {"coverage": result.coverage, "candidates": [c.to_dict() for c in result.candidates]}


def _run_sample(model: SpectrumModel, messages: list, options: dict) -> dict:
    samples = model.sample(messages, **options)
    return {"samples": [s.to_dict() for s in samples]}


def _run_top(model: SpectrumModel, messages: list, options: dict) -> dict:
    return {"tokens": [t.to_dict() for t in model.top(messages, **options)]}


def _run_enumerate(model: SpectrumModel, messages: list, options: dict) -> dict:
    return model.enumerate(messages, **options).to_dict()


RUNNERS: dict[str, Callable[[SpectrumModel, list, dict], dict]] = {
    "score": _run_score, "sample": _run_sample, "top": _run_top, "enumerate": _run_enumerate}

# Per operation: the fields of a result line besides "id". A result line holds neither the
# model nor the settings (its schema is the command's --json output), so --resume can check
# only that an output holds results of the same operation; resuming with the same model and
# options is up to the user.
RESULT_FIELDS: dict[str, set[str]] = {
    "score": {"coverage", "candidates"},
    "sample": {"samples"},
    "top": {"tokens"},
    "enumerate": {"coverage", "unexplored", "exhausted", "stopped", "cut", "decoded",
                  "outputs"},
}


@dataclass
class BatchSummary:
    done: int = 0  # results written by this run
    tokens: int = 0  # scored or generated in those results
    already: int = 0  # ids found in the output and skipped (resume)
    servers: dict[str, int] = field(default_factory=dict)  # replicas: requests each answered
    failed: list[tuple[int, str]] = field(default_factory=list)  # (line number, error)

    def line(self, seconds: float) -> str:
        seconds = max(seconds, 1e-9)
        text = (f"{self.done} results in {seconds:.1f} s ({self.done / seconds:.2f}/s, "
                f"{self.tokens / seconds:,.0f} tokens/s scored or generated)")
        if self.already:
            text += f", {self.already} already done"
        if self.failed:
            numbers = ", ".join(str(n) for n, _ in sorted(self.failed)[:10])
            more = "..." if len(self.failed) > 10 else ""
            text += f"; {len(self.failed)} line(s) skipped: {numbers}{more}"
        if len(self.servers) > 1:
            text += "; requests answered: " + ", ".join(f"{url} {count}" for url, count
                                                        in self.servers.items())
        return text


@dataclass(frozen=True)
class Job:
    line: int
    id: Any
    messages: list
    options: dict


def read_jobs(lines: Iterable[str], operation: str, defaults: dict,
              report: Callable[[int, str], None]) -> list[Job]:
    """Parse input lines; ``report(line, error)`` is called for each malformed one."""
    jobs, seen = [], set()
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        try:
            job = _parse_line(number, text, operation, defaults)
            key = json.dumps(job.id)
            if key in seen:
                raise InputError(f"duplicate id {job.id!r}")
            seen.add(key)
            jobs.append(job)
        except InputError as e:
            report(number, str(e))
    return jobs


def _parse_line(number: int, text: str, operation: str, defaults: dict) -> Job:
    """A line's job: its id, messages, and options (the line's fields over ``defaults``),
    checked by the operation's ``ops`` model, so a bad value reads as it does everywhere."""
    obj = parse_json_line(text)
    if not isinstance(obj, dict):
        raise InputError("a line must be a JSON object")
    check_unicode(obj, "the line")  # text that cannot be tokenized, nor written out
    messages = obj.get("messages", [])
    if not isinstance(messages, list):
        raise InputError('"messages" must be a list of {"role", "content"} objects')
    ident = line_id(obj, number)
    fields = {name: value for name, value in obj.items() if name not in ("id", "messages")}
    options = OPERATIONS[operation].check(**{**defaults, **fields}).model_dump()
    return Job(number, ident, messages, options)


def line_id(obj: dict, number: int) -> str | int:
    """A JSONL line's id: its "id", a string or an integer, else its line number."""
    ident = obj.get("id", number)
    if not isinstance(ident, (str, int)) or isinstance(ident, bool):
        raise InputError('"id" must be a string or an integer')
    return ident


def check_line(obj: dict, number: int, fields: dict, what: str, also: set[str]) -> str | int:
    """A JSONL line's id, once ``obj`` is checked to hold only ``id``, ``also`` and
    ``fields``, each of these with its JSON type (a boolean only where a boolean is asked
    for). Eval's task files read their lines with it."""
    unknown = set(obj) - {"id"} - also - set(fields)
    if unknown:
        raise InputError(f"unknown field(s) for {what}: {', '.join(sorted(unknown))}")
    for name, kind in fields.items():
        value = obj.get(name)
        if name in obj and (not isinstance(value, kind)
                            or (isinstance(value, bool) and kind is not bool)):
            raise InputError(f'"{name}" has the wrong type: {value!r}')
    return line_id(obj, number)


def _finished_id(operation: str, out: str) -> Callable[[int, dict], str]:
    """For ``open_results``: a result line's id (as JSON text), once its fields show that it is
    a result of ``operation``."""
    def check(number: int, record: dict) -> str:
        fields = set(record) - {"id"}
        if fields != RESULT_FIELDS[operation]:
            found = [name for name, names in RESULT_FIELDS.items() if names == fields]
            what = (f"a result of {found[0]}, not of {operation}" if found
                    else f"not a result of {operation}")
            raise InputError(f"{out} line {number} is {what}; resume a job with the command "
                             "that started it, or choose another --out")
        return json.dumps(record["id"])
    return check


@dataclass
class BatchJob:
    """A batch job ready to run: its output open and locked, its input read and checked, the
    ids already done set aside. Closing it (as a context manager) releases the output."""

    operation: str
    in_path: str
    out: ResultsFile
    strict: bool
    report: Callable[[str], None]
    todo: list[Job] = field(default_factory=list)
    summary: BatchSummary = field(default_factory=BatchSummary)

    def fail(self, number: int, error: str) -> None:
        """A bad line: reported and skipped, or the end of the job when ``strict``."""
        if self.strict:
            raise InputError(f"{self.in_path} line {number}: {error}")
        self.report(f"{self.in_path} line {number}: {error} (skipped)")
        self.summary.failed.append((number, error))

    def run(self, model, shared_messages: list, parallel: int | None = None,
            progress: bool = True) -> BatchSummary:
        """Run the lines on ``model`` (a ``SpectrumModel`` or a ``remote.ServedModel``).
        ``parallel``: lines in flight; default 1 locally, ``DEFAULT_PARALLEL`` against a
        server."""
        local = model.local
        if parallel is None:
            parallel = 1 if local else DEFAULT_PARALLEL
        if parallel < 1:
            raise InputError("--parallel must be at least 1")

        def run(job: Job) -> dict:
            return RUNNERS[self.operation](model, shared_messages + job.messages, job.options)

        summary = self.summary
        client = getattr(getattr(model, "engine", model), "client", None)  # a server's model
        with contextlib.ExitStack() as stack:
            if local and parallel > 1:
                model = model.using(stack.enter_context(Scheduler(model.engine)))
            bar = stack.enter_context(Progress(len(self.todo), enabled=progress))
            try:
                for job, outcome in _in_order(self.todo, run, parallel):
                    tokens = 0
                    if isinstance(outcome, InputError):
                        self.fail(job.line, str(outcome))
                    else:
                        self.out.write({"id": job.id, **outcome})
                        tokens = _tokens(outcome)
                        summary.done += 1
                        summary.tokens += tokens
                    bar.advance(tokens)
            except BaseException:
                if client is not None:  # stopped (Ctrl-C, a failed server): end requests
                    client.close()
                raise
        if client is not None:
            summary.servers = {r.url: r.answered for r in client.replicas}
        return summary

    def __enter__(self) -> "BatchJob":
        return self

    def __exit__(self, kind, error, traceback) -> None:
        self.out.__exit__(kind, error, traceback)


def open_batch(operation: str, in_path: str, out_path: str, *, defaults: dict, resume: bool,
               strict: bool, report: Callable[[str], None]) -> BatchJob:
    """Get a batch job ready, before any model loads: the output opened and locked first (a
    second job on it stops at once, even while this one waits for its input on stdin), then
    the ids already in it (``resume``), then the input read and parsed, bad lines reported (or
    the end of the job when ``strict``)."""
    with contextlib.ExitStack() as cleanup:
        out = cleanup.enter_context(open_results(out_path, resume=resume, source=in_path,
                                                 check=_finished_id(operation, out_path)))
        batch = BatchJob(operation, in_path, out, strict, report)
        lines = jsonl_lines(read_text(in_path, "batch input"))
        jobs = read_jobs(lines, operation, defaults, batch.fail)
        finished = set(out.earlier)
        batch.todo = [job for job in jobs if json.dumps(job.id) not in finished]
        batch.summary.already = len(jobs) - len(batch.todo)
        cleanup.pop_all()
    return batch


def run_batch(model, operation: str, in_path: str, out_path: str, *, defaults: dict,
              shared_messages: list, resume: bool, strict: bool,
              report: Callable[[str], None], parallel: int | None = None,
              progress: bool = True) -> BatchSummary:
    """Run a batch job over ``model`` (a ``SpectrumModel`` or a ``remote.ServedModel``):
    ``open_batch``, then ``BatchJob.run``."""
    with open_batch(operation, in_path, out_path, defaults=defaults, resume=resume,
                    strict=strict, report=report) as batch:
        return batch.run(model, shared_messages, parallel, progress)


def _in_order(jobs: list[Job], run: Callable[[Job], dict],
              parallel: int) -> Iterator[tuple[Job, dict | InputError]]:
    """Each job with its result, or the ``InputError`` that refused it, in input order, with up
    to ``parallel`` jobs running. Any other error stops the job."""
    def outcome(job: Job) -> dict | InputError:
        try:
            return run(job)
        except InputError as e:
            return e

    if parallel == 1:
        yield from ((job, outcome(job)) for job in jobs)
        return
    pool = ThreadPoolExecutor(parallel, thread_name_prefix="spectrum-batch")
    pending: deque = deque()
    waiting = iter(jobs)
    try:
        while True:
            # Twice the workers queued: none idles while the oldest result is written.
            while len(pending) < 2 * parallel and (job := next(waiting, None)) is not None:
                pending.append((job, pool.submit(outcome, job)))
            if not pending:
                return
            job, future = pending.popleft()
            yield job, future.result()
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def _tokens(result: dict) -> int:
    """Tokens scored, generated or decoded for one result line (for the rates shown)."""
    if "decoded" in result:  # enumerate
        return result["decoded"]
    items = result.get("candidates") or result.get("samples") or []
    return sum(item["n_tokens"] for item in items)
