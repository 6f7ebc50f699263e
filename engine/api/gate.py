"""The gate in front of the routes: API key, rate limit, drain and queue checks,
made before the body is read, so a refused request costs no work."""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.types import Receive, Scope, Send

from engine.api.auth import ANONYMOUS, ApiKey, bearer_token
from engine.api.errors import APIError, draining
from engine.api.middleware import HTTPMiddleware

if TYPE_CHECKING:
    pass

OPS_PATHS = frozenset({"/health", "/ready", "/metrics"})
GENERATION_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})


def request_key(request: Request) -> ApiKey:
    """The API key the gate let `request` in with (ANONYMOUS when the API is open)."""
    key: ApiKey = getattr(request.state, "api_key", ANONYMOUS)
    return key


class GateMiddleware(HTTPMiddleware):
    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        error = self._check(scope)
        if error is not None:
            await error.response()(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _check(self, scope: Scope) -> APIError | None:
        state = self.state
        path = scope["path"]
        key = ANONYMOUS
        if state.keys.enabled and not (
            path in OPS_PATHS and state.settings.auth.auth_open_ops_endpoints
        ):
            token = bearer_token(dict(scope["headers"]).get(b"authorization"))
            found = state.keys.lookup(token) if token else None
            if found is None:
                state.metrics.refused.labels(reason="unauthorized").inc()
                message = (
                    "Incorrect API key provided." if token
                    else "Missing API key: send 'Authorization: Bearer <key>'."
                )  # fmt: skip
                return APIError(
                    401, message, code="invalid_api_key",
                    headers={"WWW-Authenticate": 'Bearer realm="codellama-serve"'},
                )  # fmt: skip
            key = found
        scope.setdefault("state", {})["api_key"] = key
        if path not in GENERATION_PATHS or scope["method"] != "POST":
            return None
        if state.draining:
            state.metrics.refused.labels(reason="draining").inc()
            return draining(state.settings.admission.retry_after_s)
        full = state.admission.precheck(key)
        if full is not None:
            return full
        limited = state.admission.limiter.check_request(key)
        if limited is not None:
            state.metrics.refused.labels(reason="rate_limit_rpm").inc()
            # Counted under the key's class: the request's own is not known before its body.
            state.metrics.classes.refused.labels(
                state.priorities.of_key(key).name, "rate_limit_rpm"
            ).inc()
        return limited
