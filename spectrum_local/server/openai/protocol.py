"""The request bodies of the OpenAI-compatible routes, vLLM's field names and defaults (unknown
fields ignored), with vLLM's validators and wording (CompletionRequest's and
SamplingParams._verify_args'), except that the sampling options the native routes share take
their bounds, and so their messages, from ``ops.SampleOptions`` (``_shared``). A refused value
is a 400 naming its field (``errors``). Checks that need the model (the context, the
vocabulary) are the plan's (``serving``)."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ...backend import SamplerSettings
from ...ops import SERVER_MAX_N, SampleOptions
from ..errors import FieldError

MAX_LOGPROBS = 20  # vLLM's default --max-logprobs
MAX_SEQUENCES = SERVER_MAX_N  # n × prompts per request, as n on the native routes
MAX_PROMPTS = 256
INT64_MAX = 2**63 - 1
_MIN_TEMPERATURE = 1e-2  # vLLM raises smaller positive temperatures to this: only 0 is greedy
_EMPTY_PROMPT = "Either prompt or prompt_embeds must be provided and non-empty."


class _OpenAIModel(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_OpenAIModel):
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False


TokenId = Annotated[int, Field(ge=0)]


def _shared(option: str):
    """The type of ``sample``'s ``option`` with its bounds under the server's caps."""
    field = SampleOptions.served().model_fields[option]
    return Annotated[field.annotation, *field.metadata]


Samples, Temperature, TopP, MinP, Penalty = map(
    _shared, ("n", "temperature", "top_p", "min_p", "repeat_penalty"))

_UNSUPPORTED = {  # field -> its defaults (vLLM's): anything else is refused
    "suffix": (None, ""), "frequency_penalty": (None, 0.0), "presence_penalty": (None, 0.0),
    "logit_bias": (None, {}), "use_beam_search": (False,), "min_tokens": (0,),
    "ignore_eos": (False,), "allowed_token_ids": (None,), "bad_words": (None, []),
    "logprob_token_ids": (None,), "prompt_embeds": (None,), "structured_outputs": (None,),
    "truncate_prompt_tokens": (None,),
}


class CompletionRequest(_OpenAIModel):
    model: str | None = None
    prompt: list[TokenId] | list[list[TokenId]] | str | list[str] | None = None
    echo: bool | None = False
    logprobs: int | None = None
    max_tokens: int | None = 16
    n: Samples = 1
    seed: int | None = Field(None, ge=-(2**63), le=INT64_MAX)
    stop: str | list[str] | None = []
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: int | None = None
    min_p: MinP | None = None
    repetition_penalty: Penalty | None = None
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

    # -- one field at a time -------------------------------------------------------------------

    @field_validator("logprobs", "prompt_logprobs")
    @classmethod
    def _logprobs(cls, value, info):
        if value is not None and value < 0 and value != -1:
            raise FieldError(f"`{info.field_name}` must be a positive value or -1.")
        return value

    @field_validator("top_k")
    @classmethod
    def _top_k(cls, top_k):
        if top_k is not None and top_k < -1:
            raise FieldError(f"top_k must be 0 (disable), or at least 1, got {top_k}.")
        return top_k

    @field_validator("stop")
    @classmethod
    def _stop(cls, stop):
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if any(not s for s in stops):
            raise FieldError("stop cannot contain an empty string.")
        return stops

    # -- fields together -------------------------------------------------------------------------

    @model_validator(mode="after")
    def _together(self):
        for name, defaults in _UNSUPPORTED.items():
            if name in self.model_fields_set and getattr(self, name) not in defaults:
                raise FieldError(f"`{name}` is not supported by this server (spectrum-local)",
                                 name)
        if self.response_format is not None and (not isinstance(self.response_format, dict)
                                                 or self.response_format.get("type") != "text"):
            raise FieldError("`response_format` is not supported by this server "
                             "(spectrum-local)", "response_format")
        if self.prompt_logprobs is not None and self.stream and \
                (self.prompt_logprobs > 0 or self.prompt_logprobs == -1):
            raise FieldError("`prompt_logprobs` are not available when `stream=True`.",
                             "prompt_logprobs")
        if self.stream_options and not self.stream:
            raise FieldError("Stream options can only be defined when `stream=True`.",
                             "stream_options")
        if self.prompt in (None, "", []) or any(p in ("", []) for p in self.prompts()):
            raise FieldError(_EMPTY_PROMPT, "prompt")
        if self.gen_tokens < 1:
            raise FieldError(f"max_tokens must be at least 1, got {self.requested_tokens}.",
                             "max_tokens")
        if len(self.prompts()) > MAX_PROMPTS:
            raise FieldError(f"prompt list length {len(self.prompts())} exceeds the maximum "
                             f"allowed count of {MAX_PROMPTS}.", "prompt")
        if self.n * len(self.prompts()) > MAX_SEQUENCES:
            raise FieldError(f"n × the number of prompts must be at most {MAX_SEQUENCES}, got "
                             f"{self.n} × {len(self.prompts())}.", "n")
        if self.greedy and self.n > 1:
            raise FieldError(f"n must be 1 when using greedy sampling, got {self.n}.", "n")
        return self

    # -- the request in the engine's terms --------------------------------------------------------

    def prompts(self) -> list[str | list[int]]:
        """The prompts: each a text or a list of token ids."""
        prompt = self.prompt
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            return [prompt]
        return list(prompt or [])

    @property
    def requested_tokens(self) -> int:
        """max_tokens as asked (0 with echo: the prompt only)."""
        return 16 if self.max_tokens is None else self.max_tokens

    @property
    def echo_only(self) -> bool:
        return bool(self.echo) and self.requested_tokens == 0

    @property
    def gen_tokens(self) -> int:
        """What the engine generates (vLLM generates one token for echo only)."""
        return 1 if self.echo_only else self.requested_tokens

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def sampler_settings(self, n_vocab: int) -> SamplerSettings:
        """vLLM's sampling parameters as llama.cpp's chain: untruncated by default; greedy at
        temperature 0; positive temperatures at least 0.01."""
        if self.greedy:
            return SamplerSettings(0.0, 0, 1.0, 0.0, self._or(self.repetition_penalty, 1.0))
        top_k = self._or(self.top_k, 0)
        return SamplerSettings(max(self._or(self.temperature, 1.0), _MIN_TEMPERATURE),
                               min(top_k, n_vocab) if top_k > 0 else 0,
                               self._or(self.top_p, 1.0), self._or(self.min_p, 0.0),
                               self._or(self.repetition_penalty, 1.0))

    @property
    def sampling_seed(self) -> int | None:
        return None if self.seed == -1 else self.seed

    @staticmethod
    def _or(value, default):
        return default if value is None else value


class TokenizeRequest(_OpenAIModel):
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool | None = False


class DetokenizeRequest(_OpenAIModel):
    model: str | None = None
    tokens: list[Annotated[int, Field(ge=0, le=INT64_MAX)]]
