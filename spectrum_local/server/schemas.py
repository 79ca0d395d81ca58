"""Request bodies of the native endpoints: the Python API's arguments, typed. Unknown fields are
rejected (422), so a misspelt option never silently falls back to a default."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from . import MAX_N

MAX_CANDIDATES = 10_000
MAX_K = 1000
# enumerate: one request's search is bounded (each of its reads queues with other requests').
MAX_OUTPUTS = 1000
MAX_OUTPUT_TOKENS = 256
MAX_DECODED = 100_000


class Strict(BaseModel):
    # strict: "5" is not a number and 1.5 is not a count; extra: a misspelt field is an error.
    model_config = ConfigDict(extra="forbid", strict=True)


class Message(Strict):
    role: Literal["description", "input", "output"]
    content: str


class ScoreRequest(Strict):
    messages: list[Message]
    candidates: list[str] | str = Field(
        max_length=MAX_CANDIDATES,
        description='The candidate answers, or a spec as on the command line: "2..12", "a,b,c"')


class TopRequest(Strict):
    messages: list[Message]
    k: int = Field(10, ge=1, le=MAX_K)
    prefix: str = ""


class EnumerateRequest(Strict):
    messages: list[Message]
    coverage: float = Field(0.95, gt=0, le=1)
    min_prob: float = Field(0.0, ge=0, le=1)
    max_outputs: int = Field(100, ge=1, le=MAX_OUTPUTS)
    max_tokens: int = Field(32, ge=1, le=MAX_OUTPUT_TOKENS)
    max_decoded: int = Field(20_000, ge=0, le=MAX_DECODED,
                             description="Budget: tokens decoded in all (a server-wide cap "
                                         "keeps one request from holding the model for long)")


class SampleRequest(Strict):
    messages: list[Message]
    n: int = Field(1, ge=1, le=MAX_N)
    max_tokens: int = 256
    seed: int | None = None
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repeat_penalty: float = 1.0
    stream: bool = Field(False, description="Send one server-sent event per finished sample")
