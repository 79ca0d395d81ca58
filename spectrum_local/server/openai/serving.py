"""A completion request in the engine's terms and its generation: the plan (the checks that
need the model, the prompts tokenised), each choice's output as its tokens come (stop strings,
finish reasons), and the runs of every prompt's samples and prompt log-probs.

All model work goes through ``model.engine`` (the scheduler) in worker threads; ``on_step`` and
``on_done`` run on the engine's thread and only do bookkeeping."""

from __future__ import annotations

import asyncio
import codecs
import os
import threading
from dataclasses import dataclass, field
from typing import Sequence

from starlette.concurrency import run_in_threadpool

from ...backend import SamplerSettings
from ..errors import APIError
from .logprobs import Position, prompt_positions
from .protocol import MAX_LOGPROBS, ChatCompletionRequest, CompletionRequest


def check_model(state, name: str | None) -> None:
    """vLLM's _check_model: no name, the served name or the model's file name (an alias);
    anything else is a 404. ``state``: the app's (``model``, ``model_name``)."""
    if name and name not in (state.model_name, os.path.basename(state.model.path)):
        raise APIError(f"The model `{name}` does not exist.", "model", 404)


def check_vocabulary(engine, tokens: Sequence[int]) -> None:
    if tokens and max(tokens) >= engine.n_vocab:
        raise APIError(f"Token id {max(tokens)} is out of vocabulary", "prompt")


@dataclass
class Prompt:
    tokens: list[int]
    text: str  # what echo prepends: the text as sent, or the token ids decoded


@dataclass
class Plan:
    """A validated request in the engine's terms: completions', chat's or Ollama's."""

    body: object  # the request as sent, for the answer's shape
    prompts: list[Prompt]
    n: int  # samples per prompt
    settings: SamplerSettings
    seed: int | None
    max_tokens: int  # per sample
    stop_ids: set[int] = field(default_factory=set)  # stop tokens named in the request
    stop_tokens: set[int] = field(default_factory=set)  # all the engine stops at, besides EOG
    stops: list[str] = field(default_factory=list)  # stop strings
    include_stop: bool = False  # a stop string stays in the text
    logprobs: int | None = None  # top-k per generated token, or None: not computed
    prompt_logprobs: int | None = None  # top-k per prompt position, or None: not computed
    # A character the last token left unfinished ends the text as U+FFFD, as in the native
    # routes' samples (chat, Ollama: a reply is the native sample's text); else its bytes are
    # left out, as vLLM's detokenizer leaves them (completions).
    keep_partial: bool = False


async def plan(state, body: CompletionRequest) -> Plan:
    """The checks that need the model (vLLM's, same messages), and the prompts tokenised."""
    check_model(state, body.model)
    engine = state.model.engine
    max_tokens = body.requested_tokens
    if max_tokens > engine.n_ctx:
        raise APIError(f"max_tokens={max_tokens} cannot be greater than "
                       f"max_model_len={engine.n_ctx}. Please request fewer output tokens.",
                       "max_tokens")
    # -1: the whole vocabulary (then over the engine's limit, as in vLLM)
    logprobs, prompt_logprobs = body.logprobs, body.prompt_logprobs
    if prompt_logprobs is None and body.echo:
        prompt_logprobs = logprobs
    logprobs, prompt_logprobs = (None if v is None else engine.n_vocab if v == -1 else v
                                 for v in (logprobs, prompt_logprobs))
    _check_logprobs("sample", logprobs, "logprobs")
    _check_logprobs("prompt", prompt_logprobs, "prompt_logprobs")
    if body.stream and not (body.echo and logprobs is not None):
        prompt_logprobs = None  # a stream sends them only as echo's logprobs
    prompts = [await _prompt(engine, body, item) for item in body.prompts()]
    stops = _stops(body)
    return Plan(body, prompts, body.n, body.sampler_settings(engine.n_vocab), body.sampling_seed,
                body.gen_tokens, stop_tokens=set(stops["stop_ids"]), **stops,
                logprobs=logprobs, prompt_logprobs=prompt_logprobs)


async def chat_plan(state, body: ChatCompletionRequest) -> Plan:
    """A chat request: its messages in spectrum's roles rendered in the model's format (so
    their text never becomes control tokens), the reply a sample of the output turn."""
    check_model(state, body.model)
    model = state.model
    messages, prefix = body.spectrum_messages()
    tokens = await run_in_threadpool(model.prompt_tokens, messages, prefix)
    logprobs = None
    if body.logprobs:
        logprobs = model.engine.n_vocab if body.top_logprobs == -1 else body.top_logprobs or 0
        _check_logprobs("sample", logprobs, "top_logprobs")
    return reply_plan(model, body, tokens, body.n, body.sampler_settings(model.engine.n_vocab),
                      body.sampling_seed, body.asked_tokens, logprobs, **_stops(body))


def reply_plan(model, body, tokens: list[int], n: int, settings: SamplerSettings,
               seed: int | None, asked: int | None, logprobs: int | None, *,
               stop_ids: set[int] = frozenset(), stops: Sequence[str] = (),
               include_stop: bool = False) -> Plan:
    """A reply (chat's, Ollama's): samples of the output turn after ``tokens``, each ending at
    the end-of-output token, or after ``asked`` tokens (default: the rest of the context, as
    in vLLM); a character cut at the end kept as U+FFFD, as in the native samples."""
    engine = model.engine
    _check_room(engine, len(tokens), asked or 1, asked or 1)
    return Plan(body, [Prompt(tokens, "")], n, settings, seed, asked or engine.n_ctx - len(tokens),
                stop_ids=set(stop_ids), stop_tokens={*stop_ids, model.end_of_output_id},
                stops=list(stops), include_stop=include_stop, logprobs=logprobs,
                keep_partial=True)


def _stops(body) -> dict:
    """vLLM's stop fields as the plan's."""
    return {"stop_ids": set(body.stop_token_ids or ()), "stops": body.stop,
            "include_stop": body.include_stop_str_in_output}


def _check_logprobs(kind: str, wanted: int | None, param: str) -> None:
    """The engine's limit on logprobs (vLLM's --max-logprobs, 20 by default)."""
    if wanted is not None and wanted > MAX_LOGPROBS:
        raise APIError(f"Requested {kind} logprobs of {wanted}, which is greater than "
                       f"max allowed: {MAX_LOGPROBS}", param)


def _check_room(engine, n_tokens: int, generated: int, requested: int) -> None:
    """TokenizeParams: the prompt and the requested tokens must fit the context together."""
    room = engine.n_ctx - generated
    if n_tokens > room:
        raise APIError(
            f"You passed {n_tokens} input tokens and requested {requested} output tokens. "
            f"However, the model's context length is only {engine.n_ctx} tokens, resulting in "
            f"a maximum input length of {room} tokens. Please reduce the length of the input "
            "prompt.", "input_tokens")


async def _prompt(engine, body: CompletionRequest, item: str | list[int]) -> Prompt:
    """A text (control tokens parsed, BOS added) or token ids, checked against the context."""
    if isinstance(item, str):
        tokens = await run_in_threadpool(engine.tokenize, item, special=True,
                                         bos=body.add_special_tokens)
        text = item
    else:
        tokens = list(item)
        check_vocabulary(engine, tokens)
        text = await run_in_threadpool(engine.detokenize, tokens, special=True) \
            if body.echo else ""
    if not tokens:  # e.g. a text that tokenises to nothing
        raise APIError("The prompt is empty after tokenization.", "prompt")
    _check_room(engine, len(tokens), body.gen_tokens, body.requested_tokens)
    return Prompt(tokens, text)


# -- one choice's output, built as its tokens come ---------------------------------------------


class Output:
    """One sample's tokens, steps and text, with vLLM's stop-string rules: the text is cut
    before a stop string (after it with include_stop_str_in_output), and while streaming the
    last len(longest stop) - 1 characters are held back until it is known they do not start
    one. Updated on the engine's thread (``on_step``/``on_done``)."""

    def __init__(self, piece, plan: Plan):
        self.piece, self.stops, self.include_stop = piece, plan.stops, plan.include_stop
        self.stop_ids, self.max_tokens = plan.stop_ids, plan.max_tokens
        self.keep_partial = plan.keep_partial
        self.hold = max(map(len, self.stops)) - 1 if self.stops and not self.include_stop else 0
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
            self._flush()
            self.finish_reason = "length"
        return self.finish_reason

    def _flush(self) -> None:
        """The sample ends here: an unfinished last character ends the text as U+FFFD (see
        ``Plan.keep_partial``), unless a stop string has cut the text already."""
        if self.keep_partial and self.finish_reason is None:
            self.keep_partial = False
            if tail := self._decoder.decode(b"", final=True):
                self.text += tail
                self._check_stops(len(tail))

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
        own on_step's reason, at the context's end, or aborted. The bytes of a character the
        last token left unfinished: see ``Plan.keep_partial``."""
        self._flush()
        if generation.stop_token is not None:
            self.tokens.append(generation.stop_token)
            if generation.stop_step is not None:
                self.steps.append(generation.stop_step)
            token = generation.stop_token
            self.finish_reason = "stop"
            self.stop_reason = token if token in self.stop_ids else None
        elif self.finish_reason is None:
            self.finish_reason = generation.finish_reason

    def delta(self) -> str:
        """The text not streamed yet that can be (all of it once finished)."""
        upto = len(self.text) if self.finish_reason else len(self.text) - self.hold
        if upto <= self.sent:
            return ""
        piece, self.sent = self.text[self.sent:upto], upto
        return piece


class Vocab:
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


# -- the runs ------------------------------------------------------------------------------------


class Completion:
    """A planned request's runs: every prompt's n outputs, filled as the engine goes."""

    def __init__(self, model, plan: Plan, model_name: str):
        self.model, self.plan, self.model_name = model, plan, model_name
        self.vocab = Vocab(model.engine)
        self.outputs = [[Output(self.vocab.piece, plan) for _ in range(plan.n)]
                        for _ in plan.prompts]

    async def run(self, cancel: threading.Event, post=None) -> None:
        """Generate every prompt's samples concurrently. ``post(p, j, tokens, steps, output)``
        is told, on the engine's thread, what each step or finished sample added to sample j
        of prompt p."""
        await asyncio.gather(*[run_in_threadpool(self._generate, p, cancel, post)
                               for p in range(len(self.plan.prompts))])

    async def prompt_positions(self, cancel: threading.Event) -> list[list[Position | None]] | None:
        """Each prompt's log-probs (vLLM's prompt_logprobs), or None if not asked for."""
        k = self.plan.prompt_logprobs
        if k is None:
            return None

        def read(tokens):
            found = self.model.engine.prompt_logprobs(tokens, k, cancel=cancel)
            return prompt_positions(self.vocab, found, k)

        return await asyncio.gather(*[run_in_threadpool(read, prompt.tokens)
                                      for prompt in self.plan.prompts])

    def _generate(self, p: int, cancel: threading.Event, post) -> None:
        outputs, plan = self.outputs[p], self.plan

        def on_step(step) -> str | None:
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

        self.model.engine.generate(plan.prompts[p].tokens, plan.n, plan.max_tokens, plan.settings,
                                   plan.seed, plan.stop_tokens,
                                   logprobs=plan.logprobs, on_step=on_step, on_done=on_done,
                                   cancel=cancel)
