"""Request bodies of the native endpoints: the messages, then the operation's options as
``ops`` defines them under the server's per-request caps (``Options.served()``), so a bad value
gets the message the Python API and the command line give, here as a 400. Unknown fields are
refused, so a misspelt option never silently falls back to a default."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from .. import ops


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    role: Literal["description", "input", "output"]
    content: str


class _Messages(BaseModel):
    messages: list[Message]

    def message_list(self) -> list[dict]:
        return [m.model_dump() for m in self.messages]

    def options(self) -> dict:
        """The operation's keyword arguments: every field but the messages and the stream."""
        return self.model_dump(exclude={"messages", "stream"})


class ScoreRequest(_Messages, ops.ScoreOptions.served()):
    pass


class TopRequest(_Messages, ops.TopOptions.served()):
    pass


class EnumerateRequest(_Messages, ops.EnumerateOptions.served()):
    pass


class SampleRequest(_Messages, ops.SampleOptions.served()):
    stream: bool = Field(False, description="Send one server-sent event per finished sample")
