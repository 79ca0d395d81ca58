"""The error body every route and check answers with: vLLM's shape,
``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations

from fastapi.responses import JSONResponse

_KINDS = {400: "BadRequestError", 401: "AuthenticationError", 403: "Forbidden",
          404: "NotFoundError", 405: "MethodNotAllowed", 408: "RequestTimeout",
          413: "RequestTooLarge", 415: "UnsupportedMediaType", 422: "UnprocessableEntity"}


def error_response(status: int, message: str, kind: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message,
                                   "type": kind or _KINDS.get(status, "InternalServerError"),
                                   "param": None, "code": status}}, status_code=status)
