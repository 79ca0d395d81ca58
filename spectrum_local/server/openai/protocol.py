"""The request bodies of the OpenAI-compatible routes, vLLM's field names and defaults (unknown
fields ignored), with vLLM's validators and wording (CompletionRequest's, ChatCompletionRequest's
and SamplingParams._verify_args'), except that the sampling options the native routes share take
their bounds, and so their messages, from ``ops.SampleOptions`` (``_shared``). A refused value
is a 400 naming its field (``errors``). Checks that need the model (the context, the
vocabulary) are the plan's (``serving``)."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar

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

class _SamplingRequest(_OpenAIModel):
    """What completions and chat completions share: n, seed, the sampling options, stops,
    streaming, and the vLLM options this server refuses unless left at their default."""

    # field -> its defaults (vLLM's): anything else is a 400 naming the field
    UNSUPPORTED: ClassVar[dict[str, tuple]] = {
        "frequency_penalty": (None, 0.0), "presence_penalty": (None, 0.0),
        "logit_bias": (None, {}), "use_beam_search": (False,), "min_tokens": (0,),
        "ignore_eos": (False,), "allowed_token_ids": (None,), "bad_words": (None, []),
        "logprob_token_ids": (None,), "structured_outputs": (None,),
        "truncate_prompt_tokens": (None,),
    }

    model: str | None = None
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
    return_tokens_as_token_ids: bool | None = None
    return_token_ids: bool | None = None
    # vLLM options this server does not implement: a 400 unless left at their default.
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    use_beam_search: bool = False
    min_tokens: int = 0
    ignore_eos: bool = False
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    logprob_token_ids: list[int] | None = None
    response_format: Any = None
    structured_outputs: Any = None
    truncate_prompt_tokens: int | None = None

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

    @model_validator(mode="after")
    def _sampling(self):
        for name, defaults in self.UNSUPPORTED.items():
            if name in self.model_fields_set and getattr(self, name) not in defaults:
                raise FieldError(f"`{name}` is not supported by this server (spectrum-local)",
                                 name)
        if self.response_format is not None and (not isinstance(self.response_format, dict)
                                                 or self.response_format.get("type") != "text"):
            raise FieldError("`response_format` is not supported by this server "
                             "(spectrum-local)", "response_format")
        if self.stream_options and not self.stream:
            raise FieldError("Stream options can only be defined when `stream=True`.",
                             "stream_options")
        if self.greedy and self.n > 1:
            raise FieldError(f"n must be 1 when using greedy sampling, got {self.n}.", "n")
        return self

    # -- the sampling in the engine's terms --------------------------------------------------------

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


class CompletionRequest(_SamplingRequest):
    UNSUPPORTED = {**_SamplingRequest.UNSUPPORTED, "suffix": (None, ""),
                   "prompt_embeds": (None,)}

    prompt: list[TokenId] | list[list[TokenId]] | str | list[str] | None = None
    echo: bool | None = False
    logprobs: int | None = None
    max_tokens: int | None = 16
    prompt_logprobs: int | None = None
    add_special_tokens: bool = True
    suffix: str | None = None
    prompt_embeds: Any = None

    @field_validator("logprobs", "prompt_logprobs")
    @classmethod
    def _logprobs(cls, value, info):
        if value is not None and value < 0 and value != -1:
            raise FieldError(f"`{info.field_name}` must be a positive value or -1.")
        return value

    @model_validator(mode="after")
    def _together(self):
        if self.prompt_logprobs is not None and self.stream and \
                (self.prompt_logprobs > 0 or self.prompt_logprobs == -1):
            raise FieldError("`prompt_logprobs` are not available when `stream=True`.",
                             "prompt_logprobs")
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


# -- chat ------------------------------------------------------------------------------------------

# Chat roles -> spectrum's: the system prompt describes the distribution, user turns are
# inputs, assistant turns are its outputs (examples); spectrum's own roles pass as they are.
CHAT_ROLES = {"system": "description", "developer": "description", "user": "input",
              "assistant": "output", "description": "description", "input": "input",
              "output": "output"}


class TextPart(_OpenAIModel):
    type: str
    text: str | None = None


class ChatMessage(_OpenAIModel):
    role: str
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        """The content as one text (text parts joined by newlines, as vLLM joins them)."""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text or "" for part in self.content or ())


class ChatCompletionRequest(_SamplingRequest):
    UNSUPPORTED = {**_SamplingRequest.UNSUPPORTED, "tools": (None, []),
                   "tool_choice": (None, "none"), "functions": (None, []),
                   "function_call": (None, "none"), "echo": (False,),
                   "prompt_logprobs": (None,), "chat_template": (None,),
                   "chat_template_kwargs": (None, {})}

    messages: list[ChatMessage]
    logprobs: bool | None = False
    top_logprobs: int | None = 0
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    # vLLM options this server does not implement: a 400 unless left at their default.
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    echo: bool = False
    prompt_logprobs: int | None = None
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _together(self):
        if self.top_logprobs is not None and self.top_logprobs < 0 and self.top_logprobs != -1:
            raise FieldError("`top_logprobs` must be a positive value or -1.", "top_logprobs")
        if self.top_logprobs and not self.logprobs:
            raise FieldError("when using `top_logprobs`, `logprobs` must be set to true.",
                             "top_logprobs")
        if self.continue_final_message and self.add_generation_prompt:
            raise FieldError("Cannot set both `continue_final_message` and "
                             "`add_generation_prompt` to True.", "continue_final_message")
        asked = self.asked_tokens
        if asked is not None and asked < 1:
            raise FieldError(f"max_tokens must be at least 1, got {asked}.", "max_tokens")
        if not self.messages:
            raise FieldError("messages must not be empty.", "messages")
        for i, message in enumerate(self.messages):
            if message.role not in CHAT_ROLES:
                raise FieldError(f"messages[{i}]: role {message.role!r} is not supported by "
                                 "this server (spectrum-local); roles are system or developer "
                                 "(the description), user (an input), assistant (an output), "
                                 "or spectrum's own description, input and output", "messages")
            parts = message.content if isinstance(message.content, list) else ()
            if message.content is None or any(p.type != "text" for p in parts):
                raise FieldError(f"messages[{i}]: content must be text (a string or text "
                                 "parts)", "messages")
        if self.continues and CHAT_ROLES[self.messages[-1].role] != "output":
            raise FieldError("the final message must be an assistant (output) message to "
                             "continue it: without add_generation_prompt, or with "
                             "continue_final_message, the reply continues that message",
                             "messages")
        return self

    # -- the request in the engine's terms --------------------------------------------------------

    @property
    def continues(self) -> bool:
        """The reply continues the final assistant message (vLLM's continue_final_message;
        add_generation_prompt false means the same here: a spectrum prompt ends in a turn)."""
        return self.continue_final_message or not self.add_generation_prompt

    @property
    def asked_tokens(self) -> int | None:
        """max_completion_tokens, else max_tokens; None: up to the end of the context."""
        return self.max_tokens if self.max_completion_tokens is None \
            else self.max_completion_tokens

    def spectrum_messages(self) -> tuple[list[dict], str]:
        """The messages in spectrum's roles, and the output text the reply continues."""
        messages = [{"role": CHAT_ROLES[m.role], "content": m.text()} for m in self.messages]
        if self.continues:
            return messages[:-1], messages[-1]["content"]
        return messages, ""


class TokenizeRequest(_OpenAIModel):
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool | None = False


class DetokenizeRequest(_OpenAIModel):
    model: str | None = None
    tokens: list[Annotated[int, Field(ge=0, le=INT64_MAX)]]
