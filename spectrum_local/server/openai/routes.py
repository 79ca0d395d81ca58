"""The OpenAI/vLLM-compatible routes, thin: the request model validates the body (``protocol``),
the plan checks it against the model (``serving``), the engine runs it in worker threads until
done or until the client goes away (``bridge``), and ``responses`` shapes the answer."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from ..bridge import stream, until_done
from .protocol import CompletionRequest, DetokenizeRequest, TokenizeRequest
from .responses import Chunks, response
from .serving import Completion, Vocab, check_model, check_vocabulary, plan

router = APIRouter()


@router.get("/v1/models")
async def show_available_models(request: Request):
    """The loaded model, as vLLM's ModelList."""
    model = request.app.state.model
    now = int(time.time())
    return {"object": "list", "data": [{
        "id": model.path, "object": "model", "created": now, "owned_by": "spectrum-local",
        "root": model.path, "parent": None, "max_model_len": model.engine.n_ctx,
        "permission": [{
            "id": f"modelperm-{uuid.uuid4().hex}", "object": "model_permission", "created": now,
            "allow_create_engine": False, "allow_sampling": True, "allow_logprobs": True,
            "allow_search_indices": False, "allow_view": True, "allow_fine_tuning": False,
            "organization": "*", "group": None, "is_blocking": False}],
    }]}


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: Request):
    """Text to token ids as /v1/completions reads a text prompt: control tokens written in the
    text are parsed, and ``add_special_tokens`` adds the model's BOS."""
    model = request.app.state.model
    check_model(model, body.model)
    engine = model.engine
    tokens = await run_in_threadpool(engine.tokenize, body.prompt, special=True,
                                     bos=body.add_special_tokens)
    token_strs = None
    if body.return_token_strs:
        vocab = Vocab(engine)
        token_strs = [vocab.text(t) for t in tokens]
    return {"count": len(tokens), "max_model_len": engine.n_ctx, "tokens": tokens,
            "token_strs": token_strs}


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request):
    """Token ids to text, control tokens written as their markers (HF ``decode``)."""
    model = request.app.state.model
    check_model(model, body.model)
    check_vocabulary(model.engine, body.tokens)
    text = await run_in_threadpool(model.engine.detokenize, body.tokens, special=True)
    return {"prompt": text}


@router.post("/v1/completions")
async def create_completion(body: CompletionRequest, request: Request):
    """Completions as vLLM serves them (prompt as text or token ids, n, max_tokens, sampling,
    stop, stop_token_ids, logprobs, echo, prompt_logprobs, stream)."""
    model = request.app.state.model
    completion = Completion(model, await plan(model, body))
    request_id = f"cmpl-{request.headers.get('x-request-id') or uuid.uuid4().hex}"
    created = int(time.time())
    if body.stream:
        chunks = Chunks(completion, request_id, created)

        async def work(emit, cancel):
            chunks.prompt_positions = await completion.prompt_positions(cancel)
            await completion.run(cancel, lambda *posted: emit(chunks.post(*posted)))
            if chunks.include_usage:
                emit(None)

        return stream(request, work,
                      lambda item: chunks.usage() if item is None else chunks.chunk(*item))

    async def run_all(cancel: threading.Event):
        found = await asyncio.gather(completion.prompt_positions(cancel), completion.run(cancel))
        return found[0]

    cancel = threading.Event()
    prompt_positions = await until_done(request, run_all(cancel), cancel)
    # A response with logprobs can be large: build and serialise it off the event loop.
    return await run_in_threadpool(
        lambda: JSONResponse(response(completion, prompt_positions, request_id, created)))
