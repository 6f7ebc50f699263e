"""Admission control: a bounded waiting queue and per-key rate limits.

Everything here runs on the event loop without awaiting, so a check and its
reservation are one atomic step: a burst of requests cannot overshoot a bound.
With `--scheduling-policy priority` the queue is shared by priority class
(headroom for the classes above, a weighted fair share per key: fair_share.py).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from engine.api.auth import ApiKey
from engine.api.errors import APIError
from engine.api.fair_share import QUEUE_FULL, ClassLedger
from engine.api.priority import PriorityClasses
from engine.config import ResolvedSettings
from engine.metrics import Metrics

QUEUE_TOKENS = "queue_tokens"


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
    priority_class: str = ""
    waiting_for_first_token: bool = True
    released: bool = False

    def first_token(self) -> None:
        if self.waiting_for_first_token:
            self.waiting_for_first_token = False
            self.admission._tokens_started(self)

    def release(self, completion_tokens: int) -> None:
        if not self.released:
            self.released = True
            self.first_token()
            self.admission._release(self, completion_tokens)


class Admission:
    """Admitted sequences may fill the engine's batch plus `max_waiting_requests`;
    prompt tokens waiting for prefill are bounded by `max_waiting_prompt_tokens`.
    In priority mode each class has its own share of both (see fair_share.py)."""

    def __init__(
        self,
        settings: ResolvedSettings,
        metrics: Metrics,
        classes: PriorityClasses | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.batch = settings.engine.max_num_seqs
        self.max_sequences = settings.max_admitted_sequences
        self.max_prompt_tokens = settings.admission.max_waiting_prompt_tokens
        self.retry_after = settings.admission.retry_after_s
        self.metrics = metrics
        self.limiter = RateLimiter()
        self.waiting_prompt_tokens = 0
        self.classes = classes or PriorityClasses(settings.priority)
        self.ledger = ClassLedger(
            self.classes.classes, self.batch, settings.admission.max_waiting_requests,
            settings.priority.fair_share_window_s,
        )  # fmt: skip
        self.clock = clock
        metrics.classes.declare(self.classes.names)

    @property
    def sequences(self) -> int:
        """Admitted, unfinished sequences (all classes)."""
        return self.ledger.total

    @property
    def top_class_waiting(self) -> int:
        """Waiting sequences of the highest class (the autoscaler's interactive signal)."""
        return self.ledger.waiting[self.classes.top.name]

    @property
    def full(self) -> bool:
        return self.sequences >= self.max_sequences

    def queue_full_error(self) -> APIError:
        self.metrics.refused.labels(reason="queue_full").inc()
        return too_many(
            f"The server is at capacity ({self.max_sequences} sequences admitted); retry shortly.",
            "queue_full", self.retry_after,
        )  # fmt: skip

    def precheck(self, key: ApiKey) -> APIError | None:
        """The gate's check before the body is read: is there room for any request of `key`?"""
        if self.classes.enabled:
            # Each class's bound is at most the whole queue's: this covers `full` too.
            best = self.classes.best_for(key).name
            if self.ledger.total + 1 > self.ledger.bounds[best]:
                return self._class_refusal(key, best, QUEUE_FULL)
        elif self.full:
            self.metrics.classes.refused.labels(self.classes.of_key(key).name, QUEUE_FULL).inc()
            return self.queue_full_error()
        return None

    def reserve(
        self, key: ApiKey, sequences: int, prompt_tokens: int, priority_class: str | None = None
    ) -> Ticket:
        """Admit a request or raise 429; atomic (no await inside)."""
        cls = priority_class or self.classes.default.name
        if self.classes.enabled:
            self._check_class(key, cls, sequences, prompt_tokens)
        else:
            self._check_queue(key, cls, sequences, prompt_tokens)
        limited = self.limiter.check_tokens(key, prompt_tokens)
        if limited is not None:
            self.metrics.refused.labels(reason="rate_limit_tpm").inc()
            self.metrics.classes.refused.labels(cls, "rate_limit_tpm").inc()
            raise limited
        self.limiter.spend_tokens(key, prompt_tokens)
        self.ledger.add(cls, key.name, sequences)
        self.waiting_prompt_tokens += prompt_tokens
        self._publish(cls)
        return Ticket(self, sequences, prompt_tokens, key, cls)

    def _tokens_over(self, prompt_tokens: int, limit: float) -> bool:
        # A single prompt over the bound is still admitted into an empty queue.
        waiting = self.waiting_prompt_tokens
        return bool(waiting) and waiting + prompt_tokens > limit

    def _check_queue(self, key: ApiKey, cls: str, sequences: int, prompt_tokens: int) -> None:
        """First come, first served: one queue bound for every class."""
        if self.sequences + sequences > self.max_sequences:
            self.metrics.classes.refused.labels(cls, QUEUE_FULL).inc()
            raise self.queue_full_error()
        if self._tokens_over(prompt_tokens, self.max_prompt_tokens):
            self.metrics.refused.labels(reason=QUEUE_TOKENS).inc()
            self.metrics.classes.refused.labels(cls, QUEUE_TOKENS).inc()
            raise too_many(
                f"Too many prompt tokens are waiting for prefill ({self.waiting_prompt_tokens}); "
                "retry shortly.", QUEUE_TOKENS, self.retry_after,
            )  # fmt: skip

    def _check_class(self, key: ApiKey, cls: str, sequences: int, prompt_tokens: int) -> None:
        """Priority mode: the class's bound, its fair share, its share of waiting tokens."""
        reason = self.ledger.check(cls, key.name, key.weight, sequences, self.clock())
        share = self.classes.by_name[cls].queue_share
        if reason is None and self._tokens_over(prompt_tokens, share * self.max_prompt_tokens):
            reason = QUEUE_TOKENS
        if reason is not None:
            raise self._class_refusal(key, cls, reason)

    def _class_refusal(self, key: ApiKey, cls: str, reason: str) -> APIError:
        self.ledger.refused(cls, key.name, key.weight, self.clock())
        self.metrics.refused.labels(reason=reason).inc()
        self.metrics.classes.refused.labels(cls, reason).inc()
        why = {
            QUEUE_FULL: "the queue is full for this class (the rest is kept for the classes "
            "above it)",
            QUEUE_TOKENS: "too many prompt tokens of this class are waiting for prefill",
        }.get(reason, f"'{key.name}' holds its fair share of this class")
        return too_many(
            f"Priority class '{cls}': {why}; retry shortly.", f"{reason}_{cls}", self.retry_after
        )

    def _tokens_started(self, ticket: Ticket) -> None:
        self.waiting_prompt_tokens -= ticket.prompt_tokens
        self.ledger.started(ticket.priority_class, ticket.sequences)
        self._publish(ticket.priority_class)

    def _release(self, ticket: Ticket, completion_tokens: int) -> None:
        self.ledger.remove(ticket.priority_class, ticket.key.name, ticket.sequences)
        self.limiter.spend_tokens(ticket.key, completion_tokens)
        self._publish(ticket.priority_class)

    def _publish(self, cls: str) -> None:
        m = self.metrics
        m.admitted_sequences.set(self.sequences)
        m.queued_sequences.set(max(0, self.sequences - self.batch))
        m.queued_prompt_tokens.set(self.waiting_prompt_tokens)
        m.classes.admitted.labels(cls).set(self.ledger.admitted[cls])
        m.classes.waiting.labels(cls).set(self.ledger.waiting[cls])
