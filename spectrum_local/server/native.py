"""The native routes, ``/spectrum/v1/*``: one per operation, as thin as the CLI's commands. The
request model validates the body; the Python API (``SpectrumModel``) runs in a worker thread
and stops when the client goes away (``bridge``); the answer is the CLI's ``--json`` object.
Also ``/health`` and the page at ``/``, which need no key."""

from __future__ import annotations

import os
from importlib import resources

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse
from starlette.concurrency import run_in_threadpool

from ..errors import InputError
from . import schemas
from .bridge import call, stream

router = APIRouter(prefix="/spectrum/v1")
public = APIRouter(include_in_schema=False)


@public.get("/health")
async def health():
    return {"status": "ok"}


@public.get("/")
async def page():
    return HTMLResponse(resources.files(__package__).joinpath("static/index.html").read_text())


@router.get("/info")
async def info(request: Request):
    """What `spectrum-local info --json` prints, plus the prompt format and the load. The
    model is its served name; local paths (the file, adapters) only to a server's owner: one
    started with an API key, whose requests carry it."""
    state = request.app.state
    found = {**state.model.info(), "model": state.model_name, "load": state.model.engine.load()}
    if state.owner_key:
        found["path"] = state.model.path
    else:
        found["lora"] = [{**a, "path": os.path.basename(a["path"])} for a in found["lora"]]
    return found


@router.post("/score")
async def score(body: schemas.ScoreRequest, request: Request):
    """P(candidate, then end-of-output | prompt) per candidate; as `score --json`."""
    model = request.app.state.model
    result = await call(request, model.score, body.message_list(), **body.options())
    return _tagged(request, coverage=result.coverage,
                   candidates=[c.to_dict() for c in result.candidates])


@router.post("/top")
async def top(body: schemas.TopRequest, request: Request):
    """The k most likely first output tokens; as `top --json`."""
    model = request.app.state.model
    tokens = await call(request, model.top, body.message_list(), **body.options())
    return _tagged(request, tokens=[t.to_dict() for t in tokens])


@router.post("/enumerate")
async def enumerate_outputs(body: schemas.EnumerateRequest, request: Request):
    """The most probable complete outputs with exact probabilities; as `enumerate --json`."""
    model = request.app.state.model
    result = await call(request, model.enumerate, body.message_list(), **body.options())
    return _tagged(request, **result.to_dict())


@router.post("/sample")
async def sample(body: schemas.SampleRequest, request: Request):
    """n i.i.d. outputs; as `sample --json`, or with "stream": true one server-sent event
    per finished sample, then `data: [DONE]`."""
    model = request.app.state.model
    options = body.options()
    if options["max_tokens"] > model.engine.n_ctx:
        raise InputError(f"max_tokens={options['max_tokens']} is more than the context "
                         f"({model.engine.n_ctx} tokens)")
    if body.stream:
        async def work(emit, cancel):
            def on_sample(index, sample):
                emit({"index": index, **sample.to_dict()})
            await run_in_threadpool(model.sample, body.message_list(), **options,
                                    cancel=cancel, on_sample=on_sample)
        return stream(request, work, lambda event: event)
    samples = await call(request, model.sample, body.message_list(), **options)
    return _tagged(request, samples=[s.to_dict() for s in samples])


def _tagged(request: Request, **fields) -> dict:
    """The CLI's --json object: the model and format first, then the operation's fields."""
    model = request.app.state.model
    return {"model": request.app.state.model_name, "format": model.format, **fields}
