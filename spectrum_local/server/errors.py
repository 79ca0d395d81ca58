"""Every error the server answers, from one mapper keyed on the exception's type: routes, the
guard and the event streams all answer ``{"error": {"message", "type", "param", "code"}}``
(vLLM's shape) through ``as_api_error``, or ``{"error": message}`` under /api/ (Ollama's).

- ``APIError``: a refusal the server words itself, with its status and the field at fault;
- a request body the request models refuse (pydantic): 400, in ``ops``' words;
- ``InputError`` (the Python API's refusal of a value): 400;
- ``Cancelled`` (the client went away, so nobody reads it): 499, nginx's "client closed";
- Starlette's ``HTTPException`` (404, 405, 401 ...): its status;
- any other ``SpectrumError``: 500, its message; anything else: 500, its type only.
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from ..errors import Cancelled, InputError, SpectrumError
from ..ops import error_message

CLIENT_GONE = 499
OLLAMA_ROUTES = "/api/"
_KINDS = {400: "BadRequestError", 401: "AuthenticationError", 403: "Forbidden",
          404: "NotFoundError", 405: "MethodNotAllowed", 408: "RequestTimeout",
          413: "RequestTooLarge", 415: "UnsupportedMediaType", 499: "ClientClosedRequest",
          503: "ServiceUnavailable"}


class APIError(Exception):
    """An error answered as is: its message, HTTP status and the request field at fault."""

    def __init__(self, message: str, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.message, self.param, self.status = message, param, status

    def body(self, ollama: bool = False) -> dict:
        """vLLM's error body, or Ollama's (``{"error": message}``, what its clients read)."""
        if ollama:
            return {"error": self.message}
        return {"error": {"message": self.message,
                          "type": _KINDS.get(self.status, "InternalServerError"),
                          "param": self.param, "code": self.status}}


class FieldError(ValueError):
    """A request model's validator refusing a value: its message is the whole answer (it names
    the field), and ``param`` the field at fault when the check spans several fields."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def as_api_error(exc: BaseException) -> APIError:
    """The answer to ``exc``."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, RequestValidationError):
        return _invalid_body(exc)
    if isinstance(exc, HTTPException):
        return APIError(str(exc.detail), status=exc.status_code)
    if isinstance(exc, InputError):
        return APIError(str(exc))
    if isinstance(exc, Cancelled):
        return APIError(str(exc) or "cancelled: the client went away", status=CLIENT_GONE)
    if isinstance(exc, SpectrumError):
        return APIError(str(exc), status=500)
    return APIError(f"internal error ({type(exc).__name__})", status=500)


def error_response(exc: BaseException, path: str = "") -> JSONResponse:
    """The answer to ``exc`` for a request to ``path``: under /api/ in Ollama's shape."""
    error = as_api_error(exc)
    return JSONResponse(error.body(ollama=path.startswith(OLLAMA_ROUTES)),
                        status_code=error.status)


def install(app: FastAPI) -> None:
    """Answer every exception a route raises through ``error_response``."""
    async def handler(request, exc):
        return error_response(exc, request.url.path)

    for kind in (APIError, RequestValidationError, HTTPException, SpectrumError, Exception):
        app.add_exception_handler(kind, handler)


def _invalid_body(exc: RequestValidationError) -> APIError:
    """The request models' refusals as one line, in ``ops``' words (what the Python API and
    the command line say), the field at fault as ``param``. Always a 400: a value out of
    bounds, a wrong type and an unknown field are all the client's to fix."""
    errors = exc.errors()
    for err in errors:
        if err["type"] == "json_invalid":
            return APIError("the body is not valid JSON "
                            f"({err.get('ctx', {}).get('error', 'parse error')})")
    # A body that is not an object at all is named as such (an error's loc is its field).
    errors = [{**err, "loc": ("the body",)} if tuple(err["loc"]) == ("body",) else err
              for err in errors]
    first = errors[0]
    loc = [str(part) for part in first["loc"] if part not in ("body", "the body")]
    param = getattr(first.get("ctx", {}).get("error"), "param", None) or (loc[0] if loc else None)
    return APIError(error_message(errors), param)
