"""What a request must be before any route sees it, and how long a client may take to send it.

A server on loopback is reachable by every web page the user opens: a page cannot read another
origin's answers (CORS), but it can *send* "simple" requests (a form post, a ``no-cors``
fetch) without asking first, and a page whose own name it re-points at 127.0.0.1 (DNS
rebinding) becomes same-origin with the server. So, as Ollama does, ``RequestGuard`` refuses:

- a ``Host`` that does not name this machine (when ``allowed_hosts`` is set: on a loopback
  bind, localhost, 127.0.0.1 and [::1], plus ``--allowed-host``): a rebound page's requests
  carry its own name (403);
- an ``Origin`` other than the server's own (its page) or a ``--cors-origin``: pages of other
  origins cannot make the model work, whatever they send (403);
- a body that is not JSON (415): a form post, or ``text/plain``, is how a page sends a request
  without a preflight (FastAPI refuses them for the same reason, CVE-2021-32677). A body with no
  type at all is read as JSON only from a client that is not a page (no ``Origin``), e.g.
  ``curl --data-binary`` or a script;
- a body over ``limit`` bytes, declared or chunked (413), or one that does not arrive within
  ``timeout`` seconds (408), and text that is not valid Unicode (400: bytes that are not
  UTF-8, or a lone surrogate such as ``"\\ud800"`` that JSON allows and UTF-8 cannot encode).

These checks run before any route, so nothing a refused request sends reaches the model.
``GuardedH11`` closes connections whose request headers do not arrive within the same
timeout: uvicorn starts its keep-alive timer only after a first response, so a client that
opens connections and sends nothing (or a byte a minute) would otherwise hold them forever.
"""

from __future__ import annotations

import asyncio
import json
import re

from uvicorn.protocols.http.h11_impl import H11Protocol

from ..errors import InputError
from ..textfile import check_unicode
from .errors import APIError, error_response
from .hosts import host_name, is_loopback

MAX_BODY = 4 * 2**20  # bytes: a prompt of a million characters is not a desktop tool's call
REQUEST_TIMEOUT = 30.0  # seconds for a request's headers, and again for its body

_JSON_TYPE = re.compile(rb"^application/([a-z0-9.+-]*\+)?json$")
# A JSON \u escape of a surrogate (U+D800..U+DFFF): only bodies holding one are parsed here.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


class RequestGuard:
    """ASGI middleware, the outermost: the checks of the module's docstring, in that order."""

    def __init__(self, app, *, allowed_hosts: tuple[str, ...] | None,
                 cors_origins: tuple[str, ...], limit: int = MAX_BODY,
                 timeout: float = REQUEST_TIMEOUT):
        self.app = app
        self.allowed_hosts = (None if allowed_hosts is None or "*" in allowed_hosts
                              else {host_name(h) for h in allowed_hosts})
        self.cors_origins = {o.rstrip("/").lower() for o in cors_origins}
        self.limit, self.timeout = limit, timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        refusal = self._refusal(scope)
        if refusal is None and _has_body(scope):
            refusal, receive = await self._read_body(scope, receive)
        if refusal is not None:
            return await error_response(refusal, scope["path"])(scope, receive, send)
        await self.app(_json_by_default(scope), receive, send)

    def _refusal(self, scope):
        """The 4xx refusal of a request whose headers alone rule it out, or None."""
        headers = _headers(scope)
        host = host_name(headers.get("host", ""))
        if self.allowed_hosts is not None and host and host not in self.allowed_hosts \
                and not is_loopback(host):
            return _refuse(403, f"the Host header {host!r} is not this server's name; "
                                "start the server with --allowed-host NAME to accept it")
        origin = headers.get("origin")
        if origin is not None and origin.rstrip("/").lower() not in self.cors_origins \
                and origin.lower() != f"{scope['scheme']}://{headers.get('host', '')}".lower():
            return _refuse(403, f"requests from pages of {origin} are refused; start the "
                                f"server with --cors-origin {origin} to allow them")
        if _has_body(scope):
            kind = headers.get("content-type")
            media = (kind or "").split(";")[0].strip().lower().encode()
            if (kind is None and origin is not None) or (kind is not None
                                                         and not _JSON_TYPE.match(media)):
                return _refuse(
                    415, f"the body must be JSON, sent with 'Content-Type: application/json' "
                         f"(this one: {kind or 'no Content-Type, from a web page'}); with curl: "
                         "--json '{...}', or -H 'Content-Type: application/json' -d '{...}'")
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.limit:
            return self._too_large()
        return None

    async def _read_body(self, scope, receive):
        """Read the whole body (bounded in size and time) before the app runs; then hand the
        app a ``receive`` that replays it. Returns (refusal or None, receive)."""
        chunks, size = [], 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0))
            except asyncio.TimeoutError:
                return _refuse(408, f"the request body did not arrive within "
                                    f"{self.timeout:g} s"), receive
            if message["type"] == "http.disconnect":
                return None, _replay([message], receive)
            size += len(message.get("body", b""))
            if size > self.limit:
                return self._too_large(), receive
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        try:
            body.decode("utf-8")
        except UnicodeDecodeError as e:
            return _refuse(400, f"the request body is not UTF-8 text (byte "
                                f"0x{body[e.start]:02X} at offset {e.start})"), receive
        if _SURROGATE_ESCAPE.search(body):
            try:
                check_unicode(json.loads(body), "the request body")
            except InputError as e:
                return e, receive
            except (ValueError, RecursionError):
                pass  # not JSON, or nested too deeply to walk: the route says so
        return None, _replay([{"type": "http.request", "body": body, "more_body": False}],
                             receive)

    def _too_large(self):
        return _refuse(413, f"the request body is larger than {self.limit} bytes")


def _json_by_default(scope):
    """A body without a type, from a client that is not a page, is JSON (as FastAPI reads it)."""
    if not _has_body(scope) or any(name == b"content-type" for name, _ in scope["headers"]):
        return scope
    return {**scope, "headers": [*scope["headers"], (b"content-type", b"application/json")]}


def _has_body(scope) -> bool:
    return scope["method"] in ("POST", "PUT", "PATCH")


def _headers(scope) -> dict[str, str]:
    return {name.decode("latin-1"): value.decode("latin-1") for name, value in scope["headers"]}


def _replay(messages: list[dict], receive):
    """A ``receive`` that gives ``messages``, then waits on the client as before (for its
    disconnect)."""
    async def replayed():
        return messages.pop(0) if messages else await receive()
    return replayed


class GuardedH11(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, closing a connection that has not sent a whole request's
    headers ``REQUEST_TIMEOUT`` seconds after it opened or after its last response (a
    response in progress is never cut)."""

    timeout = REQUEST_TIMEOUT  # set per server by ``with_timeout``

    @classmethod
    def with_timeout(cls, seconds: float) -> type["GuardedH11"]:
        return type(cls.__name__, (cls,), {"timeout": seconds})

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._await_headers()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._await_headers()

    def connection_lost(self, exc) -> None:
        super().connection_lost(exc)
        if getattr(self, "_headers_timer", None) is not None:
            self._headers_timer.cancel()

    def _await_headers(self) -> None:
        if getattr(self, "_headers_timer", None) is not None:
            self._headers_timer.cancel()
        waiting_since = self.scope  # a new request's headers replace the scope

        def expire():
            idle = self.cycle is None or self.cycle.response_complete
            if self.scope is waiting_since and idle and not self.transport.is_closing():
                self.transport.close()

        self._headers_timer = self.loop.call_later(self.timeout, expire)


def _refuse(status: int, message: str) -> APIError:
    return APIError(message, status=status)
