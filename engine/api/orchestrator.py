"""The one path of a generation request, whatever its endpoint.

    check serving and model -> the endpoint prepares its prompts (its own checks,
    Code Llama's formats) -> context check -> priority class -> admission -> the
    run in the engine -> the endpoint renders JSON or SSE frames

An endpoint (completions, chat) supplies only what is its own: how its request
becomes prompts (`prepare`) and how steps become its response (`renderer`).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import orjson
from starlette.requests import Request
from starlette.responses import Response

from engine.api.constraints import invalid, output_constraint
from engine.api.disconnect import primed, unless_disconnected
from engine.api.gate import request_key
from engine.api.priority import PRIORITY_CLASS_HEADER
from engine.api.run import Run, Steps
from engine.api.sampling import sampling_options
from engine.api.schemas import SamplingFields
from engine.api.state import ServerState
from engine.api.streaming import SSEResponse
from engine.api.validation import check_context, check_model, check_serving
from engine.llm import EngineRequestError, OutputConstraint

RequestT = TypeVar("RequestT", bound=SamplingFields, contravariant=True)


@dataclass(frozen=True, slots=True)
class PreparedPrompts:
    """An endpoint's request as engine prompts, with what sampling them needs."""

    token_ids: list[list[int]]
    max_tokens: int
    context_param: str  # the request field a prompt too long for the context is blamed on
    echo_texts: list[str] = field(default_factory=list)  # completions' `echo`, per prompt
    stop_token_ids: list[int] = field(default_factory=list)  # beyond the request's own
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    infill: bool = False  # fill-in-the-middle (`suffix`): what --fim-priority-class looks at


class Renderer(Protocol):
    """Turns a run's steps into one endpoint's response."""

    async def body(self, steps: Steps) -> dict[str, Any]: ...
    def frames(self, steps: Steps) -> AsyncGenerator[bytes, None]: ...


class Endpoint(Protocol[RequestT]):
    name: str  # the `endpoint` label of metrics and logs
    id_prefix: str  # of response ids: "cmpl-", "chatcmpl-"

    def prepare(self, state: ServerState, req: RequestT) -> PreparedPrompts: ...
    def renderer(self, run: Run, req: RequestT, prompts: PreparedPrompts) -> Renderer: ...


def start_run(
    state: ServerState, request: Request, req: RequestT, endpoint: Endpoint[RequestT]
) -> tuple[Run, PreparedPrompts]:
    """Check the request, build its prompts and admit it (or raise a 4xx/5xx APIError)."""
    check_serving(state)
    key = request_key(request)
    adapter = check_model(state, req.model, key)
    prompts = endpoint.prepare(state, req)
    for ids in prompts.token_ids:
        check_context(state, len(ids), prompts.max_tokens, prompts.context_param)
    constraint = checked_constraint(state, req)
    options = sampling_options(
        req, prompts.max_tokens, stop_token_ids=prompts.stop_token_ids,
        logprobs=prompts.logprobs, prompt_logprobs=prompts.prompt_logprobs,
        constraint=constraint,
    )  # fmt: skip
    assigned = state.priorities.assign(
        key, req.priority, infill=prompts.infill, max_tokens=prompts.max_tokens
    )
    options.priority = assigned.engine_priority
    sequences = len(prompts.token_ids) * options.n
    ticket = state.admission.reserve(
        key, sequences, sum(map(len, prompts.token_ids)), assigned.name
    )
    request_id = endpoint.id_prefix + uuid.uuid4().hex
    run = Run(state, endpoint.name, request_id, prompts.token_ids, options, ticket, adapter)
    run.priority_clamped = assigned.clamped
    request.state.run = run  # for the access log
    return run, prompts


def checked_constraint(state: ServerState, req: SamplingFields) -> OutputConstraint | None:
    """The request's structured-output constraint, checked by the engine's own rules
    before admission (an invalid one is a 400 naming the field, never an engine error)."""
    found = output_constraint(req)
    if found is None:
        return None
    constraint, param = found
    try:
        state.engine.check_constraint(constraint)
    except EngineRequestError as e:
        raise invalid(str(e), param) from None
    return constraint


async def serve_generation(
    request: Request, state: ServerState, req: RequestT, endpoint: Endpoint[RequestT]
) -> Response:
    """Answer a generation request: one JSON body, or a stream of SSE frames."""
    run, prompts = start_run(state, request, req, endpoint)
    render = endpoint.renderer(run, req, prompts)
    headers = {PRIORITY_CLASS_HEADER: run.ticket.priority_class}
    if req.stream:
        # The first step is awaited here so that an early error is an HTTP status;
        # from then on the response owns the run and closes it when it ends.
        async with run.closes_on_error():
            steps = await unless_disconnected(request, primed(run.steps()))
        return SSEResponse(
            render.frames(steps), run.close, headers=headers,
            coalesce_s=state.settings.stream_coalesce_s,
            write_timeout_s=state.settings.connections.stream_write_timeout_s,
            on_write_timeout=run.stalled,
        )  # fmt: skip
    body = await unless_disconnected(request, _collect(run, render))
    return Response(orjson.dumps(body), media_type="application/json", headers=headers)


async def _collect(run: Run, render: Renderer) -> dict[str, Any]:
    async with run.closes_on_error():
        body = await render.body(run.steps())
    await run.close(200)
    return body
