"""The Ollama API's request bodies (the fields of ollama's api/types.go and its Python client;
unknown fields ignored). Sampling options take their bounds from ``ops.SampleOptions``, as on
every route; options this server cannot honour are a 400 naming them when set to anything but
Ollama's neutral value; options about loading (num_gpu, num_thread, use_mmap ...) are ignored:
the model is loaded once, by ``spectrum-local serve``."""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, field_validator, model_validator

from ...backend import SamplerSettings
from ..errors import FieldError
from ..openai.protocol import CHAT_ROLES, MAX_LOGPROBS, MinP, Penalty, Temperature, TopP


class _OllamaModel(BaseModel):
    model_config = ConfigDict(extra="ignore")


def refuse_unless_neutral(model: BaseModel, neutral: dict[str, tuple], where: str = "") -> None:
    """A 400 naming the first field of ``neutral`` set to another value than its own."""
    for name, values in neutral.items():
        if getattr(model, name) not in (None, *values):
            raise FieldError(f"`{where}{name}` is not supported by this server (spectrum-local)",
                             f"{where}{name}")


class Options(_OllamaModel):
    """``options``: the sampler. Defaults are untruncated (temperature 1, no top-k, top-p or
    min-p): the distribution the model was trained to match, not Ollama's 0.8 / 40 / 0.9."""

    NEUTRAL: ClassVar[dict[str, tuple]] = {
        "presence_penalty": (0.0,), "frequency_penalty": (0.0,), "typical_p": (1.0,),
        "tfs_z": (1.0,), "mirostat": (0,), "repeat_last_n": (64,), "penalize_newline": (False,)}

    temperature: Temperature | None = None
    seed: int | None = None
    num_predict: int | None = None
    top_k: int | None = None
    top_p: TopP | None = None
    min_p: MinP | None = None
    repeat_penalty: Penalty | None = None
    stop: list[str] | None = None
    num_ctx: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    typical_p: float | None = None
    tfs_z: float | None = None
    mirostat: int | None = None
    repeat_last_n: int | None = None
    penalize_newline: bool | None = None

    @field_validator("num_predict")
    @classmethod
    def _num_predict(cls, value):
        if value is not None and value < 1 and value not in (-1, -2):
            raise FieldError(f"num_predict must be at least 1, or -1 (up to the end of the "
                             f"context), got {value}")
        return value

    @field_validator("stop")
    @classmethod
    def _stop(cls, stop):
        if stop and any(not s for s in stop):
            raise FieldError("stop cannot contain an empty string")
        return stop

    @model_validator(mode="after")
    def _neutral(self):
        refuse_unless_neutral(self, self.NEUTRAL, "options.")
        return self

    def sampler_settings(self, n_vocab: int) -> SamplerSettings:
        """llama.cpp's chain: temperature 0 is greedy; top_k <= 0 keeps every token."""
        top_k = self.top_k or 0
        return SamplerSettings(1.0 if self.temperature is None else self.temperature,
                               min(top_k, n_vocab) if top_k > 0 else 0,
                               1.0 if self.top_p is None else self.top_p,
                               self.min_p or 0.0,
                               1.0 if self.repeat_penalty is None else self.repeat_penalty)

    @property
    def max_tokens(self) -> int | None:
        """num_predict; None: up to the end of the context (-1, -2, or not given)."""
        return self.num_predict if self.num_predict and self.num_predict > 0 else None

    @property
    def sampling_seed(self) -> int | None:
        return None if self.seed is None or self.seed < 0 else self.seed


class _GenerateBase(_OllamaModel):
    """What /api/generate and /api/chat share."""

    NEUTRAL: ClassVar[dict[str, tuple]] = {"format": ("",), "think": (False,)}

    model: str = ""
    stream: bool | None = True
    options: Options = Options()
    format: Any = None
    keep_alive: Any = None  # the model stays loaded as long as the server runs
    think: bool | str | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = 0

    @model_validator(mode="after")
    def _shared(self):
        refuse_unless_neutral(self, self.NEUTRAL)
        if self.top_logprobs is not None and not 0 <= self.top_logprobs <= MAX_LOGPROBS:
            raise FieldError(f"top_logprobs must be between 0 and {MAX_LOGPROBS}, got "
                             f"{self.top_logprobs}", "top_logprobs")
        return self

    @property
    def streams(self) -> bool:
        return self.stream is not False  # Ollama streams unless told not to

    @property
    def wanted_logprobs(self) -> int | None:
        """Alternatives per generated token, or None: no log-probs."""
        return (self.top_logprobs or 0) if self.logprobs else None


class GenerateRequest(_GenerateBase):
    NEUTRAL = {**_GenerateBase.NEUTRAL, "suffix": ("",), "template": ("",), "context": ([],),
               "images": ([],)}

    prompt: str = ""
    system: str | None = None
    raw: bool | None = False
    suffix: str | None = None
    template: str | None = None
    context: list[int] | None = None
    images: list[Any] | None = None

    @model_validator(mode="after")
    def _generate(self):
        refuse_unless_neutral(self, self.NEUTRAL)
        return self

    def spectrum_messages(self) -> list[dict]:
        """system -> the description, prompt -> an input (as in a chat's user turn)."""
        messages = [{"role": "description", "content": self.system}] if self.system else []
        return messages + [{"role": "input", "content": self.prompt}] if self.prompt \
            else messages


class Message(_OllamaModel):
    role: str
    content: str | None = ""
    images: list[Any] | None = None
    tool_calls: list[Any] | None = None


class ChatRequest(_GenerateBase):
    NEUTRAL = {**_GenerateBase.NEUTRAL, "tools": ([],)}

    messages: list[Message] = []
    tools: list[Any] | None = None

    @model_validator(mode="after")
    def _chat(self):
        refuse_unless_neutral(self, self.NEUTRAL)
        for i, message in enumerate(self.messages):
            if message.role not in CHAT_ROLES:
                raise FieldError(f"messages[{i}]: role {message.role!r} is not supported by "
                                 "this server (spectrum-local); roles are system (the "
                                 "description), user (an input), assistant (an output), or "
                                 "spectrum's own description, input and output", "messages")
            if message.images or message.tool_calls:
                raise FieldError(f"messages[{i}]: only text content is supported by this "
                                 "server (spectrum-local)", "messages")
        return self

    def spectrum_messages(self) -> tuple[list[dict], str]:
        """The messages in spectrum's roles, and the output text the reply continues: as in
        Ollama, a final assistant message is continued rather than answered."""
        messages = [{"role": CHAT_ROLES[m.role], "content": m.content or ""}
                    for m in self.messages]
        if messages and messages[-1]["role"] == "output":
            return messages[:-1], messages[-1]["content"]
        return messages, ""


class ShowRequest(_OllamaModel):
    model: str = ""
    name: str = ""  # the older clients' field
