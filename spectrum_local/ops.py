"""One definition of each operation's options: their types, bounds, defaults and help.

Every front end derives from these models instead of writing the options out again: the
Python API (``SpectrumModel.sample`` etc. validate their arguments with ``check``), the CLI's
options (``cli.options.from_model``), the batch line fields, the remote client's request
bodies (``model_dump``) and the server's request models (``served()``: the same fields under
the per-request caps of a shared service). So a new option is one field here, and a bad value
gets the same one-line message everywhere: an ``InputError`` from the API, the batch and the
remote client, exit 2 on the command line, a 400 over HTTP (``error_message`` turns the
errors of a ``ValidationError`` -- or of FastAPI's ``RequestValidationError`` -- into it).

Validation is strict: "5" is not a number, 1.5 is not a count, True is neither. Integers and
floats of other types (numpy's) are accepted as the numbers they are.

Also here, because front ends must not import the llama.cpp layer for them: the limits of a
model load (``LoadOptions``) and the weight types the converter writes (``OUTTYPES``).
"""

from __future__ import annotations

import functools
import numbers
from copy import copy
from typing import Annotated, ClassVar, Iterable, Mapping, get_origin

from annotated_types import Le, MaxLen
from pydantic import (AllowInfNan, BaseModel, BeforeValidator, ConfigDict, Field,
                      ValidationError, create_model)

from . import candidates as candidate_specs
from .errors import InputError
from .textfile import check_unicode

# -- limits ---------------------------------------------------------------------------------

# Samples per call: n=10**6 is hours of decoding, not a request anyone means to make in one call.
MAX_SAMPLES = 10_000
# llama.cpp 0.3.36's GGML_MAX_N_THREADS (ggml.h): more threads than OpenMP can start aborts.
MAX_THREADS = 512
MIN_CTX = 32  # llama.cpp rounds the cells up to 256, but decodes at most ctx tokens at a time
MAX_LORA_SCALE = 100  # far past the scales adapters are trained for, activations overflow

# The caps of one request to a shared service (``spectrum-local serve``), below the API's own
# bounds: each keeps one client from holding the model for long (a ``remote.ServedModel``
# splits a larger n into requests of SERVER_MAX_N).
SERVER_MAX_N = 256
SERVER_MAX_K = 1000
SERVER_MAX_CANDIDATES = 10_000
SERVER_MAX_OUTPUTS = 1000  # enumerate
SERVER_MAX_OUTPUT_TOKENS = 256  # enumerate
SERVER_MAX_DECODED = 100_000  # enumerate

# Weight types of a converted GGUF: written directly, or made by llama.cpp's quantizer.
FLOAT_TYPES = ("f32", "f16", "bf16")
QUANTIZED_TYPES = ("q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0")
OUTTYPES = (*FLOAT_TYPES, *QUANTIZED_TYPES)


# -- value types ----------------------------------------------------------------------------

def _plain_int(value):
    """numpy's integers as ints (strict validation would refuse them); bools stay refused."""
    if isinstance(value, numbers.Integral) and not isinstance(value, (bool, int)):
        return int(value)
    return value


def _plain_float(value):
    if isinstance(value, numbers.Real) and not isinstance(value, (bool, int, float)):
        return float(value)
    return value


def _candidate_list(value):
    """A spec string ("2..12", "a,b,c"), as the command line, a batch line and HTTP give it,
    becomes its list; a list is checked to hold no empty candidate."""
    if isinstance(value, str):
        value = candidate_specs.parse_spec(value)  # InputError (a ValueError): one message
    if isinstance(value, list):
        if not value:
            raise ValueError("no candidates to score")
        if "" in value:
            raise ValueError("a candidate is the empty string; an empty output is not scored "
                             "(remove it, e.g. a stray comma in --candidates)")
        check_unicode(value, "a candidate")
    return value


Count = Annotated[int, BeforeValidator(_plain_int)]
Number = Annotated[float, AllowInfNan(False), BeforeValidator(_plain_float)]
Candidates = Annotated[list[str], BeforeValidator(_candidate_list,
                                                  json_schema_input_type=list[str] | str)]


# -- the options ----------------------------------------------------------------------------

class Options(BaseModel):
    """The options of one operation. ``check(**values)`` validates them or raises one
    ``InputError`` line; ``served()`` is the same model under the server's caps."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    # field -> its cap on a shared service (an upper bound on a number, or on a list's length)
    server_caps: ClassVar[Mapping[str, int]] = {}

    @classmethod
    def check(cls, **values):
        """The options, validated: ``InputError`` (one line naming the option and the bound)
        for a bad value or an unknown name."""
        try:
            return cls(**values)
        except ValidationError as e:
            raise InputError(error_message(e.errors())) from None

    @classmethod
    @functools.cache
    def served(cls) -> type["Options"]:
        """This model with ``server_caps`` as the fields' upper bounds: what one request to
        ``spectrum-local serve`` may ask. Request models derive from it (adding messages)."""
        fields = {}
        for name, cap in cls.server_caps.items():
            field = copy(cls.model_fields[name])
            bound = MaxLen(cap) if get_origin(field.annotation) is list else Le(cap)
            # In place of the API's bound (or first): then it is a constraint of the JSON
            # schema ("maximum"), not a check after the other validators.
            kept = [m for m in field.metadata if type(m) is not type(bound)]
            at = next((i for i, m in enumerate(field.metadata) if type(m) is type(bound)), 0)
            field.metadata = kept[:at] + [bound] + kept[at:]
            fields[name] = (field.annotation, field)
        return create_model(f"Served{cls.__name__}", __base__=cls, __doc__=cls.__doc__,
                            **fields)


class SampleOptions(Options):
    """Options of ``sample``: how many outputs, how long, and the sampler's settings."""

    n: Count = Field(1, ge=1, le=MAX_SAMPLES, description="How many i.i.d. outputs.")
    # Larger than the room left in the context is cut there by the engine.
    max_tokens: Count = Field(256, ge=1, description="Stop an output after this many tokens.")
    # Any whole number: its low 32 bits seed llama.cpp.
    seed: Count | None = Field(None, description="Makes runs reproducible (sample i is seeded "
                                                 "seed + i).")
    temperature: Number = Field(1.0, ge=0, description="1 is the model's own distribution; "
                                                       "0 is greedy.")
    top_k: Count = Field(0, ge=0, description="Keep only the k most likely tokens (0: off).")
    top_p: Number = Field(1.0, gt=0, le=1, description="Nucleus truncation (1: off).")
    min_p: Number = Field(0.0, ge=0, le=1, description="Drop tokens below min-p x the top "
                                                       "probability (0: off).")
    repeat_penalty: Number = Field(1.0, gt=0, description="Penalise repeated tokens (1: off).")

    server_caps: ClassVar[Mapping[str, int]] = {"n": SERVER_MAX_N}


class TopOptions(Options):
    """Options of ``top``: how many next tokens, after which output text."""

    k: Count = Field(10, ge=1, description="How many tokens to show.")
    prefix: str = Field("", description="Output text already written; show what follows it.")

    server_caps: ClassVar[Mapping[str, int]] = {"k": SERVER_MAX_K}


class ScoreOptions(Options):
    """Options of ``score``: the candidates, and whether each must end the output."""

    candidates: Candidates = Field(description=(
        'The candidate answers: a list, or a spec as on the command line ("2..12", "a,b,c").'))
    end_token: bool = Field(True, description=(
        "Score each candidate followed by the end-of-output token (off: as the paper's "
        "evaluation scripts do, a candidate's probability includes every longer output it "
        "begins)."))

    server_caps: ClassVar[Mapping[str, int]] = {"candidates": SERVER_MAX_CANDIDATES}


class EnumerateOptions(Options):
    """Options of ``enumerate``: when the best-first search stops."""

    coverage: Number = Field(0.95, gt=0, le=1, description=(
        "Stop once the outputs listed hold this much of the model's probability."))
    min_prob: Number = Field(0.0, ge=0, le=1, description=(
        "List only outputs at least this likely; stop when none left can be."))
    max_outputs: Count = Field(100, ge=1, description="List at most this many outputs.")
    max_tokens: Count = Field(32, ge=1, description=(
        "Longest output followed, in tokens (longer ones count as cut)."))
    max_decoded: Count = Field(20_000, ge=0, description=(
        "The search's budget of decoded tokens, checked before each read."))

    server_caps: ClassVar[Mapping[str, int]] = {
        "max_outputs": SERVER_MAX_OUTPUTS, "max_tokens": SERVER_MAX_OUTPUT_TOKENS,
        "max_decoded": SERVER_MAX_DECODED}


class LoadOptions(Options):
    """The numbers of a model load that reach llama.cpp (past its limits it asserts, killing
    the process, or ctypes silently wraps the value)."""

    ctx: Count | None = Field(None, ge=MIN_CTX, description=(
        "Context size in tokens: prompt plus what is scored or sampled. Default: 4096, or "
        "the model's trained length if smaller."))
    threads: Count | None = Field(None, ge=1, le=MAX_THREADS,
                                  description="CPU threads (default: all cores).")
    gpu_layers: Count | None = Field(None, ge=-1, description=(
        "Layers to offload to the GPU (-1: all). Default: all when llama.cpp was built with "
        "Metal or CUDA, else 0."))
    batch: Count = Field(512, ge=4, description=(
        "Tokens per llama.cpp decode (it also bounds the sequences: the prompt cache, its "
        "two pins and at least one path)."))


OPERATIONS: dict[str, type[Options]] = {
    "sample": SampleOptions, "top": TopOptions, "score": ScoreOptions,
    "enumerate": EnumerateOptions}


# -- one message ----------------------------------------------------------------------------

def error_message(errors: Iterable[Mapping]) -> str:
    """One line for the errors of a pydantic ``ValidationError`` (``e.errors()``), naming each
    option and what it must be: "max_tokens must be at least 1, got 0". A request body's
    leading "body" is left out of the names, so HTTP says what the API says."""
    unknown, problems = [], []
    for error in errors:
        loc = list(error.get("loc", ()))
        if loc[:1] == ["body"]:
            loc = loc[1:]
        name = _name(loc)
        if error["type"] == "extra_forbidden":
            unknown.append(name)
        else:
            problems.append(_problem(name, error))
    if unknown:
        problems.insert(0, f"unknown field(s): {', '.join(unknown)}")
    return "; ".join(problems)


def _name(loc: list) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else f".{part}" if text else str(part)
    return text


_BOUNDS = {"greater_than_equal": ("ge", "at least"), "greater_than": ("gt", "greater than"),
           "less_than_equal": ("le", "at most"), "less_than": ("lt", "less than")}
_KINDS = {"int_type": "a whole number", "int_from_float": "a whole number",
          "int_parsing": "a whole number", "float_type": "a number", "float_parsing": "a number",
          "finite_number": "a finite number", "bool_type": "true or false",
          "string_type": "a string", "list_type": "a list", "dict_type": "an object",
          "model_type": "an object", "model_attributes_type": "an object"}


def _problem(name: str, error: Mapping) -> str:
    kind, ctx, value = error["type"], error.get("ctx") or {}, error.get("input")
    if kind in _BOUNDS:
        key, words = _BOUNDS[kind]
        bound = ctx[key]
        if isinstance(bound, float) and bound.is_integer():
            bound = int(bound)  # 0, not 0.0: the bound as written
        return f"{name} must be {words} {bound}, got {value!r}"
    if kind in _KINDS:
        return f"{name} must be {_KINDS[kind]}, got {_short(value)}"
    if kind in ("too_long", "too_short"):
        bound = (f"at most {ctx['max_length']}" if kind == "too_long"
                 else f"at least {ctx['min_length']}")
        return f"{name} must hold {bound} item(s), got {ctx.get('actual_length')}"
    if kind == "missing":
        return f"{name} is required"
    if kind == "literal_error":
        return f"{name} must be {ctx['expected']}, got {_short(value)}"
    message = str(error.get("msg", kind)).removeprefix("Value error, ")
    return message if kind == "value_error" or not name else f"{name}: {message}"


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
