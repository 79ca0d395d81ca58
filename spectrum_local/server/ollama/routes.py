"""The Ollama API's routes, as thin as the OpenAI ones: the request model validates the body
(``protocol``), the plan is the chat route's (``openai.serving``) in spectrum's roles, and the
answer is Ollama's: one JSON object, or NDJSON lines as the tokens come (the default). The
model's id is the served name, with or without Ollama's ``:latest`` tag."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from datetime import datetime, timezone

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from ..bridge import stream, until_done
from ..errors import APIError
from ..openai.logprobs import output_positions
from ..openai.serving import Completion, Plan, reply_plan
from .protocol import ChatRequest, GenerateRequest, ShowRequest

router = APIRouter(prefix="/api")
OLLAMA_VERSION = "0.13.0"  # the Ollama API this server speaks (logprobs came in 0.12.11)
TAG = ":latest"


@router.get("/version")
async def version():
    return {"version": OLLAMA_VERSION}


@router.get("/tags")
async def tags(request: Request):
    """The one model this server has loaded."""
    return {"models": [_card(request.app.state)]}


@router.get("/ps")
async def running(request: Request):
    """The loaded model: it stays loaded as long as the server runs."""
    state = request.app.state
    card = _card(state)
    card.pop("modified_at")
    return {"models": [{**card, "expires_at": "9999-12-31T23:59:59Z", "size_vram": 0,
                        "context_length": state.model.engine.n_ctx}]}


@router.post("/show")
async def show(body: ShowRequest, request: Request):
    state = request.app.state
    _check_model(state, body.model or body.name)
    facts = state.model.engine.describe()
    arch = facts["architecture"]
    card = _card(state)
    return {"license": "", "modelfile": f"# served by spectrum-local as {card['name']}\n",
            "parameters": "", "template": state.model.info()["prompt_format"]["chat_template"],
            "details": card["details"], "capabilities": ["completion"],
            "model_info": {"general.architecture": arch,
                           "general.parameter_count": facts["parameters"],
                           f"{arch}.context_length": facts["context_trained"]},
            "modified_at": card["modified_at"]}


@router.post("/generate")
async def generate(body: GenerateRequest, request: Request):
    """A sample of the output turn after ``system`` (the description) and ``prompt`` (an
    input); with ``raw``, ``prompt`` is the whole prompt (control tokens written as markers
    are control tokens, the model's BOS is added). No prompt: the model is loaded (it is)."""
    state = request.app.state
    _check_model(state, body.model)
    if not body.prompt and not body.system:
        return _head(state) | {"response": "", "done": True, "done_reason": "load"}
    if body.raw:
        tokens = await run_in_threadpool(state.model.engine.tokenize, body.prompt,
                                         special=True, bos=True)
    else:
        tokens = await run_in_threadpool(state.model.prompt_tokens, body.spectrum_messages())
    return await _answer(request, body, tokens, lambda text: {"response": text})


@router.post("/chat")
async def chat(body: ChatRequest, request: Request):
    """A sample of the next output turn: system is the description, user messages are
    inputs, assistant messages are outputs (a final one is continued). No messages: the
    model is loaded (it is)."""
    state = request.app.state
    _check_model(state, body.model)
    if not body.messages:
        return _head(state) | {"message": {"role": "assistant", "content": ""}, "done": True,
                               "done_reason": "load"}
    messages, prefix = body.spectrum_messages()
    tokens = await run_in_threadpool(state.model.prompt_tokens, messages, prefix)
    return await _answer(request, body, tokens,
                         lambda text: {"message": {"role": "assistant", "content": text}})


@router.api_route("/{action}", methods=["POST", "DELETE"])
async def refused(action: str, request: Request):
    """Pulling, pushing, copying, creating and deleting models, and embeddings: refused."""
    name = request.app.state.model_name
    if action in ("pull", "push", "copy", "create", "delete"):
        raise APIError(f"spectrum-local serves one model file ({name}) and does not {action} "
                       "models: start `spectrum-local serve --model FILE` with another file")
    if action in ("embed", "embeddings"):
        raise APIError("spectrum-local does not compute embeddings")
    raise APIError(f"no such endpoint: /api/{action}", status=404)


# -- the answer ---------------------------------------------------------------------------------


async def _answer(request: Request, body, tokens: list[int], content):
    """Generate one sample for ``body`` and answer in Ollama's shape, ``content(text)`` giving
    the dialect's field (``response`` or ``message``); streamed as NDJSON unless
    ``stream`` is false."""
    state = request.app.state
    plan = _plan(state, body, tokens)
    completion = Completion(state.model, plan, _tagged(state))
    clock = _Clock()
    if body.streams:
        async def work(emit, cancel):
            def posted(p, j, new_tokens, steps, output):  # on the engine's thread, in order
                clock.step()
                emit((steps, output.delta()))
            await completion.run(cancel, posted)
            emit(None)

        previous: list[int] = []  # the last token streamed, for the UTF-8 repair of the next

        def render(item) -> dict | None:
            if item is None:
                return _final(state, completion, clock, content)
            steps, text = item
            if not steps and not text:
                return None
            line = _head(state) | content(text) | {"done": False}
            if plan.logprobs is not None:
                line["logprobs"] = _logprobs(completion.vocab, steps, plan.logprobs, previous)
                if steps:
                    previous[:] = [steps[-1].token]
            return line

        return stream(request, work, render, lines=True)

    cancel = threading.Event()
    await until_done(request, completion.run(cancel, lambda *item: clock.step()), cancel)
    output = completion.outputs[0][0]
    answer = _final(state, completion, clock, content)
    answer.update(content(output.text))
    if plan.logprobs is not None:
        answer["logprobs"] = _logprobs(completion.vocab, output.steps, plan.logprobs, [])
    return answer


def _plan(state, body, tokens: list[int]) -> Plan:
    options, engine = body.options, state.model.engine
    if options.num_ctx is not None and options.num_ctx > engine.n_ctx:
        raise APIError(f"num_ctx {options.num_ctx} is more than the loaded context "
                       f"({engine.n_ctx} tokens): restart spectrum-local serve with --ctx "
                       f"{options.num_ctx}", "options.num_ctx")
    return reply_plan(state.model, body, tokens, 1, options.sampler_settings(engine.n_vocab),
                      options.sampling_seed, options.max_tokens, body.wanted_logprobs,
                      stops=options.stop or ())


def _logprobs(vocab, steps, k: int, previous: list[int]) -> list[dict]:
    """Ollama's logprobs: per generated token its text, logprob and UTF-8 bytes, and the k
    most likely tokens at its position, most likely first (``previous``: the token before
    the first step, if any, for the repair of a split character)."""
    found = []
    for step, position in zip(steps, output_positions(vocab, steps, previous[-1:])):
        logprob, _, text = position[step.token]
        top = sorted((rank, t) for t, (_, rank, _) in position.items() if rank is not None)
        found.append({**_entry(text, logprob), "top_logprobs": [
            _entry(position[t][2], position[t][0]) for _, t in top[:k]]})
    return found


def _entry(text: str, logprob: float) -> dict:
    return {"token": text, "logprob": max(logprob, -9999.0),
            "bytes": list(text.encode("utf-8", errors="replace"))}


def _final(state, completion: Completion, clock: "_Clock", content) -> dict:
    """The last object: done, why, and Ollama's counts and durations (nanoseconds)."""
    output = completion.outputs[0][0]
    end = time.perf_counter_ns()
    first = clock.first or end
    reason = output.finish_reason if output.finish_reason in ("stop", "length") else "stop"
    return _head(state) | content("") | {
        "done": True, "done_reason": reason, "total_duration": end - clock.start,
        "load_duration": 0, "prompt_eval_count": len(completion.plan.prompts[0].tokens),
        "prompt_eval_duration": first - clock.start, "eval_count": len(output.tokens),
        "eval_duration": end - first}


class _Clock:
    """When the request started and when its first token came (Ollama's durations)."""

    def __init__(self):
        self.start, self.first = time.perf_counter_ns(), None

    def step(self) -> None:
        if self.first is None:
            self.first = time.perf_counter_ns()


# -- the model ----------------------------------------------------------------------------------


def _tagged(state) -> str:
    return state.model_name + TAG


def _head(state) -> dict:
    return {"model": _tagged(state),
            "created_at": datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")}


def _check_model(state, name: str) -> None:
    """The served name, with or without ``:latest``, or the file name; none: the loaded one."""
    if name and name.removesuffix(TAG) not in (state.model_name,
                                               os.path.basename(state.model.path)):
        raise APIError(f"model '{name}' not found: this server serves {_tagged(state)}",
                       "model", 404)


def _card(state) -> dict:
    """The model as /api/tags lists it. Its digest names the file (its name, size and time),
    it is not the file's hash: hashing gigabytes at every start would be slow."""
    facts = state.model.engine.describe()
    stat = os.stat(state.model.path)
    name = _tagged(state)
    digest = hashlib.sha256(f"{name}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()
    # llama.cpp's description: "<arch> <size> <file type>", e.g. "gemma3 270M Q4_K - Medium"
    level = facts["description"].split(" ", 2)[-1].removeprefix("all ")
    for long, short in ((" - Medium", "_M"), (" - Small", "_S"), (" - Large", "_L")):
        level = level.replace(long, short)
    n = facts["parameters"]
    size = f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"
    return {"name": name, "model": name, "size": stat.st_size, "digest": digest,
            "modified_at": datetime.fromtimestamp(stat.st_mtime, timezone.utc).isoformat(),
            "details": {"parent_model": "", "format": "gguf", "family": facts["architecture"],
                        "families": [facts["architecture"]], "parameter_size": size,
                        "quantization_level": level}}
