"""The `shared-prefix` dataset: G groups, each sharing a prefix of exactly P tokens
(a repo context, or a long system prompt), each request with a tail of its own.

Counts are the tokenizer's: the prefix is P tokens on its own, and every prompt
of its group is exactly the prefix's P tokens followed by T tokens of its own
tail (a completions prefix ends with a newline, a token boundary, so the tail
never merges into it). A chat's system prompt is P tokens, its user turn T.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from benchmarks.harness.datasets import (
    RequestItem,
    _allowed_ids,
    humaneval_problems,
    text_of_length,
)
from benchmarks.harness.profile.workloads import SharedPrefixSpec

TRIES = 50


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False, verbose=False).input_ids)


class _Texts:
    """Texts of an exact token length, from code windows or random token ids."""

    def __init__(self, tokenizer: Any, kind: str, rng: np.random.Generator) -> None:
        self.tokenizer, self.rng = tokenizer, rng
        self.allowed = _allowed_ids(tokenizer)
        self.corpus: list[int] = []
        if kind == "code":
            code = "\n".join(p["prompt"] + p["canonical_solution"] for p in humaneval_problems())
            self.corpus = _ids(tokenizer, code)

    def draw(self, n: int) -> str:
        rng = self.rng
        if self.corpus and n < len(self.corpus):
            start = int(rng.integers(0, len(self.corpus) - n))
            ids = self.corpus[start : start + n]
        else:
            ids = self.allowed[rng.integers(0, len(self.allowed), n)].tolist()
        text, _ = text_of_length(self.tokenizer, ids, n, rng, self.allowed)
        return text

    def exact(self, n: int, ends_with_newline: bool) -> str:
        """A text of exactly n tokens (ending with a newline when asked)."""
        for _ in range(TRIES):
            if ends_with_newline:
                text = self.draw(n - 1).rstrip(" ") + "\n" if n > 1 else "\n"
            else:
                text = self.draw(n).strip()
            if len(_ids(self.tokenizer, text)) == n:
                return text
        raise ValueError(f"shared-prefix: no text of exactly {n} tokens after {TRIES} tries")


def shared_prefix_items(
    spec: SharedPrefixSpec, tokenizer: Any, rng: np.random.Generator
) -> list[RequestItem]:
    """groups × requests_per_group items, in group order (the caller shuffles)."""
    texts = _Texts(tokenizer, spec.text, rng)
    special = int(tokenizer.num_special_tokens_to_add())
    out: list[RequestItem] = []
    seen: set[str] = set()
    for g in range(spec.groups):
        prefix = texts.exact(spec.prefix_tokens, ends_with_newline=not spec.chat)
        prefix_ids = _ids(tokenizer, prefix)
        for i in range(spec.requests_per_group):
            tail = _distinct_tail(texts, spec, prefix, prefix_ids, seen, tokenizer)
            item_id = f"shared-prefix/g{g}/{i}"
            if spec.chat:
                msgs = ({"role": "system", "content": prefix}, {"role": "user", "content": tail})
                out.append(RequestItem(item_id, messages=msgs))
            else:
                n = len(_ids(tokenizer, prefix + tail)) + special
                out.append(RequestItem(item_id, prompt=prefix + tail, input_tokens=n))
    return out


def _distinct_tail(
    texts: _Texts,
    spec: SharedPrefixSpec,
    prefix: str,
    prefix_ids: list[int],
    seen: set[str],
    tokenizer: Any,
) -> str:
    """A tail of tail_tokens tokens no other request has, that leaves the prefix's tokens intact."""
    for _ in range(TRIES):
        tail = texts.exact(spec.tail_tokens, ends_with_newline=False)
        if tail in seen:
            continue
        if not spec.chat:  # in the prompt: the prefix's tokens intact, then exactly the tail's
            full = _ids(tokenizer, prefix + tail)
            if (
                full[: len(prefix_ids)] != prefix_ids
                or len(full) != len(prefix_ids) + spec.tail_tokens
            ):
                continue
        seen.add(tail)
        return tail
    raise ValueError("shared-prefix: could not draw distinct tails (tail_tokens too small?)")


def group_of(item_id: str) -> str | None:
    """`g3` of `shared-prefix/g3/7`."""
    parts = item_id.split("/")
    return parts[1] if len(parts) == 3 and parts[0] == "shared-prefix" else None
