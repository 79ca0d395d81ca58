"""The two kinds of error the runtime raises; the CLI turns them into one line and an exit code."""


class SpectrumError(Exception):
    """Something went wrong running the model (exit code 1)."""


class InputError(SpectrumError, ValueError):
    """The caller's input is invalid: messages, candidates, options (exit code 2)."""
