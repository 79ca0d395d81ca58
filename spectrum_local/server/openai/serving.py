"""The OpenAI-compatible routes, as vLLM serves them: ``POST /v1/completions``, ``GET /v1/models``,
``POST /tokenize`` and ``POST /detokenize``.

A client written for a vLLM server works against this one unchanged: the request fields, the
response shapes, the streaming chunks, the error bodies and their wording follow vLLM's own
sources (vllm/entrypoints/openai/completion/{protocol,serving}.py, .../engine/protocol.py,
vllm/entrypoints/serve/tokenize/, vllm/sampling_params.py, vllm/logprobs.py,
vllm/v1/engine/logprobs.py, vllm/renderers/params.py). Where this server differs, it says so:

- Sampling defaults are untruncated (temperature 1, top_p 1, top_k off, min_p 0): exactly the
  model's distribution, which is what a spectrum-tuned model is for. (vLLM takes defaults from
  the model's generation_config.json; a GGUF has none.)
- The model id is ``model.path``, the file the server loaded (vLLM: the --model argument); its
  file name alone is accepted as an alias, like a second --served-model-name. Any other
  non-empty ``model`` is a 404, as in vLLM; an absent or empty one means the loaded model.
- vLLM options this server cannot honour (beam search, penalties other than
  repetition_penalty, logit_bias, structured outputs, ...) are a 400 naming the option when set
  to anything but their default, rather than silently ignored. Unknown fields are ignored.
- ``repetition_penalty`` maps to llama.cpp's repeat penalty (over the last 64 tokens).
- Limits of a shared local service: n × prompts <= schemas.MAX_N (vLLM: 16384); logprobs and
  prompt_logprobs <= 20 (vLLM's default --max-logprobs, same message). ``owned_by`` is
  "spectrum-local".
- As in vLLM, a stop token (the model's end-of-generation tokens, stop_token_ids) counts in
  token_ids, usage and logprobs but not in the text; its stop_reason is its id when it came
  from stop_token_ids, else None.
- A token's text in ``logprobs`` is its piece as llama.cpp spells it (control tokens as their
  marker, as HF ``decode([id])`` does); /tokenize's ``token_strs`` are those pieces too (vLLM:
  the raw vocabulary entries, e.g. "▁Hello").

All model work goes through ``model.engine`` (the scheduler) in worker threads; the callbacks
``on_step``/``on_done`` run on the engine's thread and only do bookkeeping.
"""

from __future__ import annotations

import asyncio
import codecs
import json
import math
import os
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Annotated, Any, Sequence

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from ..backend import SamplerSettings
from ..errors import InputError
from .app import until_done
from .schemas import MAX_N

router = APIRouter()

MAX_LOGPROBS = 20  # vLLM's default --max-logprobs
MAX_SEQUENCES = MAX_N  # n × prompts per request, as n on the native routes
MAX_PROMPTS = 256
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_SAMPLING_EPS = 1e-5  # vLLM: a temperature below this is greedy
_MIN_TEMPERATURE = 1e-2  # vLLM raises smaller positive temperatures to this


# -- request bodies (vLLM's field names and defaults; unknown fields ignored) ----------------


class _OpenAIModel(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_OpenAIModel):
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False


TokenId = Annotated[int, Field(ge=0)]


class CompletionRequest(_OpenAIModel):
    model: str | None = None
    prompt: list[TokenId] | list[list[TokenId]] | str | list[str] | None = None
    echo: bool | None = False
    logprobs: int | None = None
    max_tokens: int | None = 16
    n: int = 1
    seed: int | None = Field(None, ge=_INT64_MIN, le=_INT64_MAX)
    stop: str | list[str] | None = []
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    stop_token_ids: list[int] | None = []
    include_stop_str_in_output: bool = False
    prompt_logprobs: int | None = None
    add_special_tokens: bool = True
    return_tokens_as_token_ids: bool | None = None
    return_token_ids: bool | None = None
    # vLLM options this server does not implement: a 400 unless left at their default.
    suffix: str | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    use_beam_search: bool = False
    min_tokens: int = 0
    ignore_eos: bool = False
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    logprob_token_ids: list[int] | None = None
    prompt_embeds: Any = None
    response_format: Any = None
    structured_outputs: Any = None
    truncate_prompt_tokens: int | None = None


_UNSUPPORTED = {  # field -> its default (vLLM's), anything else is refused
    "suffix": (None, ""), "frequency_penalty": (None, 0.0), "presence_penalty": (None, 0.0),
    "logit_bias": (None, {}), "use_beam_search": (False,), "min_tokens": (0,),
    "ignore_eos": (False,), "allowed_token_ids": (None,), "bad_words": (None, []),
    "logprob_token_ids": (None,), "prompt_embeds": (None,), "structured_outputs": (None,),
    "truncate_prompt_tokens": (None,),
}


class TokenizeRequest(_OpenAIModel):
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool | None = False


class DetokenizeRequest(_OpenAIModel):
    model: str | None = None
    tokens: list[Annotated[int, Field(ge=0, le=_INT64_MAX)]]


# -- errors ------------------------------------------------------------------------------------


class OpenAIError(Exception):
    """An error answered in vLLM's shape, with its status and the parameter at fault."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 kind: str = "BadRequestError"):
        super().__init__(message)
        self.message, self.param, self.status, self.kind = message, param, status, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": self.status}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def _check_model(model, name: str | None) -> None:
    """vLLM's _check_model: no name or the served name; anything else is a 404."""
    if not name or name in _model_names(model):
        return
    raise OpenAIError(f"The model `{name}` does not exist.", "model", 404, "NotFoundError")


def _model_names(model) -> tuple[str, str]:
    return model.path, os.path.basename(model.path)


# -- GET /v1/models ------------------------------------------------------------------------------


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


# -- POST /tokenize, /detokenize ---------------------------------------------------------------


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: Request):
    """Text to token ids as /v1/completions reads a text prompt: control tokens written in the
    text are parsed, and ``add_special_tokens`` adds the model's BOS."""
    model = request.app.state.model
    try:
        _check_model(model, body.model)
    except OpenAIError as e:
        return e.response()
    engine = model.engine
    tokens = await run_in_threadpool(engine.tokenize, body.prompt, special=True,
                                     bos=body.add_special_tokens)
    token_strs = None
    if body.return_token_strs:
        vocab = _Vocab(engine)
        token_strs = [vocab.text(t) for t in tokens]
    return {"count": len(tokens), "max_model_len": engine.n_ctx, "tokens": tokens,
            "token_strs": token_strs}


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request):
    """Token ids to text, control tokens written as their markers (HF ``decode``)."""
    model = request.app.state.model
    try:
        _check_model(model, body.model)
        _check_vocabulary(model.engine, body.tokens)
    except OpenAIError as e:
        return e.response()
    text = await run_in_threadpool(model.engine.detokenize, body.tokens, special=True)
    return {"prompt": text}


def _check_vocabulary(engine, tokens: Sequence[int]) -> None:
    if tokens and max(tokens) >= engine.n_vocab:
        raise OpenAIError(f"Token id {max(tokens)} is out of vocabulary", "prompt")


# -- POST /v1/completions ----------------------------------------------------------------------


@dataclass
class _Prompt:
    tokens: list[int]
    text: str  # what echo prepends: the text as sent, or the token ids decoded


@dataclass
class _Plan:
    """A validated completion request, in the engine's terms."""

    prompts: list[_Prompt]
    n: int
    max_tokens: int  # as requested (0: echo only)
    gen_tokens: int  # what the engine generates (vLLM generates one token for echo only)
    settings: SamplerSettings
    seed: int | None
    stops: list[str]
    stop_ids: set[int]
    logprobs: int | None
    prompt_logprobs: int | None  # top-k per prompt position, or None: not computed


@router.post("/v1/completions")
async def create_completion(body: CompletionRequest, request: Request):
    """Completions as vLLM serves them (prompt as text or token ids, n, max_tokens, sampling,
    stop, stop_token_ids, logprobs, echo, prompt_logprobs, stream)."""
    model = request.app.state.model
    try:
        plan = await _plan(model, body)
    except OpenAIError as e:
        return e.response()
    request_id = f"cmpl-{request.headers.get('x-request-id') or uuid.uuid4().hex}"
    created = int(time.time())
    if body.stream:
        return StreamingResponse(_stream(request, model, body, plan, request_id, created),
                                 media_type="text/event-stream")
    cancel = threading.Event()
    vocab = _Vocab(model.engine)
    outputs = _new_outputs(vocab, body, plan)
    prompt_positions = await until_done(request, _run_all(model, vocab, plan, outputs, cancel),
                                        cancel)
    # A response with logprobs can be large: build and serialise it off the event loop.
    return await run_in_threadpool(
        lambda: JSONResponse(_response(model, vocab, body, plan, outputs, prompt_positions,
                                       request_id, created)))


async def _plan(model, body: CompletionRequest) -> _Plan:
    """Validate ``body`` as vLLM does (same checks, same messages) and tokenise its prompts."""
    engine = model.engine
    fields = body.model_fields_set
    for name, defaults in _UNSUPPORTED.items():
        if name in fields and getattr(body, name) not in defaults:
            raise OpenAIError(f"`{name}` is not supported by this server (spectrum-local)", name)
    if body.response_format is not None and (not isinstance(body.response_format, dict) or
                                             body.response_format.get("type") != "text"):
        raise OpenAIError("`response_format` is not supported by this server (spectrum-local)",
                          "response_format")
    # CompletionRequest's validators
    for name in ("prompt_logprobs", "logprobs"):
        value = getattr(body, name)
        if value is not None and value < 0 and value != -1:
            raise OpenAIError(f"`{name}` must be a positive value or -1.", name)
    if body.prompt_logprobs is not None and body.stream and \
            (body.prompt_logprobs > 0 or body.prompt_logprobs == -1):
        raise OpenAIError("`prompt_logprobs` are not available when `stream=True`.",
                          "prompt_logprobs")
    if body.stream_options and not body.stream:
        raise OpenAIError("Stream options can only be defined when `stream=True`.",
                          "stream_options")
    prompt = body.prompt
    if prompt is None or prompt == "" or prompt == []:
        raise OpenAIError("Either prompt or prompt_embeds must be provided and non-empty.",
                          "prompt")
    _check_model(model, body.model)

    # SamplingParams._verify_args
    n = body.n
    if n < 1:
        raise OpenAIError(f"n must be at least 1, got {n}.", "n")
    if n > MAX_SEQUENCES:
        raise OpenAIError(f"n must be at most {MAX_SEQUENCES}, got {n}.", "n")
    temperature = 1.0 if body.temperature is None else body.temperature
    top_p = 1.0 if body.top_p is None else body.top_p
    top_k = 0 if body.top_k is None else body.top_k
    min_p = 0.0 if body.min_p is None else body.min_p
    penalty = 1.0 if body.repetition_penalty is None else body.repetition_penalty
    if not math.isfinite(penalty) or penalty <= 0:
        raise OpenAIError(f"repetition_penalty must be greater than zero, got {penalty}.",
                          "repetition_penalty")
    if not math.isfinite(temperature):
        raise OpenAIError(f"temperature must be a finite number, got {temperature}.",
                          "temperature")
    if temperature < 0:
        raise OpenAIError(f"temperature must be non-negative, got {temperature}.", "temperature")
    if not 0.0 < top_p <= 1.0:
        raise OpenAIError(f"top_p must be in (0, 1], got {top_p}.", "top_p")
    if top_k < -1:
        raise OpenAIError(f"top_k must be 0 (disable), or at least 1, got {top_k}.", "top_k")
    if not 0.0 <= min_p <= 1.0:
        raise OpenAIError(f"min_p must be in [0, 1], got {min_p}.", "min_p")
    max_tokens = 16 if body.max_tokens is None else body.max_tokens
    echo_only = bool(body.echo) and max_tokens == 0
    if max_tokens < 1 and not echo_only:
        raise OpenAIError(f"max_tokens must be at least 1, got {max_tokens}.", "max_tokens")
    if max_tokens > engine.n_ctx:
        raise OpenAIError(f"max_tokens={max_tokens} cannot be greater than "
                          f"max_model_len={engine.n_ctx}. Please request fewer output tokens.",
                          "max_tokens")
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if any(not s for s in stops):
        raise OpenAIError("stop cannot contain an empty string.", "stop")
    stop_ids = list(dict.fromkeys(body.stop_token_ids or []))
    if 0 < temperature < _MIN_TEMPERATURE:
        temperature = _MIN_TEMPERATURE
    if temperature < _SAMPLING_EPS:  # greedy
        temperature, top_p, top_k, min_p = 0.0, 1.0, 0, 0.0
        if n > 1:
            raise OpenAIError(f"n must be 1 when using greedy sampling, got {n}.", "n")
    seed = None if body.seed == -1 else body.seed

    # the engine's limits on logprobs (vLLM's --max-logprobs, 20 by default)
    logprobs = body.logprobs
    prompt_logprobs = body.prompt_logprobs
    if prompt_logprobs is None and body.echo:
        prompt_logprobs = logprobs
    for kind, value, param in (("sample", logprobs, "logprobs"),
                               ("prompt", prompt_logprobs, "prompt_logprobs")):
        wanted = engine.n_vocab if value == -1 else value
        if wanted is not None and wanted > MAX_LOGPROBS:
            raise OpenAIError(f"Requested {kind} logprobs of {wanted}, which is greater than "
                              f"max allowed: {MAX_LOGPROBS}", param)
    if body.stream:
        prompt_logprobs = None if not (body.echo and logprobs is not None) else prompt_logprobs

    # the prompts: text (control tokens parsed, BOS added) or token ids
    if isinstance(prompt, str):
        items: list = [prompt]
    elif prompt and isinstance(prompt[0], int):
        items = [prompt]
    else:
        items = list(prompt)
    if len(items) > MAX_PROMPTS:
        raise OpenAIError(f"prompt list length {len(items)} exceeds the maximum allowed count "
                          f"of {MAX_PROMPTS}.", "prompt")
    if n * len(items) > MAX_SEQUENCES:
        raise OpenAIError(f"n × the number of prompts must be at most {MAX_SEQUENCES}, got "
                          f"{n} × {len(items)}.", "n")
    prompts = []
    for item in items:
        if isinstance(item, str):
            if not item:
                raise OpenAIError("Either prompt or prompt_embeds must be provided and "
                                  "non-empty.", "prompt")
            tokens = await run_in_threadpool(engine.tokenize, item, special=True,
                                             bos=body.add_special_tokens)
            text = item
        else:
            tokens = list(item)
            if not tokens:
                raise OpenAIError("Either prompt or prompt_embeds must be provided and "
                                  "non-empty.", "prompt")
            _check_vocabulary(engine, tokens)
            text = await run_in_threadpool(engine.detokenize, tokens, special=True) \
                if body.echo else ""
        if not tokens:  # e.g. a text that tokenises to nothing
            raise OpenAIError("The prompt is empty after tokenization.", "prompt")
        # TokenizeParams: the prompt and the requested tokens must fit the context together
        room = engine.n_ctx - max(max_tokens, 1)  # echo only still generates one token
        if len(tokens) > room:
            raise OpenAIError(
                f"You passed {len(tokens)} input tokens and requested {max_tokens} output "
                f"tokens. However, the model's context length is only {engine.n_ctx} tokens, "
                f"resulting in a maximum input length of {room} tokens. Please reduce the "
                "length of the input prompt.", "input_tokens")
        prompts.append(_Prompt(tokens, text))

    settings = SamplerSettings(temperature, min(top_k, engine.n_vocab) if top_k > 0 else 0,
                               top_p, min_p, penalty)
    return _Plan(prompts, n, max_tokens, 1 if echo_only else max_tokens, settings, seed, stops,
                 set(stop_ids), None if logprobs is None else
                 (engine.n_vocab if logprobs == -1 else logprobs),
                 None if prompt_logprobs is None else
                 (engine.n_vocab if prompt_logprobs == -1 else prompt_logprobs))


# -- one choice's output, built as its tokens come ---------------------------------------------


class _Output:
    """One sample's tokens, steps and text, with vLLM's stop-string rules: the text is cut
    before a stop string (after it with include_stop_str_in_output), and while streaming the
    last len(longest stop) - 1 characters are held back until it is known they do not start
    one. Updated on the engine's thread (``on_step``/``on_done``)."""

    def __init__(self, piece, stops: list[str], include_stop: bool, stop_ids: set[int],
                 max_tokens: int):
        self.piece, self.stops, self.include_stop = piece, stops, include_stop
        self.stop_ids, self.max_tokens = stop_ids, max_tokens
        self.hold = max(map(len, stops)) - 1 if stops and not include_stop else 0
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self.text = ""
        self.sent = 0  # characters of text already streamed
        self.tokens: list[int] = []  # generated, with the stop token when one ended it
        self.steps: list = []  # engine Steps of those tokens (the stop token's when known)
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.reported = False  # streaming: the chunk with its finish_reason has been made

    def on_step(self, step) -> str | None:
        """A generated token; the finish reason if it ends the sample (a stop string: "stop",
        max_tokens reached: "length"), else None."""
        self.tokens.append(step.token)
        self.steps.append(step)
        new = self._decoder.decode(self.piece(step.token))
        if new:
            self.text += new
            self._check_stops(len(new))
        if self.finish_reason is None and len(self.tokens) >= self.max_tokens:
            self._finish("length")
        return self.finish_reason

    def _check_stops(self, new_chars: int) -> None:
        # vLLM's check_stop_strings: look where the new characters could complete a stop string
        for stop in self.stops:
            at = self.text.find(stop, max(0, len(self.text) + 1 - new_chars - len(stop)))
            if at < 0:
                continue
            if self.include_stop:
                at += len(stop)
            self.text = self.text[:at]
            self.finish_reason, self.stop_reason = "stop", stop
            return

    def on_done(self, generation) -> None:
        """The engine finished this sample: by a stop token (not in ``tokens`` yet), by our
        own on_step's reason, at max_tokens, or aborted."""
        if generation.stop_token is not None:
            self.tokens.append(generation.stop_token)
            step = generation.stop_step
            if step is not None:
                self.steps.append(step)
            token = generation.stop_token
            self._finish("stop", token if token in self.stop_ids else None)
        elif self.finish_reason is None:
            self._finish(generation.finish_reason)

    def _finish(self, reason: str, stop_reason=None) -> None:
        # The bytes of a character the last token left unfinished stay out of the text, as
        # vLLM's incremental detokenizer leaves them out.
        self.finish_reason, self.stop_reason = reason, stop_reason

    def delta(self) -> str:
        """The text not streamed yet that can be (all of it once finished)."""
        upto = len(self.text) if self.finish_reason else len(self.text) - self.hold
        if upto <= self.sent:
            return ""
        piece, self.sent = self.text[self.sent:upto], upto
        return piece


class _Vocab:
    """Token texts, each asked of the engine once per request (the engine is a C call away,
    but a response with logprobs asks for the same tokens many times)."""

    def __init__(self, engine):
        self.engine = engine
        self._pieces: dict[int, bytes] = {}
        self._markers: dict[int, bytes] = {}

    def piece(self, token: int) -> bytes:
        """The token's bytes in output text: control tokens have none."""
        data = self._pieces.get(token)
        if data is None:
            data = self._pieces[token] = self.engine.token_bytes(token, special=False)
        return data

    def _marked(self, token: int) -> bytes:
        data = self._markers.get(token)
        if data is None:
            data = self._markers[token] = self.engine.token_bytes(token, special=True)
        return data

    def text(self, token: int) -> str:
        """The token decoded alone, a control token as its marker (HF ``decode([id])``)."""
        return self._marked(token).decode("utf-8", "replace")

    def decode(self, tokens: Sequence[int]) -> str:
        return b"".join(self._marked(t) for t in tokens).decode("utf-8", "replace")


def _new_outputs(vocab: _Vocab, body, plan: _Plan) -> list[list[_Output]]:
    return [[_Output(vocab.piece, plan.stops, body.include_stop_str_in_output, plan.stop_ids,
                     plan.gen_tokens) for _ in range(plan.n)] for _ in plan.prompts]


async def _run_all(model, vocab: _Vocab, plan: _Plan, outputs, cancel: threading.Event,
                   post=None, prompt_logprobs: bool = True):
    """Generate every prompt's samples into ``outputs`` (and the prompts' logprobs when asked)
    concurrently; return the prompts' logprob positions (or None). ``post(p, j, tokens, steps,
    output)`` is told, on the engine's thread, what each step or finished sample added to
    sample j of prompt p."""
    calls = [run_in_threadpool(_generate, model, plan, p, outputs[p], cancel, post)
             for p in range(len(plan.prompts))]
    if prompt_logprobs:
        calls.append(_prompt_logprobs(model, vocab, plan))
    results = await asyncio.gather(*calls)
    return results[-1] if prompt_logprobs else None


async def _prompt_logprobs(model, vocab: _Vocab, plan: _Plan):
    if plan.prompt_logprobs is None:
        return None
    k = plan.prompt_logprobs

    def read(tokens):
        return _prompt_positions(vocab, model.engine.prompt_logprobs(tokens, k), k)

    return await asyncio.gather(*[run_in_threadpool(read, prompt.tokens)
                                  for prompt in plan.prompts])


def _generate(model, plan: _Plan, p: int, outputs: list[_Output], cancel: threading.Event,
              post) -> None:
    def on_step(step) -> str | None:
        if cancel.is_set():
            return "abort"
        output = outputs[step.index]
        reason = output.on_step(step)
        if post:
            post(p, step.index, [step.token], [step], output)
        return reason

    def on_done(index, generation) -> None:
        output = outputs[index]
        tokens, steps = len(output.tokens), len(output.steps)
        output.on_done(generation)
        if post and not output.reported and output.finish_reason != "abort":
            post(p, index, output.tokens[tokens:], output.steps[steps:], output)

    model.engine.generate(plan.prompts[p].tokens, plan.n, plan.gen_tokens, plan.settings,
                          plan.seed, plan.stop_ids, logprobs=plan.logprobs, on_step=on_step,
                          on_done=on_done, cancel=cancel)


# -- logprobs in vLLM's shapes -----------------------------------------------------------------

# One position: token id -> (logprob, rank or None, decoded token), the position's own token
# first, then the top alternatives (vLLM's dict[int, Logprob]).
Position = dict[int, tuple[float, int | None, str]]


def _decoded_tokens(vocab: _Vocab, ids: list[int], previous: int | None) -> list[str]:
    """Each token decoded alone, with vLLM's repair of a partial UTF-8 character
    (LogprobsProcessor._verify_tokens): decoded with the token before it in the list, or with
    the previous generated token; else ''."""
    texts = [vocab.text(t) for t in ids]
    for i, text in enumerate(texts):
        if not text.endswith("\ufffd"):
            continue
        fixed = ""
        if i > 0 and not (joined := vocab.decode(ids[i - 1:i + 1])).endswith("\ufffd"):
            fixed = joined
        elif previous is not None and not (
                joined := vocab.decode([previous, *(ids[i - 1:i + 1] if i else ids[i:i + 1])])
        ).endswith("\ufffd"):
            fixed = joined
        texts[i] = fixed
    return texts


def _position(vocab: _Vocab, ids, logprobs, ranks, previous) -> Position:
    decoded = _decoded_tokens(vocab, ids, previous)
    position: Position = {}
    for t, lp, rank, text in zip(ids, logprobs, ranks, decoded):
        position[t] = (lp, rank, text)  # a repeated id keeps its place, takes the later values
    return position


def _step_position(vocab: _Vocab, step, previous: int | None) -> Position:
    top = step.top or ()
    return _position(vocab, [step.token] + [t for t, _ in top],
                     [step.logprob] + [lp for _, lp in top],
                     [None] + list(range(1, len(top) + 1)), previous)


def _prompt_positions(vocab: _Vocab, found, k: int) -> list[Position | None]:
    """vLLM's prompt logprobs: None for the first token, then per position the token's
    logprob and rank and the k most likely alternatives (ranks 1..k)."""
    positions: list[Position | None] = [None]
    for p in found:
        top = p.top[:k]
        positions.append(_position(vocab, [p.token] + [t for t, _ in top],
                                   [p.logprob] + [lp for _, lp in top],
                                   [p.rank] + list(range(1, len(top) + 1)), None))
    return positions


def _output_positions(vocab: _Vocab, output: _Output) -> list[Position]:
    positions, previous = [], None
    for step in output.steps:
        positions.append(_step_position(vocab, step, previous))
        previous = step.token
    return positions


def _prompt_logprobs_json(positions: list[Position | None] | None):
    """The choice's prompt_logprobs: [None, {"id": {"logprob", "rank", "decoded_token"}}, ...]
    (-inf as -9999.0, vLLM's clamp_prompt_logprobs)."""
    if positions is None:
        return None
    return [None if p is None else
            {str(t): {"logprob": -9999.0 if lp == -math.inf else lp, "rank": rank,
                      "decoded_token": text}
             for t, (lp, rank, text) in p.items()}
            for p in positions]


def _completion_logprobs(vocab: _Vocab, token_ids: Sequence[int], positions, num: int,
                         as_ids: bool, initial_offset: int = 0) -> dict:
    """vLLM's _create_completion_logprobs: the legacy OpenAI format. A token's text_offset is
    the sum of the lengths of the token strings before it (as vLLM counts)."""
    text_offset, token_logprobs, tokens, top_logprobs = [], [], [], []
    last_len = 0
    for token, position in zip(token_ids, positions):
        if position is None:
            text = f"token_id:{token}" if as_ids else vocab.text(token)
            token_logprobs.append(None)
            top_logprobs.append(None)
        else:
            lp, _, decoded = position[token]
            text = f"token_id:{token}" if as_ids else decoded
            token_logprobs.append(max(lp, -9999.0))
            top_logprobs.append({  # the token itself and the num most likely
                (f"token_id:{t}" if as_ids else d): max(v, -9999.0)
                for i, (t, (v, _, d)) in enumerate(position.items()) if num >= i})
        tokens.append(text)
        text_offset.append(initial_offset if not text_offset else text_offset[-1] + last_len)
        last_len = len(text)
    return {"text_offset": text_offset, "token_logprobs": token_logprobs, "tokens": tokens,
            "top_logprobs": top_logprobs}


# -- the non-streaming response ----------------------------------------------------------------


def _response(model, vocab: _Vocab, body, plan: _Plan, outputs, prompt_positions, request_id,
              created) -> dict:
    """vLLM's request_output_to_completion_response."""
    choices = []
    prompt_tokens = completion_tokens = 0
    for p, prompt in enumerate(plan.prompts):
        positions = None if prompt_positions is None else prompt_positions[p]
        for output in outputs[p]:
            out_positions = None
            if plan.logprobs is not None:
                out_positions = _output_positions(vocab, output)
            prompt_text = "" if body.return_token_ids else prompt.text
            if body.echo and plan.max_tokens == 0:  # the prompt only
                token_ids, logprob_positions, text = prompt.tokens, positions, prompt_text
            elif body.echo:
                token_ids = prompt.tokens + output.tokens
                logprob_positions = None if out_positions is None else positions + out_positions
                text = prompt_text + output.text
            else:
                token_ids, logprob_positions, text = output.tokens, out_positions, output.text
            logprobs = None
            if plan.logprobs is not None:
                logprobs = _completion_logprobs(vocab, token_ids, logprob_positions,
                                                plan.logprobs,
                                                bool(body.return_tokens_as_token_ids))
            choices.append({
                "index": len(choices), "text": text, "logprobs": logprobs,
                "finish_reason": output.finish_reason, "stop_reason": output.stop_reason,
                "token_ids": output.tokens if body.return_token_ids else None,
                "prompt_logprobs": _prompt_logprobs_json(positions),
                "prompt_token_ids": prompt.tokens if body.return_token_ids else None,
            })
            completion_tokens += len(output.tokens)
        prompt_tokens += len(prompt.tokens)
    return {
        "id": request_id, "object": "text_completion", "created": created,
        "model": model.path, "choices": choices, "service_tier": None,
        "system_fingerprint": None,
        "usage": {"prompt_tokens": prompt_tokens,
                  "total_tokens": prompt_tokens + completion_tokens,
                  "completion_tokens": completion_tokens, "prompt_tokens_details": None},
        "kv_transfer_params": None,
    }


# -- streaming ---------------------------------------------------------------------------------


def _stream(request: Request, model, body, plan: _Plan, request_id: str, created: int):
    """vLLM's completion_stream_generator: one chunk per generated token per choice (the one
    that ends it carries finish_reason and stop_reason; with echo, the first also carries the
    prompt), a usage chunk with stream_options.include_usage, then ``data: [DONE]``."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    cancel = threading.Event()
    n, as_ids = plan.n, bool(body.return_tokens_as_token_ids)
    options = body.stream_options
    include_usage = bool(options and options.include_usage)
    continuous_usage = include_usage and bool(options.continuous_usage_stats)
    vocab = _Vocab(model.engine)
    outputs = _new_outputs(vocab, body, plan)

    def post(p, j, tokens, steps, output):  # engine thread: what this chunk says, in order
        final = output.finish_reason is not None
        delta = output.delta()
        output.reported = final
        item = ("chunk", p, j, tokens, steps, delta, output.finish_reason if final else None,
                output.stop_reason if final else None)
        loop.call_soon_threadsafe(queue.put_nowait, item)

    async def run():
        try:
            await _run_all(model, vocab, plan, outputs, cancel, post, prompt_logprobs=False)
            queue.put_nowait(("end",))
        except Exception as e:  # after the headers: the error becomes the last event
            queue.put_nowait(("error", e))

    def chunk(p, j, tokens, steps, text, finish, stop_reason, state) -> dict:
        prompt = plan.prompts[p]
        generated = list(tokens)
        state["tokens"][p][j] += len(tokens)
        positions = None
        if plan.logprobs is not None:
            positions = []
            for step in steps:
                positions.append(_step_position(vocab, step, state["last"][p][j]))
                state["last"][p][j] = step.token
        prompt_ids = None
        if body.echo and not state["echoed"][p][j]:
            state["echoed"][p][j] = True
            prompt_text = "" if body.return_token_ids else prompt.text
            prompt_positions = state["prompt_positions"]
            ppos = prompt_positions[p] if prompt_positions else None
            if plan.max_tokens == 0:
                text, tokens, positions = prompt_text, prompt.tokens, ppos
            else:
                text, tokens = prompt_text + text, prompt.tokens + tokens
                if positions is not None and ppos is not None:
                    positions = ppos + positions
            prompt_ids = prompt.tokens
        elif body.return_token_ids and not state["echoed"][p][j]:
            state["echoed"][p][j] = True
            prompt_ids = prompt.tokens
        logprobs = None
        if plan.logprobs is not None:
            logprobs = _completion_logprobs(vocab, tokens, positions or [], plan.logprobs,
                                            as_ids, state["chars"][p][j])
        state["chars"][p][j] += len(text)
        data = {"id": request_id, "object": "text_completion", "created": created,
                "model": model.path, "choices": [{
                    "index": p * n + j, "text": text, "logprobs": logprobs,
                    "finish_reason": finish, "stop_reason": stop_reason,
                    "prompt_token_ids": prompt_ids if body.return_token_ids else None,
                    "token_ids": generated if body.return_token_ids else None}]}
        if continuous_usage:
            used, made = len(prompt.tokens), state["tokens"][p][j]
            data["usage"] = {"prompt_tokens": used, "completion_tokens": made,
                             "total_tokens": used + made}
        return data

    async def events():
        task = asyncio.ensure_future(run())
        try:
            grid = lambda value: [[value] * n for _ in plan.prompts]  # noqa: E731
            state = {"echoed": grid(False), "chars": grid(0), "tokens": grid(0),
                     "last": grid(None), "prompt_positions": None}
            if body.echo and plan.logprobs is not None:  # the first chunks hold them
                state["prompt_positions"] = await _prompt_logprobs(model, vocab, plan)
            while True:
                item = await queue.get()
                if item[0] == "end":
                    break
                if item[0] == "error":
                    raise item[1]
                yield _sse(chunk(*item[1:], state))
            if include_usage:
                prompt_tokens = sum(len(prompt.tokens) for prompt in plan.prompts)
                completion_tokens = sum(len(o.tokens) for row in outputs for o in row)
                yield _sse({"id": request_id, "object": "text_completion", "created": created,
                            "model": model.path, "choices": [],
                            "usage": {"prompt_tokens": prompt_tokens,
                                      "total_tokens": prompt_tokens + completion_tokens,
                                      "completion_tokens": completion_tokens}})
        except Exception as e:
            if isinstance(e, OpenAIError):
                error = e
            elif isinstance(e, InputError):
                error = OpenAIError(str(e))
            else:
                error = OpenAIError(str(e), None, 500, "InternalServerError")
            yield _sse(error.body())
        finally:
            cancel.set()  # the client left early (or we are done): stop what still runs
            await asyncio.gather(task, return_exceptions=True)
        yield "data: [DONE]\n\n"

    return events()


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"
