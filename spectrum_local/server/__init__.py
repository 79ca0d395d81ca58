"""``spectrum-local serve``: one loaded model behind HTTP for desktop tools and other clients.

- ``app.py``      ``create_app``: the guard, the routers, the error mapper, the API key
- ``native.py``   the native routes, ``/spectrum/v1/*`` (one per operation), /health, the page
- ``schemas.py``  their request bodies: the messages and ``ops``' options under the server caps
- ``openai/``     the OpenAI/vLLM-compatible routes, completions and chat: ``protocol.py``
  (request models and their validators), ``serving.py`` (plan and generation),
  ``logprobs.py`` and ``responses.py`` (vLLM's shapes), ``routes.py`` (thin)
- ``ollama/``     the Ollama API under /api/: its request models and routes, over the chat
  route's plan and generation
- ``bridge.py``   worker threads to the event loop: a call cancelled when its client goes away,
  and the one server-sent-event stream
- ``errors.py``   the one mapper from an exception to the error body and status
- ``guard.py``    what a request must be before any route runs (Host, Origin, JSON, size, time)
- ``hosts.py``    loopback names, and whether an address can be listened on
- ``static/``     the web page at ``/`` (self-contained: no CDN)

Modules import downwards only: app -> ollama -> native, openai -> bridge, schemas -> errors.
The model's backend is a ``Scheduler``, which merges concurrent requests into shared decodes.
"""

from __future__ import annotations

import asyncio
import sys
import time

from .hosts import check_address, is_loopback

__all__ = ["check_address", "is_loopback", "serve"]

# After the grace period, requests in flight are cancelled and answer what they have (a
# decode step away); past this many more seconds, uvicorn drops what still has not answered.
_LAST_RESORT = 30.0


def serve(model, *, host: str, port: int, api_key: str | None, cors_origins: tuple[str, ...],
          allowed_hosts: tuple[str, ...], timeout: float, grace: float,
          model_name: str | None = None, ollama_port: int | None = None) -> None:
    """Serve ``model`` (as ``model_name``, default its file name without .gguf) until Ctrl-C
    or SIGTERM; then stop accepting, give requests in flight ``grace`` seconds to finish,
    cancel those still running (samples end "abort", reads are a 503) and return once all
    have answered. The model is warmed up before the port opens; with ``ollama_port`` the app
    also listens there (Ollama's 11434, for tools that assume it). The Host header is checked
    on a loopback bind, or when ``allowed_hosts`` names the server's names on the network
    (see ``guard``)."""
    import uvicorn

    from ..scheduler import Scheduler
    from .app import create_app
    from .guard import GuardedH11

    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None):
            timer = asyncio.get_running_loop().call_later(grace, app.state.in_flight.cancel_all)
            try:
                await super().shutdown(sockets)
            finally:
                timer.cancel()

    shown = f"[{host}]" if ":" in host else host
    with Scheduler(model.engine) as scheduler:
        served = model.using(scheduler)
        checked = allowed_hosts if is_loopback(host) or allowed_hosts else None
        app = create_app(served, model_name=model_name, api_key=api_key,
                         cors_origins=cors_origins, allowed_hosts=checked, timeout=timeout)
        seconds = warm_up(served)
        also = f" and http://{shown}:{ollama_port}/ (Ollama's port)" if ollama_port else ""
        print(f"spectrum-local: serving {model.path} as {app.state.model_name!r} "
              f"({model.format} format; warmed up in {seconds:.1f} s) at http://{shown}:{port}/ "
              f"(the page; API docs at /docs){also}", file=sys.stderr, flush=True)
        config = uvicorn.Config(app, host=host, port=port,
                                timeout_graceful_shutdown=grace + _LAST_RESORT,
                                http=GuardedH11.with_timeout(timeout), log_level="info",
                                access_log=False)
        sockets = [config.bind_socket()]
        if ollama_port:
            config.port = ollama_port
            sockets.append(config.bind_socket())
        try:
            Server(config).run(sockets=sockets)
        except KeyboardInterrupt:  # uvicorn re-raises the signal it shut down for: done
            pass


def warm_up(model) -> float:
    """One small batch of samples and a score, so that the first request costs what later
    ones do: the weights are read in from the file and llama.cpp's threads and buffers are
    set up here, not in a client's request. Its seconds."""
    start = time.perf_counter()
    messages = [{"role": "description", "content": "A warm-up."}]
    model.sample(messages, n=4, max_tokens=4, seed=0)
    model.score(messages, ["a", "b"])
    return time.perf_counter() - start
