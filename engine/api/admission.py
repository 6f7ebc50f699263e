"""Admission control: a bounded waiting queue and per-key rate limits.

Everything here runs on the event loop without awaiting, so a check and its
reservation are one atomic step: a burst of requests cannot overshoot a bound.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from engine.api.auth import ApiKey
from engine.api.errors import APIError
from engine.config import ResolvedSettings
from engine.metrics import Metrics


def too_many(message: str, code: str, retry_after: float) -> APIError:
    return APIError(
        429, message, code=code, headers={"Retry-After": str(max(1, math.ceil(retry_after)))}
    )


@dataclass(slots=True)
class TokenBucket:
    """`capacity` units per minute, refilled continuously."""

    capacity: float
    level: float = field(init=False)
    stamp: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.level = self.capacity

    def _refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.capacity / 60.0)
        self.stamp = now

    def wait_for(self, amount: float, now: float) -> float:
        """Seconds until `amount` is available (0: available now)."""
        self._refill(now)
        need = min(amount, self.capacity) - self.level
        return 0.0 if need <= 0 else need * 60.0 / self.capacity

    def take(self, amount: float, now: float) -> None:
        self._refill(now)
        self.level -= amount  # may go negative: completion tokens are debited after the fact


class RateLimiter:
    """Requests and tokens per minute, per API key."""

    def __init__(self) -> None:
        self._requests: dict[str, TokenBucket] = {}
        self._tokens: dict[str, TokenBucket] = {}

    def check_request(self, key: ApiKey) -> APIError | None:
        """Take one request from the key's RPM budget, or say how long to wait."""
        if key.rpm is None:
            return None
        now = time.monotonic()
        bucket = self._requests.setdefault(key.name, TokenBucket(key.rpm))
        wait = bucket.wait_for(1, now)
        if wait > 0:
            return too_many(
                f"Rate limit reached for '{key.name}': {key.rpm} requests per minute.",
                "rate_limit_rpm", wait,
            )  # fmt: skip
        bucket.take(1, now)
        return None

    def check_tokens(self, key: ApiKey, tokens: int) -> APIError | None:
        if key.tpm is None:
            return None
        now = time.monotonic()
        wait = self._tokens.setdefault(key.name, TokenBucket(key.tpm)).wait_for(tokens, now)
        if wait > 0:
            return too_many(
                f"Rate limit reached for '{key.name}': {key.tpm} tokens per minute.",
                "rate_limit_tpm", wait,
            )  # fmt: skip
        return None

    def spend_tokens(self, key: ApiKey, tokens: int) -> None:
        if key.tpm is not None and tokens:
            self._tokens.setdefault(key.name, TokenBucket(key.tpm)).take(tokens, time.monotonic())


@dataclass(slots=True)
class Ticket:
    """One admitted request's share of the queue; released exactly once."""

    admission: Admission
    sequences: int
    prompt_tokens: int
    key: ApiKey
    waiting_for_first_token: bool = True
    released: bool = False

    def first_token(self) -> None:
        if self.waiting_for_first_token:
            self.waiting_for_first_token = False
            self.admission._tokens_started(self.prompt_tokens)

    def release(self, completion_tokens: int) -> None:
        if not self.released:
            self.released = True
            self.first_token()
            self.admission._release(self, completion_tokens)


class Admission:
    """Admitted sequences may fill the engine's batch plus `max_waiting_requests`;
    prompt tokens waiting for prefill are bounded by `max_waiting_prompt_tokens`."""

    def __init__(self, settings: ResolvedSettings, metrics: Metrics) -> None:
        self.batch = settings.engine.max_num_seqs
        self.max_sequences = settings.max_admitted_sequences
        self.max_prompt_tokens = settings.admission.max_waiting_prompt_tokens
        self.retry_after = settings.admission.retry_after_s
        self.metrics = metrics
        self.limiter = RateLimiter()
        self.sequences = 0
        self.waiting_prompt_tokens = 0

    @property
    def full(self) -> bool:
        return self.sequences >= self.max_sequences

    def queue_full_error(self) -> APIError:
        self.metrics.refused.labels(reason="queue_full").inc()
        return too_many(
            f"The server is at capacity ({self.max_sequences} sequences admitted); retry shortly.",
            "queue_full", self.retry_after,
        )  # fmt: skip

    def reserve(self, key: ApiKey, sequences: int, prompt_tokens: int) -> Ticket:
        """Admit a request or raise 429; atomic (no await inside)."""
        if self.sequences + sequences > self.max_sequences:
            raise self.queue_full_error()
        if self.waiting_prompt_tokens and (
            self.waiting_prompt_tokens + prompt_tokens > self.max_prompt_tokens
        ):
            self.metrics.refused.labels(reason="queue_tokens").inc()
            raise too_many(
                f"Too many prompt tokens are waiting for prefill ({self.waiting_prompt_tokens}); "
                "retry shortly.", "queue_tokens", self.retry_after,
            )  # fmt: skip
        limited = self.limiter.check_tokens(key, prompt_tokens)
        if limited is not None:
            self.metrics.refused.labels(reason="rate_limit_tpm").inc()
            raise limited
        self.limiter.spend_tokens(key, prompt_tokens)
        self.sequences += sequences
        self.waiting_prompt_tokens += prompt_tokens
        self._publish()
        return Ticket(self, sequences, prompt_tokens, key)

    def _tokens_started(self, prompt_tokens: int) -> None:
        self.waiting_prompt_tokens -= prompt_tokens
        self._publish()

    def _release(self, ticket: Ticket, completion_tokens: int) -> None:
        self.sequences -= ticket.sequences
        self.limiter.spend_tokens(ticket.key, completion_tokens)
        self._publish()

    def _publish(self) -> None:
        m = self.metrics
        m.admitted_sequences.set(self.sequences)
        m.queued_sequences.set(max(0, self.sequences - self.batch))
        m.queued_prompt_tokens.set(self.waiting_prompt_tokens)
