"""The ASGI app: native routes over the Python API, the OpenAI-compatible routes, the page.

Every route validates its body with a typed model, then runs the API call in a worker thread;
the model's scheduler merges what concurrent requests ask for into shared decodes. Errors are
always ``{"error": {"message", "type", "param", "code"}}`` (vLLM's shape) with a 4xx status for
anything the client sent.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import threading
from importlib import resources
from typing import Any, Awaitable, Callable

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, StreamingResponse
from fastapi_offline import FastAPIOffline
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware

from .. import candidates as candidate_specs
from ..errors import InputError, SpectrumError
from ..model import SpectrumModel
from . import schemas
from .errors import error_response
from .guard import MAX_BODY, REQUEST_TIMEOUT, RequestGuard


def _validation_message(exc: RequestValidationError) -> str:
    """Pydantic's errors as one readable line: where, and what is wrong."""
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"] if p != "body") or "body"
        if err["type"] == "json_invalid":
            return f"the body is not valid JSON ({err.get('ctx', {}).get('error', 'parse error')})"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts[:5]) + (f" (and {len(parts) - 5} more)" if len(parts) > 5 else "")


def create_app(model: SpectrumModel, *, api_key: str | None = None,
               cors_origins: tuple[str, ...] = (), allowed_hosts: tuple[str, ...] | None = (),
               max_body: int = MAX_BODY, timeout: float = REQUEST_TIMEOUT) -> FastAPI:
    """The app over ``model``. ``allowed_hosts``: the Host names accepted besides loopback
    ones (None: any, for a server bound to a network address); see ``guard``."""
    # The page and the docs are served from the package: /docs works offline (no CDN).
    app = FastAPIOffline(
        title="spectrum-local", version=_version(), redoc_url=None,
        description="Spectrum-tuned models: score, sample, top, enumerate; "
                    "OpenAI-compatible completions. Bodies are JSON "
                    "('Content-Type: application/json'). Errors: "
                    "{\"error\": {\"message\", \"type\"}}.",
        middleware=[
            # Outermost first: nothing reaches CORS or a route before the guard's checks.
            Middleware(RequestGuard, allowed_hosts=allowed_hosts, cors_origins=cors_origins,
                       limit=max_body, timeout=timeout),
            *([Middleware(CORSMiddleware, allow_origins=list(cors_origins),
                          allow_methods=["GET", "POST"], allow_headers=["*"])]
              if cors_origins else []),
        ])
    app.state.model = model

    def authorized(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        # Constant-time compare, so the time taken tells nothing about the key.
        if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise HTTPException(401, "missing or wrong API key: send 'Authorization: Bearer KEY'")

    api = [Depends(authorized)]

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request, exc):
        # vLLM answers 400 on its own routes; the native ones say 422 (unknown fields, types).
        status = 422 if request.url.path.startswith("/spectrum/") else 400
        if any(err["type"] == "json_invalid" for err in exc.errors()):
            status = 400  # not JSON at all: a bad request, not a bad field
        return error_response(status, _validation_message(exc))

    @app.exception_handler(HTTPException)
    async def http_error(request, exc):
        return error_response(exc.status_code, str(exc.detail))

    @app.exception_handler(InputError)
    async def input_error(request, exc):
        return error_response(400, str(exc))

    @app.exception_handler(SpectrumError)
    async def model_error(request, exc):
        return error_response(500, str(exc))

    @app.get("/health", include_in_schema=False)
    async def health():
        return {"status": "ok"}

    @app.get("/", include_in_schema=False)
    async def page():
        return HTMLResponse(resources.files(__package__).joinpath("static/index.html").read_text())

    @app.get("/spectrum/v1/info", dependencies=api)
    async def info():
        """What `spectrum-local info --json` prints, plus the prompt format and the load."""
        return {**model.info(), "load": model.engine.load()}

    @app.post("/spectrum/v1/score", dependencies=api)
    async def score(body: schemas.ScoreRequest):
        """P(candidate, then end-of-output | prompt) per candidate; as `score --json`."""
        cands = candidate_specs.resolve(body.candidates)
        if len(cands) > schemas.MAX_CANDIDATES:
            raise InputError(f"{len(cands)} candidates; the limit is {schemas.MAX_CANDIDATES}")
        result = await run_in_threadpool(model.score, _messages(body), cands)
        return _tagged(model, coverage=result.coverage,
                       candidates=[c.to_dict() for c in result.candidates])

    @app.post("/spectrum/v1/top", dependencies=api)
    async def top(body: schemas.TopRequest):
        """The k most likely first output tokens; as `top --json`."""
        tokens = await run_in_threadpool(model.top, _messages(body), body.k, prefix=body.prefix)
        return _tagged(model, tokens=[t.to_dict() for t in tokens])

    @app.post("/spectrum/v1/enumerate", dependencies=api)
    async def enumerate_outputs(body: schemas.EnumerateRequest):
        """The most probable complete outputs with exact probabilities; as `enumerate --json`."""
        options = body.model_dump(exclude={"messages"})
        result = await run_in_threadpool(model.enumerate, _messages(body), **options)
        return _tagged(model, **result.to_dict())

    @app.post("/spectrum/v1/sample", dependencies=api)
    async def sample(body: schemas.SampleRequest, request: Request):
        """n i.i.d. outputs; as `sample --json`, or with "stream": true one server-sent event
        per finished sample, then `data: [DONE]`."""
        options = body.model_dump(exclude={"messages", "stream"})
        if options["max_tokens"] > model.engine.n_ctx:
            raise InputError(f"max_tokens={options['max_tokens']} is more than the context "
                             f"({model.engine.n_ctx} tokens)")
        call = lambda **hooks: model.sample(_messages(body), **options, **hooks)  # noqa: E731
        if body.stream:
            return _stream(request, call, lambda i, s: {"index": i, **s.to_dict()})
        samples = await _cancellable(request, call)
        return _tagged(model, samples=[s.to_dict() for s in samples])

    from .openai import router as openai_router  # the OpenAI/vLLM-compatible routes

    app.include_router(openai_router, dependencies=api)
    return app


def _messages(body) -> list[dict]:
    return [m.model_dump() for m in body.messages]


def _tagged(model: SpectrumModel, **fields) -> dict:
    """The CLI's --json object: the model and format first, then the operation's fields."""
    return {"model": model.path, "format": model.format, **fields}


async def _cancellable(request: Request, call: Callable[..., Any]):
    """Run ``call(cancel=event)`` in a worker thread; see ``until_done``."""
    cancel = threading.Event()
    return await until_done(request, run_in_threadpool(call, cancel=cancel), cancel)


async def until_done(request: Request, work: Awaitable, cancel: threading.Event):
    """Await ``work``; a client that disconnects meanwhile sets ``cancel``, so its samples
    stop at the next decode step and free their sequences (so does a shutdown past the grace
    period)."""
    task = asyncio.ensure_future(work)
    try:
        while not task.done():
            done, _ = await asyncio.wait({task}, timeout=0.25)
            if not done and await request.is_disconnected():
                cancel.set()
    except asyncio.CancelledError:
        cancel.set()
        raise
    return task.result()


def _stream(request: Request, call: Callable[..., Any], event: Callable[[int, Any], dict]):
    """Server-sent events: ``event(index, sample)`` as each sample finishes, then [DONE]. A
    client that goes away cancels the rest."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    cancel = threading.Event()

    def on_sample(index, sample):
        loop.call_soon_threadsafe(queue.put_nowait, ("sample", index, sample))

    async def run():
        try:
            await run_in_threadpool(call, cancel=cancel, on_sample=on_sample)
            queue.put_nowait(("done", None, None))
        except Exception as e:  # after the headers: report the error as the last event
            queue.put_nowait(("error", None, e))

    async def events():
        task = asyncio.ensure_future(run())
        try:
            while True:
                kind, index, item = await queue.get()
                if kind == "sample":
                    yield f"data: {json.dumps(event(index, item), ensure_ascii=False)}\n\n"
                elif kind == "error":
                    status = 400 if isinstance(item, InputError) else 500
                    body = json.loads(error_response(status, str(item)).body)
                    yield f"data: {json.dumps(body, ensure_ascii=False)}\n\n"
                    break
                else:
                    break
            yield "data: [DONE]\n\n"
        finally:
            cancel.set()  # the client left early (or we are done): stop any sample still running
            await task

    return StreamingResponse(events(), media_type="text/event-stream")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("spectrum-local")
    except PackageNotFoundError:
        return "dev"
