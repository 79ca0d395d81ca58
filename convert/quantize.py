"""llama.cpp's quantizer, run in a child process.

Why a child: llama_model_quantize is one C call that runs for minutes on a real model. In this
process a Ctrl-C would only be seen when it returns, and a crash inside it (an abort) would
take the converter down with no message and no clean-up. The child is killed on Ctrl-C (and,
on Linux, when the converter dies), and any failure becomes one SpectrumError.

Measured with llama.cpp 0.3.36 under RLIMIT_FSIZE (SIGXFSZ ignored): a failed write does not
abort; the quantizer catches its iostream error and returns 1 ("failed to quantize:
basic_ios::clear: iostream error"), leaving a partial file that the caller removes.
"""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from spectrum_local.errors import SpectrumError

from .files import disk_full, out_of_space

FAILED = "failed to quantize:"  # llama.cpp's log line when llama_model_quantize returns an error


def quantize(src: Path, dst: Path, outtype: str, target: Path, progress: bool) -> None:
    """Quantize ``src`` into ``dst`` (a temporary file for ``target``, named in errors)."""
    if progress:
        print(f"quantizing to {outtype.upper()} with llama.cpp ...", file=sys.stderr)
    start = time.monotonic()
    verbose = bool(os.environ.get("SPECTRUM_LOCAL_VERBOSE"))
    # The engine prints llama.cpp's log to stdout when verbose: always on in the child, so its
    # error line can be reported; shown here only if the user asked for it.
    child = subprocess.Popen(
        [sys.executable, "-m", __name__, str(src), str(dst), outtype, str(os.getpid())],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        env={**os.environ, "SPECTRUM_LOCAL_VERBOSE": "1"}, text=True, errors="replace")
    tail: collections.deque[str] = collections.deque(maxlen=40)
    try:
        for line in child.stdout:
            tail.append(line)
            if verbose:
                sys.stderr.write(line)
        code = child.wait()
    finally:
        if child.poll() is None:  # Ctrl-C (KeyboardInterrupt) while it runs
            child.kill()
            child.wait()
        child.stdout.close()
    if code != 0:
        raise _failure(code, "".join(tail), outtype, target, dst)
    if progress:
        print(f"quantized in {time.monotonic() - start:.0f} s", file=sys.stderr)


def _failure(code: int, log: str, outtype: str, target: Path, dst: Path) -> SpectrumError:
    if code < 0:
        what = f"was killed by {signal.Signals(-code).name}"
    else:
        lines = [ln.strip() for ln in log.splitlines() if ln.strip()]
        reason = next((ln.split(FAILED, 1)[1].strip() for ln in reversed(lines) if FAILED in ln),
                      lines[-1] if lines else f"exit code {code}")
        what = f"failed: {reason}"
    if out_of_space(dst):
        return disk_full(target, f" (llama.cpp's quantizer {what})")
    return SpectrumError(f"llama.cpp's quantizer {what} (making {outtype} {target})")


def _child(src: str, dst: str, outtype: str, parent: str) -> None:
    if sys.platform == "linux":  # die with the converter: prctl(PR_SET_PDEATHSIG, SIGKILL)
        import ctypes
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)
        if os.getppid() != int(parent):  # it died before the prctl
            sys.exit(1)
    from spectrum_local.llama import quantize as llama_quantize
    try:
        llama_quantize(src, dst, outtype)
    except SpectrumError as e:
        print(e, flush=True)
        sys.exit(1)


if __name__ == "__main__":
    _child(*sys.argv[1:])
