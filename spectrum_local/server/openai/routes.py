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
from .protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest,
                       TokenizeRequest)
from .responses import ChatChunks, Chunks, chat_response, response
from .serving import Completion, Vocab, chat_plan, check_model, check_vocabulary, plan

router = APIRouter()


@router.get("/v1/models")
async def show_available_models(request: Request):
    """The loaded model under its served name, as vLLM's ModelList."""
    state = request.app.state
    now = int(time.time())
    return {"object": "list", "data": [{
        "id": state.model_name, "object": "model", "created": now, "owned_by": "spectrum-local",
        "root": state.model_name, "parent": None, "max_model_len": state.model.engine.n_ctx,
        "permission": [{
            "id": f"modelperm-{uuid.uuid4().hex}", "object": "model_permission", "created": now,
            "allow_create_engine": False, "allow_sampling": True, "allow_logprobs": True,
            "allow_search_indices": False, "allow_view": True, "allow_fine_tuning": False,
            "organization": "*", "group": None, "is_blocking": False}],
    }]}


@router.get("/tokenizer_info")
async def tokenizer_info(request: Request):
    """vLLM's /tokenizer_info (what lm-eval's remote tokenizer reads): the special tokens as
    text (the end of an output turn as ``eos_token``), the prompt template, the context."""
    model = request.app.state.model
    engine = model.engine
    bos = engine.tokenize("", special=True, bos=True)
    prompt_format = model.info()["prompt_format"]
    return {"tokenizer_class": "GGUFTokenizer", "model_max_length": engine.n_ctx,
            "add_bos_token": bool(bos),
            "bos_token": engine.token_text(bos[0]) if bos else None,
            "eos_token": prompt_format["end_of_output"], "pad_token": None,
            "chat_template": prompt_format["chat_template"]}


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: Request):
    """Text to token ids as /v1/completions reads a text prompt: control tokens written in the
    text are parsed, and ``add_special_tokens`` adds the model's BOS."""
    check_model(request.app.state, body.model)
    engine = request.app.state.model.engine
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
    engine = request.app.state.model.engine
    check_model(request.app.state, body.model)
    check_vocabulary(engine, body.tokens)
    text = await run_in_threadpool(engine.detokenize, body.tokens, special=True)
    return {"prompt": text}


@router.post("/v1/completions")
async def create_completion(body: CompletionRequest, request: Request):
    """Completions as vLLM serves them (prompt as text or token ids, n, max_tokens, sampling,
    stop, stop_token_ids, logprobs, echo, prompt_logprobs, stream)."""
    state = request.app.state
    completion = Completion(state.model, await plan(state, body), state.model_name)
    request_id, created = _named(request, "cmpl")
    if body.stream:
        chunks = Chunks(completion, request_id, created)

        async def start(emit, cancel):
            chunks.prompt_positions = await completion.prompt_positions(cancel)

        return _stream(request, completion, chunks, start)

    async def run_all(cancel: threading.Event):
        found = await asyncio.gather(completion.prompt_positions(cancel), completion.run(cancel))
        return found[0]

    cancel = threading.Event()
    prompt_positions = await until_done(request, run_all(cancel), cancel)
    # A response with logprobs can be large: build and serialise it off the event loop.
    return await run_in_threadpool(
        lambda: JSONResponse(response(completion, prompt_positions, request_id, created)))


@router.post("/v1/chat/completions")
async def create_chat_completion(body: ChatCompletionRequest, request: Request):
    """Chat completions as vLLM serves them, in spectrum's roles: system (or developer) is the
    description, user messages are inputs, assistant messages are outputs; the reply is a
    sample of the next output turn (or continues a final assistant message)."""
    state = request.app.state
    completion = Completion(state.model, await chat_plan(state, body), state.model_name)
    request_id, created = _named(request, "chatcmpl")
    if body.stream:
        chunks = ChatChunks(completion, request_id, created)

        async def start(emit, cancel):
            for j in range(body.n):
                emit(j)  # the role chunks first

        return _stream(request, completion, chunks, start)
    cancel = threading.Event()
    await until_done(request, completion.run(cancel), cancel)
    return await run_in_threadpool(
        lambda: JSONResponse(chat_response(completion, request_id, created)))


def _named(request: Request, kind: str) -> tuple[str, int]:
    """The answer's id (the client's X-Request-Id if it sent one) and its creation time."""
    return f"{kind}-{request.headers.get('x-request-id') or uuid.uuid4().hex}", int(time.time())


def _stream(request: Request, completion: Completion, chunks: Chunks, start):
    """A completion's chunks as server-sent events: ``start``'s, then one per generated token
    per choice, then the usage chunk if asked for. An int posted is a chat role chunk."""

    async def work(emit, cancel):
        await start(emit, cancel)
        await completion.run(cancel, lambda *posted: emit(chunks.post(*posted)))
        if chunks.include_usage:
            emit(None)

    def render(item) -> dict:
        if item is None:
            return chunks.usage()
        return chunks.role(item) if isinstance(item, int) else chunks.chunk(*item)

    return stream(request, work, render)
