"""Errors of the HTTP API: every failure is answered as JSON ``{"error": "..."}``, never a stack trace.

* :class:`ApiError` carries an HTTP status, a message for the client and optional headers
  (``Retry-After`` for 503, ``WWW-Authenticate`` for 401).
* :func:`public_message` turns a project error (:class:`~medsam3.errors.MedSam3Error`) into a message that
  names the user's upload instead of the server's own file paths.
* :func:`install_error_handlers` registers the handlers on a FastAPI app: HTTP errors (404 for unknown
  routes, 405, ...), request validation (422, one line per problem), project errors (400) and anything
  unexpected (500 with a generic message; the traceback goes to the server log only).
"""

from __future__ import annotations

import logging
import uuid
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from medsam3.errors import InputError, MedSam3Error

log = logging.getLogger("medsam3.serve")


class ApiError(Exception):
    """An error answered with ``status`` and ``{"error": message}``."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = int(status)
        self.message = message
        self.headers = headers or {}


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """The JSON error body every failure uses."""
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def public_message(exc: BaseException, *, name: str | None = None, hide: tuple[str | Path, ...] = ()) -> str:
    """A client-safe message for a project error.

    An :class:`InputError` is reported as ``"<name>: <problem>"`` (the upload's display name, not the
    server's path); in any other message the folders in ``hide`` are cut out.
    """
    if isinstance(exc, InputError):
        problem = exc.problem
        text = f"{name}: {problem}" if name else problem
    else:
        text = str(exc)
    for folder in hide:
        if not folder:
            continue
        folder = str(folder).rstrip("/")
        text = text.replace(folder + "/", "").replace(folder, "<server>")
    return text


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err.get("loc", ()) if p not in ("body",))
        msg = str(err.get("msg", "invalid value"))
        parts.append(f"{where}: {msg}" if where else msg)
    return "invalid request: " + "; ".join(parts) if parts else "invalid request"


def install_error_handlers(app: FastAPI, hide: tuple[str | Path, ...] = ()) -> None:
    """Answer every error of ``app`` as JSON ``{"error": ...}`` (see the module docstring)."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return error_response(exc.status, exc.message, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        detail = exc.detail if isinstance(exc.detail, str) else "request failed"
        if exc.status_code == 404 and detail == "Not Found":
            detail = f"no such endpoint: {request.method} {request.url.path}"
        return error_response(exc.status_code, detail, getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return error_response(422, _validation_message(exc))

    @app.exception_handler(MedSam3Error)
    async def _project_error(request: Request, exc: MedSam3Error):
        return error_response(400, public_message(exc, hide=hide))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        ref = uuid.uuid4().hex[:12]
        log.error("unexpected error %s on %s %s", ref, request.method, request.url.path, exc_info=exc)
        return error_response(500, f"internal server error (reference {ref}; details are in the server log)")
