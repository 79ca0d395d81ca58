"""``spectrum-local serve``: one loaded model behind HTTP for desktop tools and other clients.

- ``app.py``     the ASGI app: native routes (one per operation), auth, error handlers, the page
- ``guard.py``   what a request must be before any route runs (Host, Origin, JSON, size, time)
- ``errors.py``  the error body
- ``schemas.py`` the request bodies of the native routes (typed, unknown fields rejected)
- ``openai.py``  the OpenAI/vLLM-compatible routes (/v1/completions, /v1/models, /tokenize, ...)
- ``static/``    the web page at ``/`` (self-contained: no CDN)

Routes are thin: they validate, then call the Python API (``SpectrumModel``) in a worker thread.
The model's backend is a ``Scheduler``, which merges concurrent requests into shared decodes.
"""

from __future__ import annotations

import ipaddress
import socket
import sys

from ..errors import InputError

# Samples per request on a shared service (the Python API allows more, see model.MAX_SAMPLES;
# a remote.ServedModel splits larger n into requests of this size).
MAX_N = 256


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a bind address, or the name in a Host header) is this machine only."""
    name = host.strip("[]").rstrip(".").lower()
    if name == "localhost" or name.endswith(".localhost"):  # RFC 6761: always loopback
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def check_address(host: str, port: int) -> None:
    """Fail before the model loads if ``host:port`` cannot be listened on (a port in use, an
    address this machine does not have), with one line instead of uvicorn's log."""
    try:
        family, kind, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
            probe.bind(address)
    except OSError as e:
        raise InputError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def serve(model, *, host: str, port: int, api_key: str | None, cors_origins: tuple[str, ...],
          allowed_hosts: tuple[str, ...], timeout: float, grace: float) -> None:
    """Serve ``model`` until Ctrl-C or SIGTERM; then stop accepting, give requests in flight
    ``grace`` seconds, and return. The Host header is checked on a loopback bind, or when
    ``allowed_hosts`` names the server's names on the network (see ``guard``)."""
    import uvicorn

    from ..scheduler import Scheduler
    from .app import create_app
    from .guard import GuardedH11

    shown = f"[{host}]" if ":" in host else host
    print(f"spectrum-local: serving {model.path} ({model.format} format) at http://{shown}:{port}/ "
          "(the page; API docs at /docs)", file=sys.stderr, flush=True)
    with Scheduler(model.engine) as scheduler:
        checked = allowed_hosts if is_loopback(host) or allowed_hosts else None
        app = create_app(model.using(scheduler), api_key=api_key, cors_origins=cors_origins,
                         allowed_hosts=checked, timeout=timeout)
        config = uvicorn.Config(app, host=host, port=port, timeout_graceful_shutdown=grace,
                                http=GuardedH11.with_timeout(timeout), log_level="info",
                                access_log=False)
        try:
            uvicorn.Server(config).run()
        except KeyboardInterrupt:  # uvicorn re-raises the signal it shut down for: done
            pass
