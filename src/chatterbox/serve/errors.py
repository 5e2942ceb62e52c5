"""Errors as OpenAI's clients expect them: ``{"error": {"message", "type", "param", "code"}}`` with
the HTTP status that says what went wrong.

Which status for which fault (the same rule on every route):

* 400: the body is not JSON, or a value of the right type cannot be honoured (empty or too long
  input, unsupported format, a speed other than 1.0, a sampling parameter out of range, audio that
  cannot be used as a voice).
* 401: an API key is required and the request has none, or not a valid one.
* 404: unknown route, model or voice.
* 409: a stored voice already has that name.
* 413: the body or upload is larger than the server accepts.
* 422: the body does not match the schema (a field of the wrong type, a missing or unknown field).
* 429: every engine is busy and the queue is full (with ``Retry-After``).
* 503: the model is still loading (``/health`` says when it is ready).
"""
from __future__ import annotations

import logging
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)

_TYPES = {401: "authentication_error", 429: "rate_limit_error"}


def error_type(status: int) -> str:
    if status >= 500:
        return "server_error"
    return _TYPES.get(status, "invalid_request_error")


class APIError(Exception):
    """A request the server refuses: turned into OpenAI's error body by the app's handler."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = int(status)
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.status, self.message, self.param, self.code)


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": error_type(status), "param": param, "code": code}}


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


_PYDANTIC_CODES = {"missing": "missing_field", "extra_forbidden": "unknown_field"}


def validation_error(exc) -> APIError:
    """A pydantic/FastAPI validation error as a 422 naming the first offending top-level field."""
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path")]
    param = loc[0] if loc else None
    kind = first.get("type") or ""
    message = str(first.get("msg"))
    if kind == "extra_forbidden":
        message = "unknown parameter"
    if len({tuple(e.get("loc", ()))[:2] for e in errors}) > 1 and kind != "extra_forbidden":
        message += f" ({len(errors)} problems)"
    return APIError(422, f"{param}: {message}" if param else message, param=param,
                    code=_PYDANTIC_CODES.get(kind, "invalid_type"))


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        phrase = HTTPStatus(exc.status_code).phrase if exc.status_code in HTTPStatus._value2member_map_ else ""
        message = exc.detail if isinstance(exc.detail, str) and exc.detail != phrase else (
            f"{phrase}: {request.method} {request.url.path}")
        return error_response(APIError(exc.status_code, message, headers=dict(exc.headers or {})))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(APIError(500, f"internal server error ({type(exc).__name__})"))
