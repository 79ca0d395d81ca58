"""Ctrl-C is never lost inside a callback from C (``spectrum_local.interrupts``): llama.cpp calls
its Python log callback dozens of times per decode, and an exception raised there is dropped by
ctypes. libc's ``qsort`` with a Python comparator stands in for llama.cpp here: it runs Python
only inside callbacks, so a signal sent during it is handled inside one."""

from __future__ import annotations

import ctypes
import signal
import time

import pytest

from spectrum_local.interrupts import called_from_c, raise_interrupt

Compare = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_int),
                           ctypes.POINTER(ctypes.c_int))


def sort_with_a_ctrl_c(handler) -> bool:
    """Sort with a Python comparator that sends SIGINT at its first call, under ``handler``;
    whether a KeyboardInterrupt reached this code (during the sort or just after it)."""
    sent = []

    @called_from_c
    def compare(a, b):
        if not sent:
            sent.append(True)
            signal.raise_signal(signal.SIGINT)
        return a[0] - b[0]

    values = (ctypes.c_int * 20_000)(*reversed(range(20_000)))
    previous = signal.signal(signal.SIGINT, handler)
    try:
        ctypes.CDLL(None).qsort(values, len(values), ctypes.sizeof(ctypes.c_int),
                                Compare(compare))
        assert list(values[:3]) == [0, 1, 2]  # the sort finished: the C code was not cut
        time.sleep(1)  # a deferred interrupt lands here, a moment after the sort
        return False
    except KeyboardInterrupt:
        return True
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_python_loses_a_ctrl_c_raised_inside_a_callback():
    """The control: with Python's own handler the interrupt vanishes (ctypes prints it)."""
    assert not sort_with_a_ctrl_c(signal.default_int_handler)


def test_raise_interrupt_delivers_it_once_the_callback_has_returned():
    assert sort_with_a_ctrl_c(raise_interrupt)
