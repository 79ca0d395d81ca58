"""The spectrum prompt format of each model family, and the one place that renders messages.

A prompt is rendered as *segments*: runs of plain text and single control tokens. Message
content only ever lands in text segments, so a string like ``<end_of_turn>`` inside a
description stays text and can never close a turn (see ``tokenize`` in model.py).

Each family's Jinja chat template (embedded in GGUFs by the converter) is generated from the
same fields, and a test checks that it renders exactly ``Format.text(...)``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Iterable, Mapping, NamedTuple

from .errors import InputError
from .textfile import check_unicode

ROLES = ("description", "input", "output")


class Segment(NamedTuple):
    text: str
    is_control: bool


@dataclass(frozen=True)
class Message:
    role: str
    content: str


@dataclass(frozen=True)
class Format:
    """One family's turn markers. A turn is rendered as
    ``turn_open`` role [``role_close``] ``after_role`` content ``end_of_output`` ``after_turn``;
    the markers in ``turn_open``, ``role_close``, ``end_of_output`` and ``bos`` are control tokens."""

    name: str
    architectures: tuple[str, ...]  # GGUF general.architecture values of this family
    bos: str | None
    turn_open: str
    role_close: str | None
    after_role: str
    end_of_output: str
    after_turn: str

    @property
    def control_tokens(self) -> tuple[str, ...]:
        markers = (self.bos, self.turn_open, self.role_close, self.end_of_output)
        return tuple(m for m in markers if m)

    def _turn_head(self, role: str) -> list[Segment]:
        head = [Segment(self.turn_open, True), Segment(role, False)]
        if self.role_close:
            head.append(Segment(self.role_close, True))
        head.append(Segment(self.after_role, False))
        return head

    def render(self, messages: Iterable[Message], *, output_prefix: str | None = "",
               candidate: str | None = None) -> list[Segment]:
        """Segments for ``messages`` followed by one of:
        - the generation prompt plus ``output_prefix`` (the default: what the model continues);
        - with ``candidate``: a closed output turn holding it, ending at the end-of-output token
          (the tokens whose probability ``score`` measures);
        - with ``output_prefix=None`` and no candidate: nothing (the conversation alone).
        """
        segments: list[Segment] = [Segment(self.bos, True)] if self.bos else []
        for message in messages:
            segments += self._turn_head(message.role)
            segments += [Segment(message.content, False), Segment(self.end_of_output, True),
                         Segment(self.after_turn, False)]
        if candidate is not None:
            segments += self._turn_head("output")
            segments += [Segment(candidate, False), Segment(self.end_of_output, True)]
        elif output_prefix is not None:
            segments += self._turn_head("output")
            segments.append(Segment(output_prefix, False))
        return merge_text(segments)

    @staticmethod
    def text(segments: Iterable[Segment]) -> str:
        return "".join(s.text for s in segments)

    @property
    def chat_template(self) -> str:
        """Jinja template that renders exactly ``text(render(messages))`` (with
        add_generation_prompt) or ``text(render(messages, output_prefix=None))`` (without)."""

        def head(role_expr: str) -> str:
            return (_jinja_text(self.turn_open) + role_expr
                    + _jinja_text((self.role_close or "") + self.after_role))

        roles = ", ".join(f"'{r}'" for r in ROLES)
        return (
            (_jinja_text(self.bos) if self.bos else "")
            + "{%- for message in messages -%}"
            + f"{{%- if message['role'] not in [{roles}] -%}}"
            + "{{- raise_exception('spectrum models accept only the roles description, input"
            + " and output, not ' + message['role']) -}}"
            + "{%- endif -%}"
            + head("{{- message['role'] -}}")
            + "{{- message['content'] -}}"
            + _jinja_text(self.end_of_output + self.after_turn)
            + "{%- endfor -%}"
            + "{%- if add_generation_prompt -%}" + head(_jinja_text("output")) + "{%- endif -%}"
        )


def _jinja_text(text: str) -> str:
    # Literal text as a Jinja expression, so that whitespace control never trims it.
    return "{{- " + repr(text) + " -}}" if text else ""


def merge_text(segments: Iterable[Segment]) -> list[Segment]:
    """Join adjacent text segments and drop empty ones: a tokenizer sees each run of text
    between control tokens as one string, as the reference tokenizers do."""
    merged: list[Segment] = []
    for seg in segments:
        if not seg.text:
            continue
        if not seg.is_control and merged and not merged[-1].is_control:
            merged[-1] = Segment(merged[-1].text + seg.text, False)
        else:
            merged.append(seg)
    return merged


GEMMA3 = Format(
    name="gemma3", architectures=("gemma3", "gemma3n", "gemma2", "gemma"), bos="<bos>",
    turn_open="<start_of_turn>", role_close=None, after_role="\n",
    end_of_output="<end_of_turn>", after_turn="\n",
)
QWEN3 = Format(
    name="qwen3", architectures=("qwen3", "qwen3moe", "qwen2"), bos=None,
    turn_open="<|im_start|>", role_close=None, after_role="\n",
    end_of_output="<|im_end|>", after_turn="\n",
)
LLAMA3 = Format(
    name="llama3", architectures=("llama",), bos="<|begin_of_text|>",
    turn_open="<|start_header_id|>", role_close="<|end_header_id|>", after_role="\n\n",
    end_of_output="<|eot_id|>", after_turn="",
)
FORMATS = {f.name: f for f in (GEMMA3, LLAMA3, QWEN3)}


def get_format(name: str) -> Format:
    try:
        return FORMATS[name]
    except KeyError:
        raise InputError(f"unknown format {name!r}; choose one of {', '.join(FORMATS)}") from None


def detect(metadata: Mapping[str, str]) -> Format:
    """The family of a GGUF: its ``spectrum.format`` key if present, else its architecture."""
    if "spectrum.format" in metadata:
        return get_format(metadata["spectrum.format"])
    arch = metadata.get("general.architecture", "")
    for fmt in FORMATS.values():
        if arch in fmt.architectures:
            return fmt
    raise InputError(
        f"cannot tell the spectrum format of architecture {arch!r}; "
        f"pass --format ({', '.join(FORMATS)})")


def parse_messages(messages: Iterable[Mapping[str, object] | Message]) -> list[Message]:
    """Validate ``[{"role", "content"}, ...]``; warn when the prompt has neither a description
    nor an output example (the model still runs, but its output is unreliable)."""
    parsed = []
    for i, m in enumerate(messages):
        if isinstance(m, Message):
            role, content = m.role, m.content
        elif isinstance(m, Mapping):
            role, content = m.get("role"), m.get("content")
        else:
            raise InputError(f"message {i}: expected an object with role and content, got {m!r}")
        if role not in ROLES:
            raise InputError(f"message {i}: unknown role {role!r}; roles are {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise InputError(f"message {i}: content must be a string, got {content!r}")
        check_unicode(content, f"message {i}'s content")
        parsed.append(Message(role, content))
    if not parsed:
        raise InputError("no messages: give a description (-d), example inputs and outputs "
                         "(-i/-o) or a messages file")
    if not any(m.role in ("description", "output") for m in parsed):
        warnings.warn("the prompt has no description and no output example; "
                      "the model's output will be unreliable", UserWarning, stacklevel=3)
    return parsed
