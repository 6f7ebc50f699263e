"""OpenAI-style errors: `{"error": {"message", "type", "param", "code"}}`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from engine.adapters import AdapterError, AdapterNotFoundError
from engine.codellama import PromptError
from engine.llm import EngineDeadError, EngineNotReadyError, EngineRequestError

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    499: "client_closed_request",
    500: "server_error",
    503: "service_unavailable",
    504: "timeout_error",
}


class APIError(Exception):
    """An error answered to the client in the OpenAI format."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    @property
    def type(self) -> str:
        return ERROR_TYPES.get(
            self.status, "server_error" if self.status >= 500 else "invalid_request_error"
        )

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> Response:
        return Response(
            orjson.dumps(self.body()),
            status_code=self.status,
            media_type="application/json",
            headers=self.headers,
        )


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def engine_dead() -> APIError:
    # Retry-After: another replica (or this one, restarted) can take the retry.
    return APIError(
        503, "The engine has failed; this server is restarting.", code="engine_dead",
        headers={"Retry-After": "1"},
    )  # fmt: skip


def draining(retry_after_s: int) -> APIError:
    return APIError(
        503, "The server is shutting down; retry on another replica.",
        code="draining", headers={"Retry-After": str(retry_after_s)},
    )  # fmt: skip


def model_not_found(message: str) -> APIError:
    return APIError(404, message, param="model", code="model_not_found")


def model_loading() -> APIError:
    return APIError(
        503, "The model is still loading; retry shortly.",
        code="model_loading", headers={"Retry-After": "5"},
    )  # fmt: skip


# The one mapping from the errors of the layers below (prompt formats, the engine)
# to what the client is told: HTTP statuses and mid-stream error events alike.
ERROR_MAP: tuple[tuple[type[Exception], Callable[[Any], APIError]], ...] = (
    (EngineDeadError, lambda e: engine_dead()),
    (EngineNotReadyError, lambda e: model_loading()),
    (EngineRequestError, lambda e: bad_request(str(e))),
    (PromptError, lambda e: bad_request(str(e), param=e.param)),
    # A LoRA adapter unloaded between the request's model check and its start.
    (AdapterNotFoundError, lambda e: model_not_found(str(e))),
    (AdapterError, lambda e: bad_request(str(e), code=e.code)),
)
MAPPED_ERRORS: tuple[type[Exception], ...] = tuple(kind for kind, _ in ERROR_MAP)


def api_error(exc: Exception) -> APIError:
    """The client's view of an APIError or of one of MAPPED_ERRORS."""
    if isinstance(exc, APIError):
        return exc
    for kind, make in ERROR_MAP:
        if isinstance(exc, kind):
            return make(exc)
    raise TypeError(f"no API error for {type(exc).__name__}") from exc


def describe_validation_errors(errors: list[Any]) -> tuple[str, str | None]:
    """One readable sentence (and the first offending field) from pydantic errors."""
    parts = []
    first_param = None
    for e in errors[:5]:
        loc = [str(p) for p in e.get("loc", ()) if p not in ("body",)]
        # Unions report each branch ("prompt.str", "prompt.list[int]"): keep the field.
        loc = [p for p in loc if not (p[:1].islower() and ("[" in p or p in _TYPE_NAMES))]
        field = ".".join(loc) or "body"
        first_param = first_param or (loc[0] if loc else None)
        parts.append(f"{field}: {e.get('msg', 'invalid value')}")
    if len(errors) > 5:
        parts.append(f"... and {len(errors) - 5} more")
    return "Invalid request: " + "; ".join(parts), first_param


_TYPE_NAMES = {"str", "int", "float", "bool", "list", "dict", "none", "function-after"}


def install_error_handlers(app: FastAPI) -> None:
    async def _api_error(request: Request, exc: Exception) -> Response:
        return api_error(exc).response()

    handled: tuple[type[Exception], ...] = (APIError, *MAPPED_ERRORS)
    for kind in handled:
        app.add_exception_handler(kind, _api_error)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
        errors = list(exc.errors())
        if any(e.get("type") == "json_invalid" for e in errors):
            return bad_request("Invalid request: the body is not valid JSON").response()
        message, param = describe_validation_errors(errors)
        return bad_request(message, param=param).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404:
            message = f"Unknown endpoint: {request.method} {request.url.path}"
        elif exc.status_code == 405:
            message = f"Method {request.method} is not allowed on {request.url.path}"
        return APIError(exc.status_code, message, headers=dict(exc.headers or {})).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        # A bug of ours: say so plainly, without leaking internals.
        import logging

        logging.getLogger("engine.api").exception("unhandled error on %s", request.url.path)
        return APIError(500, "Internal server error", code="internal_error").response()
