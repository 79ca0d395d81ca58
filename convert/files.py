"""Output files that are complete or absent: staged under a hidden temporary name, renamed last.

A conversion writes ``.NAME.XXXXXXXX.part`` beside the target NAME and renames it onto NAME only
after the file was written, flushed to disk and read back. So, whatever stops a run:
- an error, Ctrl-C (KeyboardInterrupt) or a full disk: the temporary file is removed;
- SIGKILL or power loss: NAME is absent (or the old file, with --force), never half-written;
  the hidden ``.part`` file may stay. Each run holds an flock on its temporary files, and the
  next run for the same target removes the unlocked ones (left by a dead run).
"""

from __future__ import annotations

import errno
import glob
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from spectrum_local.errors import SpectrumError

try:
    import fcntl
except ImportError:  # Windows: no locks, so stale temporary files are left alone
    fcntl = None
try:
    import resource
except ImportError:
    resource = None

DISK_FULL = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}
LOW_SPACE = 16 << 20  # free bytes below which a failed write is taken as a full disk


@contextmanager
def temporary(path: Path) -> Iterator[Path]:
    """A hidden, locked temporary file beside ``path``, removed when the block ends."""
    fd, tmp = _create_locked(path)
    try:
        yield tmp
    except OSError as e:
        raise write_error(path, e, tmp) from None
    finally:
        tmp.unlink(missing_ok=True)
        os.close(fd)  # releases the lock


@contextmanager
def staged(path: Path) -> Iterator[Path]:
    """A temporary file beside ``path``, renamed onto it only if the block succeeds."""
    with temporary(path) as tmp:
        yield tmp
        # On disk before the rename makes it visible, else a power loss can leave a
        # complete-looking file full of zeros under the final name.
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)


def write_error(path: Path, e: OSError, tmp: Path | None = None) -> SpectrumError:
    # numpy reports a short write as an OSError with no errno ("N requested and M written")
    if e.errno in DISK_FULL or (e.errno is None and tmp is not None and out_of_space(tmp)):
        return disk_full(path, f": {e.strerror or e}")
    return SpectrumError(f"cannot write {path}: {e.strerror or e}")


def disk_full(path: Path, detail: str) -> SpectrumError:
    return SpectrumError(f"no space left on the device or file too large while writing "
                         f"{path}{detail}")


def out_of_space(path: Path) -> bool:
    """Whether a write to ``path`` (done by code that does not report errno, i.e. llama.cpp)
    most likely stopped at the file size limit or a full disk."""
    size = path.stat().st_size if path.exists() else 0
    if resource is not None:
        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        if limit != resource.RLIM_INFINITY and size >= limit:
            return True
    return shutil.disk_usage(path.parent).free < LOW_SPACE


def remove_stale_temps(path: Path) -> None:
    """Remove temporary files of ``path`` left by a killed run. A running conversion holds an
    flock on its own, so two runs for the same target do not delete each other's file."""
    if fcntl is None:
        return
    for name in glob.glob(glob.escape(str(path.parent / f".{path.name}.")) + "*.part"):
        try:
            with open(name, "rb") as f:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                os.unlink(name)
        except OSError:
            continue  # locked (a live run) or already gone


def _create_locked(path: Path) -> tuple[int, Path]:
    try:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    except OSError as e:
        raise write_error(path, e) from None
    # mkstemp makes the file 0600; the finished model gets the usual umask permissions
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)
    if fcntl is not None:
        fcntl.flock(fd, fcntl.LOCK_EX)
    return fd, Path(name)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # not possible on every platform (Windows); the rename itself has happened
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
