"""No repeated prompt in a run unless the profile asks for one: a unique salt per request.

A server with a prefix cache answers a prompt it has seen (or whose first blocks it has
seen) partly from cache, so a dataset that is cycled, a sweep that resends it, or a second
trial of the same seed measures the cache, not the server (vLLM measured up to 86 %
inflation this way, vllm #52884). Each request's prompt therefore starts with a line of
its own, `# <run nonce>-<request number>`: it changes the first block the cache hashes,
so nothing after it can hit either. The nonce is random per run, so trials do not share
blocks. Prompts are sent as they are when the run repeats them on purpose
(`unsalted_because` says why): datasets that share prefixes by design (editor
sessions, shared-prefix, chat-sessions: `DatasetSpec.shares_prefixes`), a dataset
that asks for repeats (`repeat` > 1: samples for pass@k), a profile that scores
quality (its scores are of the benchmark's own prompts, and the equivalence check
resends the very prompt), and `dataset.salt: false`.

Prompts of an exact token length (synthetic, trace rows with `input_tokens`) keep their
length: the salted text is trimmed back to it with the tokenizer.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import orjson

from benchmarks.harness.datasets import RequestItem

SALT_FORMAT = "# {nonce}-{n}\n"
WHERE = "a line `# <nonce>-<n>` before each prompt (chat: before the first message's content)"

# (salted prompt, target length) -> (text of that length, its length)
Fit = Callable[[str, int], tuple[str, int]]


def salt_text(nonce: str, n: int) -> str:
    return SALT_FORMAT.format(nonce=nonce, n=n)


def salt_item(item: RequestItem, salt: str, fit: Fit | None = None) -> RequestItem:
    """The item with `salt` in front of what it sends first."""
    if item.messages is not None:
        msgs = list(item.messages)
        if msgs:
            first = dict(msgs[0])
            first["content"] = salt + str(first.get("content", ""))
            msgs[0] = first
        return replace(item, messages=tuple(msgs))
    prompt = salt + (item.prompt or "")
    if fit is not None and item.input_tokens is not None:
        prompt, n = fit(prompt, item.input_tokens)
        return replace(item, prompt=prompt, input_tokens=n)
    return replace(item, prompt=prompt)


def _key(item: RequestItem) -> bytes:
    return orjson.dumps([item.prompt, item.messages, item.suffix])


@dataclass
class SaltedStream:
    """The run's requests in order, each salted (or not), counting distinct prompts."""

    items: Iterator[RequestItem]
    enabled: bool
    fit: Fit | None = None
    nonce: str = field(default_factory=lambda: secrets.token_hex(4))
    sent: int = 0
    _seen: set[int] = field(default_factory=set)

    def __iter__(self) -> SaltedStream:
        return self

    def __next__(self) -> RequestItem:
        item = next(self.items)
        if self.enabled:
            item = salt_item(item, salt_text(self.nonce, self.sent), self.fit)
        self.sent += 1
        self._seen.add(hash(_key(item)))
        return item

    def report(self, shares_prefixes: bool, unsalted_because: str | None = None) -> dict[str, Any]:
        """What the report says about the prompts' uniqueness; `shares_prefixes`: the run
        repeats prompts or prefixes by design (so the prefix cache may answer them)."""
        return {
            "salt": self.enabled,
            "salt_format": WHERE if self.enabled else None,
            "nonce": self.nonce if self.enabled else None,
            "shares_prefixes": shares_prefixes,
            "unsalted_because": None if self.enabled else unsalted_because,
            "requests": self.sent,
            "distinct_prompts": len(self._seen),
            "repeated": self.sent - len(self._seen),
        }
