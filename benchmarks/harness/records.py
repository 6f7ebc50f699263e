"""What is recorded about each request: the clock, and one record of monotonic timestamps
per request (times in seconds from the run's t0)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

now = time.perf_counter  # monotonic, sub-microsecond: every timestamp comes from here


@dataclass(slots=True)
class RequestRecord:
    """Everything measured about one request. Times are seconds from the run's t0."""

    index: int
    item_id: str
    step: int = 0
    scheduled: float | None = None  # open loop: when it should have been sent
    sent: float | None = None  # when it was handed to the HTTP client (connection requested)
    # From the HTTP library's tracing hooks (aiohttp.TraceConfig; httpcore's trace for httpx):
    conn_acquired: float | None = None  # a pooled connection was handed to the request
    conn_wait: float = 0.0  # of that, time queued for a free slot in the client's pool
    connect_start: float | None = None  # a new TCP connection was opened ...
    connected: float | None = None  # ... and established (None: a kept-alive one was reused)
    written: float | None = None  # the request (headers and body) was written to the socket
    first_byte: float | None = None  # the response's first bytes: its status line and headers
    first_body: float | None = None  # the first read of the response body
    token_times: list[float] = field(default_factory=list)  # chunks carrying generated text
    chunks: int = 0  # all data events (role-only, empty, usage included)
    finished: float | None = None  # stream ended ([DONE] / body read) or failed
    status: int | None = None
    error: str | None = None
    prompt_tokens: int | None = None  # from the server's usage
    output_tokens: int | None = None  # from the server's usage
    retok_output_tokens: int | None = None  # re-tokenized generated text
    max_tokens: int | None = None
    expected_prompt_tokens: int | None = None  # the prompt's own length, where known
    worker: int = 0  # the load-generator process that sent it (--workers)
    finish_reason: str | None = None
    text: str = ""
    # Who sent it and who answered: for splitting one run's requests (by key, by replica).
    target: str = ""  # the target's label
    api_key: str | None = None  # the key's label (never the key itself)
    replica: str | None = None  # the response's X-Codellama-Replica header
    session: str | None = None  # editor / chat sessions: which one sent it
    # Given up on purpose by the client (an editor's next keystroke closes the
    # connection): neither a completion nor a failure.
    cancelled: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None and self.finished is not None and not self.cancelled

    @property
    def start(self) -> float | None:
        """When the request could have been written: sent, plus any wait for a pooled
        connection. Latencies count from here; the pool wait is reported apart."""
        return None if self.sent is None else self.sent + self.conn_wait

    @property
    def new_connection(self) -> bool:
        return self.connected is not None

    @property
    def out_tokens(self) -> int | None:
        """Output tokens: the server's usage, else the re-tokenized count."""
        return self.output_tokens if self.output_tokens is not None else self.retok_output_tokens

    def to_dict(self, with_text: bool = False) -> dict[str, Any]:
        d = asdict(self)
        if not with_text:
            d.pop("text")
        return d


def retokenize(records: list[RequestRecord], counter: Callable[[str], int]) -> None:
    for r in records:
        if r.ok:
            r.retok_output_tokens = counter(r.text)
