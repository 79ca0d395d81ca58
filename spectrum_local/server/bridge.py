"""From the engine's threads to the event loop, and back when the client goes away.

Every model call of a request runs in a worker thread with a ``cancel`` event (the operations'
``cancel=``): ``call`` awaits it as a plain answer, ``stream`` turns what it reports meanwhile
into server-sent events. Either way a client that disconnects sets ``cancel``, so its samples
end "abort" and its reads stop between decodes (``Cancelled``): the engine does nothing for a
client that is gone. A shutdown past its grace period sets every request's ``cancel`` too
(``InFlight``): they answer with what they have instead of being cut off.
"""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any, AsyncIterator, Awaitable, Callable

from fastapi import Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from ..errors import Cancelled
from .errors import APIError, as_api_error

POLL = 0.25  # seconds between looks at the client's connection


class InFlight:
    """The cancel events of the requests running now (the app's ``state.in_flight``)."""

    def __init__(self):
        self._events: set[threading.Event] = set()
        self.stopping = False

    def add(self, cancel: threading.Event) -> None:
        self._events.add(cancel)
        if self.stopping:
            cancel.set()

    def discard(self, cancel: threading.Event) -> None:
        self._events.discard(cancel)

    def cancel_all(self) -> None:
        """The shutdown's grace is over: every request stops and answers what it has."""
        self.stopping = True
        for cancel in list(self._events):
            cancel.set()


async def call(request: Request, function: Callable[..., Any], *args, **kwargs):
    """``function(*args, **kwargs, cancel=event)`` in a worker thread; see ``until_done``."""
    cancel = threading.Event()
    work = run_in_threadpool(function, *args, **kwargs, cancel=cancel)
    return await until_done(request, work, cancel)


async def until_done(request: Request, work: Awaitable, cancel: threading.Event):
    """Await ``work``, setting ``cancel`` if the client disconnects meanwhile (or the request
    is cancelled: a shutdown past its grace)."""
    in_flight: InFlight = request.app.state.in_flight
    in_flight.add(cancel)
    task = asyncio.ensure_future(work)
    try:
        while not task.done():
            done, _ = await asyncio.wait({task}, timeout=POLL)
            if not done and await request.is_disconnected():
                cancel.set()
        return task.result()
    except Cancelled:
        if in_flight.stopping:
            raise APIError("the server is shutting down", status=503) from None
        raise
    except asyncio.CancelledError:
        cancel.set()
        raise
    finally:
        in_flight.discard(cancel)


Emit = Callable[[Any], None]


def stream(request: Request, work: Callable[[Emit, threading.Event], Awaitable[None]],
           render: Callable[[Any], dict | None], *, lines: bool = False) -> StreamingResponse:
    """Server-sent events: ``work(emit, cancel)`` runs the request, calling ``emit(item)`` from
    any thread as results come; each item becomes the event ``render(item)`` (on the event
    loop; None: no event). Then ``data: [DONE]``. An error after the headers are sent is the
    last event, in the error body's shape. A client that goes away sets ``cancel``. With
    ``lines``: NDJSON instead (Ollama's stream), one object per line and no end marker."""
    as_text = ndjson if lines else event
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    cancel = threading.Event()
    end = object()

    def emit(item) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, (item, None))

    async def run() -> None:
        try:
            await work(emit, cancel)
            emit(end)
        except Exception as e:
            loop.call_soon_threadsafe(queue.put_nowait, (end, e))

    async def events() -> AsyncIterator[str]:
        in_flight: InFlight = request.app.state.in_flight
        in_flight.add(cancel)
        task = asyncio.ensure_future(run())
        try:
            try:
                while True:
                    item, error = await queue.get()
                    if error is not None:
                        raise error
                    if item is end:
                        break
                    if (data := render(item)) is not None:
                        yield as_text(data)
            except Exception as e:
                yield as_text(as_api_error(e).body(ollama=lines))
            if not lines:
                yield "data: [DONE]\n\n"
        finally:
            cancel.set()  # the client left early (or all is sent): stop what still runs
            in_flight.discard(cancel)
            await asyncio.gather(task, return_exceptions=True)

    return StreamingResponse(events(), media_type="application/x-ndjson" if lines
                             else "text/event-stream")


def event(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


def ndjson(data: dict) -> str:
    return json.dumps(data, ensure_ascii=False, separators=(",", ":")) + "\n"
