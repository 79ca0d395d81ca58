"""A real ``spectrum-local serve`` in a subprocess on a free loopback port, for the tests."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(args: list[str] = (), *, api_key: str | None = None, timeout: float = 600):
    """Yield the base URL of ``spectrum-local serve`` started with ``args``; SIGTERM it after."""
    port = free_port()
    with running(serve_command(args, port), port, "/health", env=serve_env(api_key),
                 timeout=timeout) as url:
        yield url


def serve_command(args: list[str], port: int) -> list[str]:
    return [sys.executable, "-m", "spectrum_local", "serve", "--port", str(port), *args]


def serve_env(api_key: str | None = None) -> dict:
    env = dict(os.environ)
    env.pop("SPECTRUM_LOCAL_API_KEY", None)
    if api_key:
        env["SPECTRUM_LOCAL_API_KEY"] = api_key
    return env


@contextlib.contextmanager
def running(command: list[str], port: int, health: str, *, env=None, timeout: float = 600):
    """Run a server ``command`` listening on loopback ``port``; yield its URL once ``health``
    answers 200; SIGTERM it afterwards."""
    proc = start(command, port, health, env=env, timeout=timeout)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(proc)


def start(command: list[str], port: int, health: str, *, env=None,
          timeout: float = 600) -> subprocess.Popen:
    """Start a server ``command`` and return it once ``health`` on ``port`` answers 200."""
    # Output goes to a file, not a pipe: a server that logs more than a pipe holds while
    # nobody reads it would block on its next write.
    log = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    proc.log = log
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{command[2:4]} exited with {proc.returncode}:\n{output(proc)}")
        try:
            if httpx.get(url + health, timeout=10).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            stop(proc)
            raise RuntimeError(f"{command[2:4]} did not answer {health} in time")
        time.sleep(0.2)


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    """Stop a server started by ``start`` (SIGKILL: as if it crashed)."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    proc.log.close()


def output(proc: subprocess.Popen) -> str:
    """What a server started by ``start`` has printed so far."""
    proc.log.seek(0)
    return proc.log.read()
