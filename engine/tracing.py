"""OpenTelemetry tracing: one span per API request, its phases as child spans.

On only with `--otlp-traces-endpoint` (vLLM's flag); `create_app` then calls
`install_tracing`, and only then is this module (and the OpenTelemetry SDK) imported.
The standard variables configure the rest: OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES
(default service name: codellama-serve), OTEL_EXPORTER_OTLP_[TRACES_]HEADERS,
OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL (grpc, vLLM's default, or http/protobuf),
OTEL_TRACES_SAMPLER[_ARG] (default: parentbased_always_on), OTEL_PROPAGATORS (default:
W3C tracecontext and baggage), OTEL_BSP_* (the batch exporter).

A request span (kind SERVER, named after the method and path) continues the caller's W3C
`traceparent`. Its children, from the request's own timestamps and the engine's:

    admission        request received -> admitted (parse, validate, tokenize, queue check)
    engine.queue     the engine's scheduler queued it -> first scheduled
    engine.prefill   first scheduled -> first token
    engine.decode    first token -> last token

Attributes: HTTP method, path and status; the model, token counts and the outcome
(`codellama_serve.status`, 499 for a client that left; `codellama_serve.aborted`, the
abort reason); and every scalar field of the request's log line as
`codellama_serve.<field>` (the key's label, never the key). Prompt text only with
`--otlp-traces-prompts`.
"""

from __future__ import annotations

import atexit
import functools
import os
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from opentelemetry import context, propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.trace import SpanKind, Status, StatusCode
from starlette.applications import Starlette
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from engine.api.middleware import HTTPMiddleware
from engine.config import ConfigError

if TYPE_CHECKING:
    from engine.api.run import Run
    from engine.api.state import ServerState
    from engine.llm import EngineTimings

SERVICE_NAME = "codellama-serve"
TRACED_PREFIX = "/v1/"  # the API; probes and scrapes would only be noise
PROPAGATION_HEADERS = (b"traceparent", b"tracestate", b"baggage")
# Log-line fields that could hold request text: never attributes unless prompts are allowed.
TEXT_FIELDS = frozenset({"prompt", "prompts", "messages", "suffix", "text", "user"})
ATTRIBUTE_PREFIX = "codellama_serve."


def exporter(endpoint: str) -> SpanExporter:
    """The OTLP exporter for the protocol OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL names."""
    protocol = (
        os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "grpc"
    )
    url = urlparse(endpoint)
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
            OTLPSpanExporter as GrpcExporter,
        )

        return GrpcExporter(endpoint=endpoint, insecure=url.scheme != "https")
    if protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
            OTLPSpanExporter as HttpExporter,
        )

        if url.path in ("", "/"):  # a collector's base URL: OTLP/HTTP's traces path
            endpoint = endpoint.rstrip("/") + "/v1/traces"
        return HttpExporter(endpoint=endpoint)
    raise ConfigError(
        f"OTLP protocol {protocol!r} is not supported for traces (use grpc or http/protobuf)"
    )


@functools.cache
def tracer_provider(endpoint: str) -> TracerProvider:
    """The process's provider for `endpoint` (one per process: Ray runs several apps' replicas
    in one worker only in tests). Not the global one: vLLM may set that for itself."""
    resource = Resource.create()
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": SERVICE_NAME}))
    provider = TracerProvider(resource=resource)  # the sampler comes from OTEL_TRACES_SAMPLER
    provider.add_span_processor(BatchSpanProcessor(exporter(endpoint)))
    atexit.register(provider.shutdown)  # flushes what is batched
    return provider


def install_tracing(app: Starlette, state: ServerState) -> None:
    """Trace `app`'s API requests (outermost middleware); a bad exporter setting raises
    ConfigError here, at start-up."""
    endpoint = state.settings.tracing.otlp_traces_endpoint
    assert endpoint is not None
    tracer = tracer_provider(endpoint).get_tracer("engine.tracing")
    app.add_middleware(TracingMiddleware, state=state, tracer=tracer)


class TracingMiddleware(HTTPMiddleware):
    """One span per API request, its children and attributes added when the response ends."""

    def __init__(self, app: ASGIApp, state: ServerState, tracer: trace.Tracer) -> None:
        super().__init__(app, state)
        self.tracer = tracer
        self.prompts = state.settings.tracing.otlp_traces_prompts

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not scope["path"].startswith(TRACED_PREFIX):
            await self.app(scope, receive, send)
            return
        received = time.monotonic()
        carrier = {
            name.decode("latin-1"): value.decode("latin-1")
            for name, value in scope["headers"]
            if name in PROPAGATION_HEADERS
        }
        method = scope.get("method", "")
        span = self.tracer.start_span(
            f"{method} {scope['path']}",
            context=propagate.extract(carrier),
            kind=SpanKind.SERVER,
            attributes={"http.request.method": method, "url.path": scope["path"]},
        )
        status = 0

        async def send_noting_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        token = context.attach(trace.set_span_in_context(span))
        try:
            await self.app(scope, receive, send_noting_status)
        except BaseException as e:
            span.record_exception(e)
            span.set_status(Status(StatusCode.ERROR, type(e).__name__))
            raise
        finally:
            context.detach(token)
            self._end(span, scope.get("state", {}), status, received)

    def _end(self, span: Any, state: Mapping[str, Any], status: int, received: float) -> None:
        span.set_attribute("http.response.status_code", status)
        if "request_id" in state:
            span.set_attribute(ATTRIBUTE_PREFIX + "request_id", state["request_id"])
        if self.state.replica_id:
            span.set_attribute(ATTRIBUTE_PREFIX + "replica", self.state.replica_id)
        run: Run | None = state.get("run")
        outcome = status
        if run is not None:
            outcome = run.status or status
            span.set_attributes(self._run_attributes(run))
            self._phases(span, run, received)
        if outcome >= 500:
            span.set_status(Status(StatusCode.ERROR, f"status {outcome}"))
        span.end()

    def _run_attributes(self, run: Run) -> dict[str, Any]:
        attributes: dict[str, Any] = {
            "gen_ai.operation.name": "chat" if run.endpoint == "chat" else "text_completion",
            "gen_ai.request.model": self.state.settings.served_model_name,
            "gen_ai.request.max_tokens": run.options.max_tokens,
            "gen_ai.usage.input_tokens": run.prompt_tokens,
            "gen_ai.usage.output_tokens": run.completion_tokens,
            "gen_ai.response.id": run.request_id,
            ATTRIBUTE_PREFIX + "status": run.status or 0,
        }
        for name, value in run.log_fields().items():
            if isinstance(value, str | bool | int | float) and (
                self.prompts or name not in TEXT_FIELDS
            ):
                attributes[ATTRIBUTE_PREFIX + name] = value
        if self.prompts and self.state.engine.tokenizer is not None:
            attributes["gen_ai.prompt"] = [
                self.state.engine.tokenizer.decode(ids) for ids in run.prompts
            ]
        return attributes

    def _phases(self, span: Any, run: Run, received: float) -> None:
        """The child spans, from monotonic times (the request's and the engine's)."""
        to_wall_ns = time.time_ns() - time.monotonic_ns()
        parent = trace.set_span_in_context(span)

        def child(name: str, start: float, end: float, **attributes: Any) -> None:
            if start and end >= start:
                self.tracer.start_span(
                    name, context=parent, start_time=int(start * 1e9) + to_wall_ns,
                    attributes=attributes or None,
                ).end(end_time=int(end * 1e9) + to_wall_ns)  # fmt: skip

        child("admission", received, run.arrival, **{ATTRIBUTE_PREFIX + "key": run.ticket.key.name})
        t: EngineTimings | None = run.timings
        if t is None:
            return
        child("engine.queue", t.queued, t.scheduled)
        child("engine.prefill", t.scheduled, t.first_token, **{
            "gen_ai.usage.input_tokens": run.prompt_tokens,
        })  # fmt: skip
        child("engine.decode", t.first_token, t.last_token, **{
            "gen_ai.usage.output_tokens": run.completion_tokens,
            ATTRIBUTE_PREFIX + "preemptions": t.preemptions,
        })  # fmt: skip
