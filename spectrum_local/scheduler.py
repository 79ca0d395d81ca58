"""One owner of an engine for many concurrent callers (the server's requests).

Callers on any thread use the ``Backend`` methods as on an ``Engine``; each call is checked on
the caller's thread (a bad request fails there, before it can meet anyone else's), queued, and
waits for its answer. The scheduler's thread takes turns:
- reads (score, top, prompt log-probs, enumerate's expansions) are merged into one
  ``Engine.read`` per turn, sharing their common tokens (a shared description is evaluated
  once): every read of at most a chunk of paths whole, and one chunk of the longer ones; a
  long read (10,000 candidates) is answered a chunk per turn, newest reads first, so a
  one-token ``top`` waits for one chunk, not for the whole read;
- every sample job joins the engine's live samples, which advance together, one
  ``llama_decode`` per step; a job that arrives mid-way joins at the next step.
A caller that sets its ``cancel`` is dropped at the next turn (its samples end "abort").
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Sequence

from .backend import Backend, Busy, Generation, Path, PathResult
from .errors import Cancelled

if TYPE_CHECKING:  # the scheduler is given an engine: importing it would load llama.cpp
    from .llama import Engine, GenerateJob

# What the scheduler forwards to the engine as it is: tokens and model facts (read-only).
FORWARDED = frozenset({
    "path", "n_vocab", "n_ctx", "n_ctx_train", "metadata", "max_sequences", "lora",
    "tokenize", "detokenize", "control_token", "token_text", "token_bytes",
    "is_end_of_generation", "end_of_generation_tokens", "check_tokens", "describe",
    "live_samples", "tokens_evaluated", "whole_rows"})


class _Read:
    """A caller's read, answered ``chunk`` paths at a time: ``done`` paths so far."""

    def __init__(self, paths: Sequence[Path], keep: Sequence[int] | None, cancel):
        self.paths, self.keep, self.cancel = list(paths), keep, cancel
        self.results: list[PathResult] = []
        self.error: BaseException | None = None
        self.answered = threading.Event()

    @property
    def done(self) -> int:
        return len(self.results)

    @property
    def cancelled(self) -> bool:
        return self.cancel is not None and self.cancel.is_set()

    def answer(self, error: BaseException | None = None) -> None:
        self.error = error
        self.answered.set()


class Scheduler(Backend):
    """A ``Backend`` over ``engine`` that merges concurrent calls. Use as a context manager
    (or ``close()``): its thread runs until then."""

    def __init__(self, engine: Engine, chunk: int | None = None):
        self.engine = engine
        self.chunk = chunk or engine.max_sequences  # paths per turn: about one decode group
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
        if name in FORWARDED:
            return getattr(self.engine, name)
        raise AttributeError(name)

    # -- the Backend calls, from any thread ----------------------------------------------------

    def read(self, paths: Sequence[Path], keep: Sequence[int] | None = None, *,
             cancel: threading.Event | None = None) -> list[PathResult]:
        self.engine.check_read(paths, keep)  # a bad read fails here, alone
        work = _Read(paths, keep, cancel)
        if not work.paths and keep is None:
            return []
        self._submit(lambda: self._reads.append(work))
        work.answered.wait()
        if work.error:
            raise work.error
        return work.results

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
                jobs += self._new_jobs
                self._new_jobs = []
                if self._closing:
                    break
            self._read_turn()
            if jobs:
                try:
                    self.engine.advance([job for job, _ in jobs])
                except BaseException as e:  # not a job's own fault: the engine's thread broke
                    for job, _ in jobs:
                        job.abandon(e)
                for job, done in jobs:
                    if job.finished:
                        done.set()
                jobs = [(job, done) for job, done in jobs if not job.finished]
        closed = RuntimeError("the server is shutting down")
        with self._wake:
            reads, self._reads = self._reads, []
        for r in reads:
            r.answer(closed)
        for job, done in jobs:
            job.abandon()
            done.set()
        self.engine.clear()

    def _read_turn(self) -> None:
        """One turn of the queued reads: the cancelled ones dropped, every short read whole and
        one chunk of the long ones, least-served first (a new read before the rest of a long
        one)."""
        with self._wake:
            for r in self._reads:
                if r.cancelled:
                    r.answer(Cancelled("cancelled"))
            self._reads = [r for r in self._reads if not r.answered.is_set()]
            queue = sorted(self._reads, key=lambda r: r.done)
        # A read of at most a chunk goes whole into every turn (concurrent small requests share
        # one decode, as before chunking); longer reads share one chunk of room per turn.
        parts, room = [], self.chunk
        for r in queue:
            left = len(r.paths) - r.done
            if left <= self.chunk:
                parts.append((r, left))
            elif room > 0:
                parts.append((r, min(room, left)))
                room -= min(room, left)
        if parts:
            self._serve(parts)

    def _serve(self, parts: list[tuple[_Read, int]]) -> None:
        """``take`` more paths of each read in one engine read; the prefix cache keeps the
        prompt of the last read with work left (its next chunk starts from it)."""
        keeps = [r.keep for r, take in parts if r.keep is not None]
        left = [r.keep for r, take in parts if r.keep is not None and r.done + take < len(r.paths)]
        keep = (left or keeps or [None])[-1]
        paths = [p for r, take in parts for p in r.paths[r.done:r.done + take]]
        try:
            results = self.engine.read(paths, keep)
        except Busy:  # live samples hold the room: after the next step
            return
        except BaseException as e:
            if len(parts) > 1:  # find whose read failed: each one alone
                for part in parts:
                    self._serve([part])
                return
            parts[0][0].answer(e)
            self._forget(parts[0][0])
            return
        for r, take in parts:
            r.results += results[:take]
            results = results[take:]
            if r.done == len(r.paths):
                r.answer()
                self._forget(r)

    def _forget(self, read: _Read) -> None:
        with self._wake:
            if read in self._reads:
                self._reads.remove(read)
