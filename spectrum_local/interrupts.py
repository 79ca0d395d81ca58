"""Ctrl-C (and SIGTERM, for the CLI) as ``KeyboardInterrupt``, never lost inside a callback
from C.

llama.cpp calls its log callback, a Python function, dozens of times per decode. Python runs a
signal's handler between bytecodes of whatever Python code runs: often that callback. An
exception raised there cannot reach the caller (ctypes prints "Exception ignored" and drops
it), so a Ctrl-C during a long score was lost and the command ran on. ``raise_interrupt``
sees where it would land: inside a function marked ``@called_from_c`` (or anything it calls)
it sends the signal again a moment later instead, from another thread, so that it lands once
the callback has returned.
"""

from __future__ import annotations

import signal
import threading

_CALLBACKS: set = set()  # the code objects of Python functions that C calls
RETRY = 0.005  # seconds before a deferred signal is sent again (a callback takes microseconds)


def called_from_c(function):
    """Mark ``function`` as a callback from C: no interrupt is raised inside it."""
    _CALLBACKS.add(function.__code__)
    return function


def raise_interrupt(signum, frame) -> None:
    """A signal handler: ``KeyboardInterrupt``, deferred out of callbacks from C."""
    if _inside_callback(frame):
        threading.Timer(RETRY, signal.raise_signal, (signum,)).start()
        return
    raise KeyboardInterrupt


def _inside_callback(frame) -> bool:
    while frame is not None:
        if frame.f_code in _CALLBACKS:
            return True
        frame = frame.f_back
    return False


def guard_ctrl_c() -> None:
    """Use ``raise_interrupt`` for Ctrl-C where Python's default handler is in place (a script,
    the CLI); a handler someone installed (uvicorn's, a notebook's) is left alone."""
    if threading.current_thread() is threading.main_thread() and \
            signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, raise_interrupt)
