"""The two kinds of error the runtime raises; the CLI turns them into one line and an exit code."""

import numbers


class SpectrumError(Exception):
    """Something went wrong running the model (exit code 1)."""


class InputError(SpectrumError, ValueError):
    """The caller's input is invalid: messages, candidates, options (exit code 2)."""


class Cancelled(SpectrumError):
    """The caller cancelled the call (its client went away, or Ctrl-C): nothing to answer."""


def check_int(name: str, value, low: int | None = None, high: int | None = None) -> None:
    """An InputError naming ``name`` unless ``value`` is a whole number in [low, high]."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise InputError(f"{name} must be a whole number, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        bound = (f"between {low} and {high}" if low is not None and high is not None
                 else f"at least {low}" if low is not None else f"at most {high}")
        raise InputError(f"{name} must be {bound}, got {value}")
