"""The window of a file around the cursor that a request carries, within token budgets.

Editors do not send whole files (they overflow the context: a standard-library
module is tens of thousands of tokens, the demo model holds 2,048): they send
the lines nearest to the cursor, above and below, trimmed to a token budget.
The prefix keeps the lines nearest the cursor (the far ones are dropped first);
so does the suffix. Every window is counted with the tokenizer: it fits.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

Counter = Callable[[str], int]


def token_counter(tokenizer: Any) -> Counter:
    def count(text: str) -> int:
        if not text:
            return 0
        return len(tokenizer(text, add_special_tokens=False, verbose=False).input_ids)

    return count


@dataclass
class Document:
    """A file with each line's token count (from one tokenization of the whole file)."""

    name: str
    text: str
    line_starts: np.ndarray  # offset of each line's first character; a last entry = len(text)
    cum_tokens: np.ndarray  # tokens of lines [0, i) = cum_tokens[i]

    @classmethod
    def build(cls, name: str, text: str, tokenizer: Any) -> Document:
        starts = [0, *(m.end() for m in re.finditer("\n", text) if m.end() < len(text))]
        starts.append(len(text))
        line_starts = np.asarray(starts, dtype=np.int64)
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        token_starts = np.asarray([a for a, _ in enc["offset_mapping"]], dtype=np.int64)
        # A token belongs to the line its first character is on.
        per_line = np.bincount(
            np.searchsorted(line_starts, token_starts, side="right") - 1,
            minlength=len(line_starts) - 1,
        )[: len(line_starts) - 1]
        cum = np.concatenate(([0], np.cumsum(per_line)))
        return cls(name, text, line_starts, cum)

    @property
    def lines(self) -> int:
        return len(self.line_starts) - 1

    def line_of(self, pos: int) -> int:
        return int(np.searchsorted(self.line_starts, pos, side="right") - 1)

    def line_start(self, line: int) -> int:
        return int(self.line_starts[line])


def cut_to_tokens(text: str, budget: int, tokenizer: Any, keep: str) -> str:
    """The last (keep="end") or first (keep="start") `budget` tokens' worth of text."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    offsets = enc["offset_mapping"]
    if len(offsets) <= budget:
        return text
    if keep == "end":
        return text[offsets[len(offsets) - budget][0] :]
    return text[: offsets[budget - 1][1]]


@dataclass
class Windower:
    """Cuts prefix and suffix windows out of documents, counting every window exactly."""

    tokenizer: Any
    prefix_budget: int
    suffix_budget: int
    count: Counter = field(init=False)

    def __post_init__(self) -> None:
        self.count = token_counter(self.tokenizer)

    def prefix(self, doc: Document, cursor: int) -> tuple[str, int]:
        """The text above the cursor: its own line, then whole lines upwards, ≤ budget tokens."""
        line = doc.line_of(cursor)
        start = doc.line_start(line)
        partial = doc.text[start:cursor]
        used = self.count(partial)
        if used >= self.prefix_budget:
            text = cut_to_tokens(partial, self.prefix_budget, self.tokenizer, keep="end")
            return self._trim_front(text, self.prefix_budget)
        # The first line j whose lines j..line-1 fit next to the partial line.
        room = self.prefix_budget - used
        j = int(np.searchsorted(doc.cum_tokens, doc.cum_tokens[line] - room, side="left"))
        j = min(max(j, 0), line)
        text = doc.text[doc.line_start(j) : cursor]
        n = self.count(text)
        while n > self.prefix_budget and j < line:  # lines counted in the file vs alone
            j += 1
            text = doc.text[doc.line_start(j) : cursor]
            n = self.count(text)
        return text, n

    def suffix(self, doc: Document, start: int, lead: str = "\n") -> tuple[str, int]:
        """`lead` + the text from `start` (a line start) downwards, whole lines, ≤ budget."""
        first = doc.line_of(start) if start < len(doc.text) else doc.lines
        room = self.suffix_budget - self.count(lead)
        # The last line m such that lines first..m-1 fit.
        m = int(np.searchsorted(doc.cum_tokens, doc.cum_tokens[first] + room, side="right") - 1)
        m = min(max(m, first), doc.lines)
        text = lead + doc.text[start : doc.line_start(m) if m < doc.lines else len(doc.text)]
        n = self.count(text)
        while n > self.suffix_budget and m > first:
            m -= 1
            text = lead + doc.text[start : doc.line_start(m)]
            n = self.count(text)
        if m == first and first < doc.lines and n <= self.count(lead):
            # Not even one whole line fits: part of the first one.
            line_end = doc.line_start(first + 1) if first + 1 <= doc.lines else len(doc.text)
            part = cut_to_tokens(doc.text[start:line_end], room, self.tokenizer, keep="start")
            text = lead + part
            n = self.count(text)
        return text, n

    def _trim_front(self, text: str, budget: int) -> tuple[str, int]:
        n = self.count(text)
        while n > budget and text:  # a cut can re-tokenize a token longer
            text = text[1:]
            n = self.count(text)
        return text, n
