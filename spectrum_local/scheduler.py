"""One owner of an engine for many concurrent callers (the server's requests).

Callers on any thread use the ``Backend`` methods as on an ``Engine``; each call is queued and
waits for its answer. The scheduler's thread takes what has arrived and merges it:
- every pending read (score, top, prompt log-probs) goes into one ``Engine.read``: one decode
  for all of them, sharing their common tokens (a shared description is evaluated once);
- every sample job joins the engine's live samples, which advance together, one
  ``llama_decode`` per step; a job that arrives mid-way joins at the next step.
Reads run between steps, so a long sampling job delays a score by one step, not by the job.
"""

from __future__ import annotations

import threading
from typing import Sequence

from .backend import Backend, Busy, Generation, Path, PathResult
from .engine import Engine, GenerateJob


class _Read:
    def __init__(self, paths: Sequence[Path], keep: Sequence[int] | None):
        self.paths, self.keep = list(paths), keep
        self.result: list[PathResult] | None = None
        self.error: BaseException | None = None
        self.done = threading.Event()

    def answer(self, result=None, error=None) -> None:
        self.result, self.error = result, error
        self.done.set()


class Scheduler(Backend):
    """A ``Backend`` over ``engine`` that merges concurrent calls. Use as a context manager
    (or ``close()``): its thread runs until then."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._wake = threading.Condition()
        self._reads: list[_Read] = []
        self._new_jobs: list[tuple[GenerateJob, threading.Event]] = []
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="spectrum-scheduler", daemon=True)
        self._thread.start()

    def __enter__(self) -> "Scheduler":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop: work still queued or running ends now (reads fail, samples "abort")."""
        with self._wake:
            self._closing = True
            self._wake.notify()
        self._thread.join()

    def load(self) -> dict:
        """What the engine is doing now, and the tokens it has evaluated since it started (for
        /spectrum/v1/info and the tests)."""
        with self._wake:
            return {"live_samples": self.engine.live_samples, "queued_reads": len(self._reads),
                    "queued_jobs": len(self._new_jobs),
                    "tokens_evaluated": self.engine.tokens_evaluated}

    def __getattr__(self, name: str):
        # Tokens and model facts come straight from the engine (read-only, thread-safe).
        return getattr(self.engine, name)

    # -- the Backend calls, from any thread ----------------------------------------------------

    def read(self, paths: Sequence[Path], keep: Sequence[int] | None = None, *,
             cancel=None) -> list[PathResult]:
        work = _Read(paths, keep)
        self._submit(lambda: self._reads.append(work))
        work.done.wait()
        if work.error:
            raise work.error
        return work.result

    def generate(self, prompt, n, max_tokens, settings, seed, stop_tokens, *, logprobs=None,
                 on_step=None, on_done=None, cancel=None) -> list[Generation]:
        job = self.engine.new_job(prompt, n, max_tokens, settings, seed, stop_tokens, logprobs,
                                  on_step, on_done, cancel)
        done = threading.Event()
        self._submit(lambda: self._new_jobs.append((job, done)))
        done.wait()
        if job.error:
            raise job.error
        return job.results

    def _submit(self, enqueue) -> None:
        with self._wake:
            if self._closing:
                raise RuntimeError("the scheduler is closed")
            enqueue()
            self._wake.notify()

    # -- the scheduler's thread ----------------------------------------------------------------

    def _run(self) -> None:
        jobs: list[tuple[GenerateJob, threading.Event]] = []  # admitted or waiting for room
        while True:
            with self._wake:
                while not (self._reads or self._new_jobs or jobs or self._closing):
                    self._wake.wait()
                reads, self._reads = self._reads, []
                jobs += self._new_jobs
                self._new_jobs = []
                if self._closing:
                    break

            if reads:
                self._do_reads(reads)
            if jobs:
                try:
                    self.engine.advance([job for job, _ in jobs])
                except BaseException as e:  # the engine dropped every live sample
                    for job, _ in jobs:
                        job.error = job.error or e
                        job.abandon()
                for job, done in jobs:
                    if job.finished:
                        done.set()
                jobs = [(job, done) for job, done in jobs if not job.finished]
        closed = RuntimeError("the server is shutting down")
        for r in reads:
            r.answer(error=closed)
        for job, done in jobs:
            job.abandon()
            done.set()
        self.engine.clear()

    def _do_reads(self, reads: list[_Read]) -> None:
        """All pending reads in one engine call; the prefix cache keeps the newest prompt."""
        paths = [p for r in reads for p in r.paths]
        keep = next((r.keep for r in reversed(reads) if r.keep is not None), None)
        try:
            results = self.engine.read(paths, keep)
        except Busy:  # live samples hold the room: these reads go first after the next step
            with self._wake:
                self._reads = reads + self._reads
            return
        except BaseException as e:
            if len(reads) == 1:
                reads[0].answer(error=e)
            else:  # find whose read failed: each one alone
                for r in reads:
                    self._do_reads([r])
            return
        for r in reads:
            r.answer(results[:len(r.paths)])
            results = results[len(r.paths):]
