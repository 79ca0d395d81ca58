"""The ASGI app: the guard and CORS around the routers (native, OpenAI-compatible, the page),
one error mapper for all of them, and the API key on every API route."""

from __future__ import annotations

import hmac
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi_offline import FastAPIOffline
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware

from ..model import SpectrumModel
from . import errors, native
from .bridge import InFlight
from .guard import MAX_BODY, REQUEST_TIMEOUT, RequestGuard
from .ollama import router as ollama_router
from .openai import router as openai_router


def create_app(model: SpectrumModel, *, model_name: str | None = None, api_key: str | None = None,
               cors_origins: tuple[str, ...] = (), allowed_hosts: tuple[str, ...] | None = (),
               max_body: int = MAX_BODY, timeout: float = REQUEST_TIMEOUT) -> FastAPI:
    """The app over ``model``, served as ``model_name`` (default: its file name without
    ``.gguf``; no response names a local path). ``allowed_hosts``: the Host names accepted
    besides loopback ones (None: any, for a server bound to a network address); see
    ``guard``."""
    # The page and the docs are served from the package: /docs works offline (no CDN).
    app = FastAPIOffline(
        title="spectrum-local", version=_version(), redoc_url=None,
        description="Spectrum-tuned models: score, sample, top, enumerate; "
                    "OpenAI-compatible completions and chat completions; the Ollama API "
                    "under /api/. Bodies are JSON ('Content-Type: application/json'). Errors: "
                    "{\"error\": {\"message\", \"type\"}}.",
        middleware=[
            # Outermost first: nothing reaches CORS or a route before the guard's checks.
            Middleware(RequestGuard, allowed_hosts=allowed_hosts, cors_origins=cors_origins,
                       limit=max_body, timeout=timeout),
            *([Middleware(CORSMiddleware, allow_origins=list(cors_origins),
                          allow_methods=["GET", "POST"], allow_headers=["*"])]
              if cors_origins else []),
        ])
    app.state.model = model
    app.state.model_name = model_name or served_name(model.path)
    app.state.owner_key = api_key is not None  # info shows local paths only behind a key
    app.state.in_flight = InFlight()  # what a shutdown past its grace cancels
    errors.install(app)

    def authorized(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        # Constant-time compare, so the time taken tells nothing about the key.
        if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise HTTPException(401, "missing or wrong API key: send 'Authorization: Bearer KEY'")

    app.include_router(native.public)
    app.include_router(native.router, dependencies=[Depends(authorized)])
    app.include_router(openai_router, dependencies=[Depends(authorized)])
    app.include_router(ollama_router, dependencies=[Depends(authorized)])
    return app


def served_name(path: str) -> str:
    """The model id clients see: the file name without ``.gguf``."""
    return Path(path).name.removesuffix(".gguf")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("spectrum-local")
    except PackageNotFoundError:
        return "dev"
