"""The operations against servers: vLLM (or anything speaking its ``/v1/completions`` with
``prompt_logprobs``) and another machine's ``spectrum-local serve``.

``connect(urls)`` asks the first server what it is:
- our ``serve`` answers ``/spectrum/v1/info``: ``ServedModel`` calls its native routes, so the
  server renders and tokenises with its own GGUF vocabulary and the client needs no tokenizer;
- vLLM does not: ``SpectrumModel`` runs the operations here over ``VLLMBackend``, which renders
  and tokenises on this side (Hugging Face ``tokenizers``, control tokens never parsed from
  text) and sends token ids, so the template and the end-of-output token are exactly ours.

Several URLs are replicas of one model: each request goes to the one with the fewest requests
in flight. Connection errors, 5xx and 429 are retried with exponential backoff and jitter
(bounded); any other 4xx is the caller's ``InputError``.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path as FilePath
from typing import Callable, Sequence

import httpx
import numpy as np

from . import formats
from .backend import Backend, Generation, Path, PathResult
from .errors import Cancelled, InputError, SpectrumError
from .model import SpectrumModel, unique_candidates
from .ops import SERVER_MAX_N, EnumerateOptions, SampleOptions, ScoreOptions, TopOptions
from .results import (CandidateScore, EnumeratedOutput, EnumerateResult, Sample, ScoreResult,
                      TokenProb)

ATTEMPTS = 8  # per request; the waits between them add up to about a minute
FIRST_WAIT, LONGEST_WAIT = 0.5, 20.0  # seconds, before jitter
# Read timeout: one request may be a few thousand samples or candidates.
TIMEOUT = httpx.Timeout(600.0, connect=10.0)
# Tokenised by both sides at connect time: words, digits, accents, whitespace runs, no markers.
PROBE = "Spectrum probe: roll 2 dice, sum 7?  Café naïve 3.14159\n\tdone."


def connect(urls: str | Sequence[str], *, api_key: str | None = None,
            tokenizer: str | None = None, format: str | None = None):
    """A model answered by the server(s) at ``urls``: a ``ServedModel`` for ``spectrum-local
    serve``, a ``SpectrumModel`` over ``VLLMBackend`` for vLLM. ``api_key`` is sent as a Bearer
    token (default: $SPECTRUM_LOCAL_API_KEY). For vLLM, ``tokenizer`` (a folder, a
    tokenizer.json or a hub id; default: the served model's id) and ``format`` (default: told
    by the tokenizer's control tokens)."""
    client = Client([urls] if isinstance(urls, str) else list(urls),
                    api_key if api_key is not None else os.environ.get("SPECTRUM_LOCAL_API_KEY"))
    try:
        answers = {replica: client.identify(replica) for replica in client.replicas}
        kinds = {replica: (kind, name) for replica, (kind, name, _) in answers.items()}
        if len(set(kinds.values())) > 1:
            raise InputError("the servers do not all serve the same model: " + ", ".join(
                f"{r.url} ({kind}: {name})" for r, (kind, name) in kinds.items()))
        kind, name, details = answers[client.replicas[0]]
        if kind == "serve":
            if tokenizer:
                raise InputError("--tokenizer is for vLLM; spectrum-local serve tokenises itself")
            return ServedModel(client, details, format)
        backend = VLLMBackend(client, name, tokenizer)
        fmt = formats.get_format(format) if format else backend.detect_format()
        model = SpectrumModel(backend, fmt, format_from="--format" if format else "tokenizer")
        backend.check_tokenizer()
        return model
    except BaseException:
        client.close()
        raise


# -- HTTP -----------------------------------------------------------------------------------


@dataclass(eq=False)
class Replica:
    url: str
    in_flight: int = 0
    answered: int = 0  # requests it answered (the batch summary shows the spread)
    resting_until: float = 0.0  # after a failure, not picked again before this


class Client:
    """JSON over HTTP to one or more replicas, with bounded retries. Thread-safe."""

    def __init__(self, urls: list[str], api_key: str | None):
        if not urls:
            raise InputError("no server URL given")
        for url in urls:
            if not url.startswith(("http://", "https://")):
                raise InputError(f"a server URL starts with http:// or https://, not {url!r}")
        self.replicas = [Replica(url.rstrip("/")) for url in urls]
        self.api_key = api_key
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(headers=headers, timeout=TIMEOUT,
                                  limits=httpx.Limits(max_connections=None))
        self._lock = threading.Lock()
        self._last_warning = 0.0
        self._closed = threading.Event()

    def close(self) -> None:
        """Close the connections; requests in flight on other threads end with an error."""
        self._closed.set()
        self._http.close()

    def get(self, path: str, replica: Replica | None = None) -> dict:
        return self.request("GET", path, None, replica)

    def post(self, path: str, body: dict) -> dict:
        return self.request("POST", path, body)

    def identify(self, replica: Replica) -> tuple[str, str, dict]:
        """What one replica is: ("serve", served model name, its info) or ("vllm", served
        model id, its /v1/models entry)."""
        try:  # one try: a wrong URL or a server not started is said at once
            info = self.request("GET", "/spectrum/v1/info", None, replica, attempts=1)
            return "serve", str(info.get("model")), info  # its served name
        except _NotFound:
            pass
        try:
            entry = self.request("GET", "/v1/models", None, replica, attempts=1)["data"][0]
            return "vllm", entry["id"], entry
        except (_NotFound, KeyError, IndexError, TypeError):
            raise InputError(f"{replica.url} is neither spectrum-local serve nor an OpenAI-"
                             "compatible server with /v1/models") from None

    def request(self, method: str, path: str, body: dict | None,
                replica: Replica | None = None, attempts: int = ATTEMPTS) -> dict:
        """The JSON answer; retries what a server may get over, raises ``InputError`` for a
        request it refuses (4xx) and ``SpectrumError`` when the tries run out."""
        for attempt in range(1, attempts + 1):
            if self._closed.is_set():
                raise SpectrumError("the connection to the server was closed")
            target = replica or self._pick()
            try:
                response = self._http.request(method, target.url + path, json=body)
            except httpx.TransportError as e:
                problem = f"cannot reach {target.url}: {e or type(e).__name__}"
            else:
                if response.status_code < 400:
                    target.answered += 1
                    return _json(response)
                if response.status_code != 429 and response.status_code < 500:
                    raise self._refusal(response)
                problem = f"{target.url}{path} answered {response.status_code}: " \
                          f"{_error_message(response)}"
            finally:
                if replica is None:
                    with self._lock:
                        target.in_flight -= 1
            if attempt == attempts:
                break
            wait = min(LONGEST_WAIT, FIRST_WAIT * 2 ** (attempt - 1)) * random.uniform(0.5, 1.5)
            if self._closed.is_set():
                raise SpectrumError("the connection to the server was closed")
            with self._lock:
                target.resting_until = time.monotonic() + wait
                self._warn(f"{problem}; trying again ({attempt + 1} of {attempts})")
            if replica is not None:
                self._closed.wait(wait)
        raise SpectrumError(problem if attempts == 1 else
                            f"gave up after {attempts} tries: {problem}")

    def _pick(self) -> Replica:
        """The replica with the fewest requests in flight among those not resting after a
        failure (or, when all rest, the first to wake), counted as in flight."""
        with self._lock:
            now = time.monotonic()
            awake = [r for r in self.replicas if r.resting_until <= now]
            if awake:
                chosen = min(awake, key=lambda r: r.in_flight)
            else:
                chosen = min(self.replicas, key=lambda r: r.resting_until)
            chosen.in_flight += 1
            wait = chosen.resting_until - now
        if wait > 0:
            self._closed.wait(wait)
        return chosen

    def _warn(self, text: str) -> None:
        # Many requests in flight fail together: one line every few seconds, not one each.
        if time.monotonic() - self._last_warning > 5:
            self._last_warning = time.monotonic()
            warnings.warn(text, UserWarning, stacklevel=4)

    def _refusal(self, response: httpx.Response) -> Exception:
        message = _error_message(response)
        if response.status_code == 401:
            hint = ("the API key was refused" if self.api_key else
                    "it needs an API key: pass --api-key or set SPECTRUM_LOCAL_API_KEY")
            return InputError(f"{response.request.url.host}: {hint} ({message})")
        if response.status_code == 404:
            return _NotFound(message)
        return InputError(f"the server refused the request ({response.status_code}): {message}")


class _NotFound(InputError):
    """404: a route this server does not have."""


def _json(response: httpx.Response) -> dict:
    try:
        return response.json()
    except json.JSONDecodeError:
        raise SpectrumError(f"{response.request.url} answered something that is not JSON: "
                            f"{response.text[:200]!r}") from None


def _error_message(response: httpx.Response) -> str:
    """The message of an error body: ours and vLLM's ``{"error": {"message"}}``, older vLLM's
    ``{"message"}``, FastAPI's ``{"detail"}``, or the text."""
    try:
        body = response.json()
    except json.JSONDecodeError:
        return response.text.strip()[:300] or response.reason_phrase
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict) and "message" in error:
            return str(error["message"])
        if "detail" in body:
            return str(body["detail"])
    return json.dumps(body)[:300]


# -- spectrum-local serve -------------------------------------------------------------------


class ServedModel:
    """The operations of a model loaded by ``spectrum-local serve``, over its native routes.
    Same arguments and result types as ``SpectrumModel`` (but no streaming hooks on
    ``sample``); the server validates them."""

    def __init__(self, client: Client, info: dict, format: str | None = None):
        self.client = client
        self._info = info
        self.path = str(info.get("model"))
        self.format = str(info.get("format"))
        if format and format != self.format:
            raise InputError(f"the server's model is in the {self.format} format, not {format}")
        self.notice = None

    def __repr__(self) -> str:
        return f"ServedModel({self.client.replicas[0].url!r}, model={self.path!r})"

    def close(self) -> None:
        self.client.close()

    def info(self) -> dict:
        return {**self._info, "server": [r.url for r in self.client.replicas]}

    local = False  # the server runs the operations

    # Each operation's body: the messages and its options, checked here by their ``ops``
    # model (the server checks them again, under its caps) and sent where they differ from
    # the defaults, which the server shares.

    def sample(self, messages, n: int = 1, *, max_tokens: int = 256, seed: int | None = None,
               temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
               repeat_penalty: float = 1.0) -> list[Sample]:
        options = SampleOptions.check(n=n, max_tokens=max_tokens, seed=seed,
                                      temperature=temperature, top_k=top_k, top_p=top_p,
                                      min_p=min_p, repeat_penalty=repeat_penalty)
        body = {"messages": _message_dicts(messages),
                **options.model_dump(exclude_defaults=True, exclude={"n", "seed"})}

        def part(start: int) -> list[dict]:
            # Sample i is seeded seed + i, so the parts give exactly the samples of one call.
            size = min(SERVER_MAX_N, options.n - start)
            answer = self.client.post("/spectrum/v1/sample", {
                **body, "n": size, "seed": None if seed is None else options.seed + start})
            return answer["samples"]

        starts = range(0, options.n, SERVER_MAX_N)  # the server's cap; sent side by side
        with ThreadPoolExecutor(len(starts)) as pool:
            return [Sample(**s) for samples in pool.map(part, starts) for s in samples]

    def top(self, messages, k: int = 10, *, prefix: str = "") -> list[TokenProb]:
        options = TopOptions.check(k=k, prefix=prefix)
        answer = self.client.post("/spectrum/v1/top", {
            "messages": _message_dicts(messages), **options.model_dump(exclude_defaults=True)})
        return [TokenProb(**t) for t in answer["tokens"]]

    def score(self, messages, candidates: Sequence[str], *, end_token: bool = True) -> ScoreResult:
        options = ScoreOptions.check(candidates=candidates, end_token=end_token)
        answer = self.client.post("/spectrum/v1/score", {
            "messages": _message_dicts(messages),
            **options.model_dump(exclude_defaults=True),
            "candidates": unique_candidates(options.candidates)})
        return ScoreResult(answer["coverage"],
                           [CandidateScore(**c) for c in answer["candidates"]])

    def enumerate(self, messages, *, coverage: float = 0.95, min_prob: float = 0.0,
                  max_outputs: int = 100, max_tokens: int = 32,
                  max_decoded: int = 20_000) -> EnumerateResult:
        options = EnumerateOptions.check(coverage=coverage, min_prob=min_prob,
                                         max_outputs=max_outputs, max_tokens=max_tokens,
                                         max_decoded=max_decoded)
        answer = self.client.post("/spectrum/v1/enumerate", {
            "messages": _message_dicts(messages), **options.model_dump(exclude_defaults=True)})
        fields = {f: answer[f] for f in ("coverage", "unexplored", "exhausted", "stopped", "cut",
                                        "decoded")}
        return EnumerateResult(**fields, outputs=[EnumeratedOutput(**o) for o in answer["outputs"]])


def _message_dicts(messages) -> list[dict]:
    return [{"role": m.role, "content": m.content} for m in formats.parse_messages(messages)]


# -- vLLM -----------------------------------------------------------------------------------


class VLLMBackend(Backend):
    """The ``Backend`` over vLLM's OpenAI-compatible server: prompts go as token ids,
    log-probabilities come from ``prompt_logprobs`` (reads) and ``logprobs`` (next tokens,
    capped by the server's --max-logprobs), samples from ``n`` with every sampling field set."""

    def __init__(self, client: Client, model_id: str, tokenizer: str | None):
        self.client = client
        self.path = model_id
        self._tokenizer_source = tokenizer or model_id
        self._tokenizer = _load_tokenizer(self._tokenizer_source)
        # Message content is text: a marker written in it stays text (a test checks it).
        self._tokenizer.encode_special_tokens = True
        self._special = {i: t.content for i, t in
                         self._tokenizer.get_added_tokens_decoder().items() if t.special}
        self.n_vocab = self._tokenizer.get_vocab_size(with_added_tokens=True)

    def close(self) -> None:
        self.client.close()

    def describe(self) -> dict:
        listing = self.client.get("/v1/models")["data"][0]
        return {"server": [r.url for r in self.client.replicas], "server_kind": "vllm",
                "tokenizer": self._tokenizer_source, "context": listing.get("max_model_len")}

    # -- tokens ---------------------------------------------------------------------------

    def tokenize(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def detokenize(self, tokens: Sequence[int]) -> str:
        return self._tokenizer.decode(list(tokens), skip_special_tokens=True)

    def token_text(self, token: int) -> str:
        return self._tokenizer.decode([token], skip_special_tokens=False)

    def control_token(self, marker: str) -> int | None:
        token = self._tokenizer.token_to_id(marker)
        return token if self._special.get(token) == marker else None

    def detect_format(self) -> formats.Format:
        """The family whose control tokens are all in the tokenizer."""
        markers = set(self._special.values())
        found = [f for f in formats.FORMATS.values() if set(f.control_tokens) <= markers]
        if len(found) != 1:
            raise InputError(f"cannot tell the spectrum format from the tokenizer of "
                             f"{self.path}; pass --format ({', '.join(formats.FORMATS)})")
        return found[0]

    def check_tokenizer(self) -> None:
        """Refuse a local tokenizer that splits text differently from the server's."""
        theirs = self.client.post("/tokenize", {"model": self.path, "prompt": PROBE,
                                                 "add_special_tokens": False})["tokens"]
        ours = self.tokenize(PROBE)
        if theirs != ours:
            raise SpectrumError(
                f"the tokenizer {self._tokenizer_source} does not tokenise like the server's "
                f"model {self.path} ({len(ours)} vs {len(theirs)} tokens for a probe text); "
                "pass the served model's own with --tokenizer")

    # -- reads and samples ----------------------------------------------------------------

    whole_rows = False  # vLLM gives at most --max-logprobs tokens per position
    remote = True  # SpectrumModel.local: the model runs on the server

    def read(self, paths: Sequence[Path], keep: Sequence[int] | None = None, *,
             cancel=None) -> list[PathResult]:
        """All paths in one request, one prompt each (vLLM evaluates them as one batch)."""
        if cancel is not None and cancel.is_set():
            raise Cancelled("cancelled")
        if any(p.final for p in paths):
            raise SpectrumError("a server gives the top tokens, not a whole logits row")
        todo = [p for p in paths if not p.wants_nothing]
        top = max((p.top or 0 for p in todo), default=0)
        answers = iter(self._completions([list(p.tokens) for p in todo], max_tokens=1,
                                         temperature=0.0, prompt_logprobs=top)
                       if todo else [])
        return [PathResult(np.zeros(0)) if p.wants_nothing else _path_result(p, next(answers))
                for p in paths]

    def next_tokens(self, prompt: Sequence[int], k: int, *,
                    cancel=None) -> tuple[tuple[int, float], ...]:
        if cancel is not None and cancel.is_set():
            raise Cancelled("cancelled")
        try:
            choice = self._completions([list(prompt)], max_tokens=1, temperature=0.0,
                                       logprobs=k, return_tokens_as_token_ids=True)[0]
        except InputError as e:
            if "logprobs" not in str(e):
                raise
            raise InputError(f"{e}; -k is capped by the vLLM server's --max-logprobs") from None
        alternatives = choice["logprobs"]["top_logprobs"][0]
        best = sorted(((_token_id(t), lp) for t, lp in alternatives.items()),
                      key=lambda item: -item[1])
        return tuple(best[:k])

    def generate(self, prompt: Sequence[int], n: int, max_tokens: int, settings, seed,
                 stop_tokens: set[int], *, logprobs=None, on_step=None,
                 on_done: Callable[[int, Generation], None] | None = None,
                 cancel=None) -> list[Generation]:
        # Greedy samples are all the same, and vLLM refuses n > 1 without sampling: draw one.
        copies, n = (n, 1) if settings.temperature == 0 else (1, n)
        # Every sampling field explicitly: vLLM would otherwise apply the checkpoint's
        # generation_config (often top_p/top_k truncation) unless started with
        # --generation-config vllm.
        choices = copies * self._completions(
            [list(prompt)], n=n, max_tokens=max_tokens, seed=seed,
            temperature=settings.temperature, top_k=settings.top_k or -1,
            top_p=settings.top_p, min_p=settings.min_p,
            repetition_penalty=settings.repeat_penalty, stop_token_ids=sorted(stop_tokens),
            logprobs=0, return_tokens_as_token_ids=True, skip_special_tokens=False)
        runs = []
        for index, choice in enumerate(choices):
            tokens = [_token_id(t) for t in choice["logprobs"]["tokens"]]
            run = Generation(finish_reason=choice["finish_reason"] or "length")
            if run.finish_reason == "stop" and tokens and tokens[-1] in self._special:
                run.stop_token = tokens.pop()  # vLLM counts the stop token in the output
            run.tokens = tokens
            runs.append(run)
            if on_done:
                on_done(index, run)
        return runs

    def _completions(self, prompts: list[list[int]], **fields) -> list[dict]:
        body = {"model": self.path, "prompt": prompts if len(prompts) > 1 else prompts[0],
                **fields}
        choices = self.client.post("/v1/completions", body)["choices"]
        return sorted(choices, key=lambda c: c["index"])  # prompt index x n + sample index


def _load_tokenizer(source: str):
    """A ``tokenizers.Tokenizer`` from a tokenizer.json, a folder holding one, or a hub id
    (the hub cache, or a download unless HF_HUB_OFFLINE=1)."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise SpectrumError("talking to vLLM needs the remote extra: "
                            "pip install 'spectrum-local[remote]'") from None
    path = FilePath(source).expanduser()
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        try:
            from huggingface_hub import hf_hub_download

            path = FilePath(hf_hub_download(source, "tokenizer.json"))
        except Exception as e:
            raise InputError(
                f"no tokenizer.json for {source!r} here (not a folder, a file or a hub repo "
                f"in reach: {type(e).__name__}); pass --tokenizer with the served model's "
                "folder or its hub id") from None
    return Tokenizer.from_file(str(path))


def _token_id(text: str) -> int:
    # return_tokens_as_token_ids writes tokens as "token_id:123"
    return int(text.rsplit(":", 1)[1])


def _path_result(path: Path, choice: dict) -> PathResult:
    """One prompt's ``prompt_logprobs`` (entry 0 is None: the first token has no context),
    read at positions ``path.first``.."""
    entries = choice["prompt_logprobs"][path.first:]
    logprobs, ranks, tops = [], [], []
    for token, entry in zip(path.tokens[path.first:], entries):
        mine = entry[str(token)]
        logprobs.append(mine["logprob"])
        ranks.append(mine["rank"])
        best = sorted(((int(t), e["logprob"]) for t, e in entry.items()
                       if e["rank"] <= (path.top or 0)), key=lambda item: -item[1])
        tops.append(tuple(best))
    wants_top = path.top is not None
    return PathResult(np.array(logprobs, dtype=np.float64), ranks if wants_top else None,
                      tops if wants_top else None)
