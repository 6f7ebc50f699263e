"""One virtual developer as a pure state machine on a clock it is given.

The developer writes chunks of a real file: a few lines at a random place
(what is below stays: the suffix), one keystroke at a time, at a seeded pace,
with think-time pauses. Every keystroke re-arms a debounce timer; when it
expires the session sends a FIM request for the text around the cursor. A
keystroke while that request is in flight cancels it (the editor closes the
connection); a request that finishes before the next keystroke is *shown*.

No clock, no I/O: `advance(t)` processes everything due up to time t and says
what to send and what to cancel; `finished(seq)` tells it a request ended.
The keystroke timeline depends only on the seed, never on the server, so a run
is reproducible, and the tests drive sessions on synthetic time.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from benchmarks.harness.editor.corpus import Repo
from benchmarks.harness.editor.window import Document, Windower
from benchmarks.harness.profile.workloads import EditorSpec


@dataclass(frozen=True, slots=True)
class FimRequest:
    session: str
    repo: str
    seq: int  # the session's n-th request
    fired_at: float  # when the debounce expired (session clock, s)
    prompt: str  # repo header + the window above the cursor
    suffix: str  # the window below the cursor
    header_tokens: int
    prefix_tokens: int  # of the window above the cursor (without the header)
    suffix_tokens: int
    file: str
    cursor: int  # offset in the file: everything above it was typed (or was there)

    @property
    def id(self) -> str:
        return f"{self.session}/{self.seq}"


@dataclass(frozen=True, slots=True)
class Send:
    request: FimRequest


@dataclass(frozen=True, slots=True)
class Cancel:
    seq: int
    at: float


Action = Send | Cancel


class Documents:
    """Files tokenized once, shared by every session (a request only counts its window)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._docs: dict[str, Document] = {}
        # The window below a chunk stays the same while the chunk is written.
        self.suffixes: dict[tuple[str, int], tuple[str, int]] = {}

    def get(self, name: str, text: str) -> Document:
        doc = self._docs.get(name)
        if doc is None:
            doc = self._docs[name] = Document.build(name, text, self.tokenizer)
        return doc


class Typist:
    """When the next keystroke comes: a per-session pace, jitter, and pauses."""

    def __init__(self, spec: EditorSpec, rng: np.random.Generator) -> None:
        self.spec = spec
        self.rng = rng
        self.keys_per_s = spec.typing.keys_per_s.draw(rng)

    def gap(self, typed: str, chunk_done: bool) -> float:
        spec, rng = self.spec, self.rng
        mean = 1.0 / self.keys_per_s
        cv = spec.typing.gap_cv
        base = mean if cv == 0 else float(rng.lognormal(*_lognormal_params(mean, cv)))
        if chunk_done:
            return base + spec.pauses.chunk_end_s.draw(rng)
        p = spec.pauses
        at_line_end = "\n" in typed and rng.random() < p.line_end_prob
        if at_line_end or rng.random() < p.key_prob:
            base += p.duration_s.draw(rng)
        return base


def _lognormal_params(mean: float, cv: float) -> tuple[float, float]:
    sigma2 = float(np.log1p(cv * cv))
    return float(np.log(mean) - sigma2 / 2), float(np.sqrt(sigma2))


class Editing:
    """Where the cursor is: a chunk of lines [a, b) of a file being (re)written."""

    def __init__(
        self, repo: Repo, docs: Documents, spec: EditorSpec, rng: np.random.Generator
    ) -> None:
        self.repo, self.docs, self.spec, self.rng = repo, docs, spec, rng
        self.file_index = int(rng.integers(len(repo.files)))
        self.doc = self._doc()
        self.a = self.b = self.cursor = 0
        self.new_chunk()

    def _doc(self) -> Document:
        f = self.repo.files[self.file_index]
        return self.docs.get(f.name, f.text)

    def new_chunk(self) -> None:
        """Lines [a, b) at a random place of the file, not all blank; the cursor at a."""
        doc, rng = self.doc, self.rng
        for _ in range(100):
            first = int(rng.integers(doc.lines))
            n = max(1, round(self.spec.chunk_lines.draw(rng)))
            last = min(doc.lines, first + n)
            a, b = (
                doc.line_start(first),
                doc.line_start(last) if last < doc.lines else len(doc.text),
            )
            if doc.text[a:b].strip():
                break
        self.a, self.b, self.cursor = a, b, a

    def keystroke(self) -> tuple[str, bool]:
        """Type the next character (Enter also types the indentation); (typed, chunk done)."""
        text, i = self.doc.text, self.cursor
        j = i + 1
        if text[i] == "\n" and self.spec.typing.auto_indent:
            while j < self.b and text[j] in " \t":
                j += 1
        self.cursor = j
        return text[i:j], j >= self.b

    def next_chunk(self) -> None:
        if len(self.repo.files) > 1 and self.rng.random() < self.spec.switch_file_prob:
            step = 1 + int(self.rng.integers(len(self.repo.files) - 1))
            self.file_index = (self.file_index + step) % len(self.repo.files)
            self.doc = self._doc()
        self.new_chunk()


class EditorSession:
    """A developer typing, debouncing and sending FIM requests (pure; see module doc)."""

    def __init__(
        self,
        sid: str,
        repo: Repo,
        docs: Documents,
        windower: Windower,
        spec: EditorSpec,
        rng: np.random.Generator,
        *,
        start_at: float = 0.0,
        until: float = float("inf"),
    ) -> None:
        self.sid, self.repo, self.windower, self.spec = sid, repo, windower, spec
        self.docs = docs
        self.typist = Typist(spec, rng)
        self.editing = Editing(repo, docs, spec, rng)
        self.debounce_s = spec.debounce_ms / 1000
        self.until = until
        self.next_key_at: float | None = start_at if start_at < until else None
        self.debounce_at: float | None = None
        self.in_flight: int | None = None
        self.sent = 0
        self.keystrokes = 0

    def next_wakeup(self) -> float | None:
        """When the next keystroke or debounce expiry is due (None: nothing more to do)."""
        due = [t for t in (self.next_key_at, self.debounce_at) if t is not None]
        return min(due) if due else None

    def stop_typing(self) -> None:
        """No keystroke after this (the run's request budget is spent); a due debounce stays."""
        self.next_key_at = None

    def advance(self, t: float) -> list[Action]:
        """Everything due up to time t, in time order (a keystroke wins a tie with the timer)."""
        actions: list[Action] = []
        while True:
            k, d = self.next_key_at, self.debounce_at
            if k is not None and k <= t and (d is None or k <= d):
                actions += self._keystroke(k)
            elif d is not None and d <= t:
                actions.append(self._fire(d))
            else:
                return actions

    def finished(self, seq: int) -> None:
        """The request ended by itself (completed or failed) before any keystroke cancelled it."""
        if self.in_flight == seq:
            self.in_flight = None

    def _keystroke(self, t: float) -> list[Action]:
        out: list[Action] = []
        if self.in_flight is not None:
            out.append(Cancel(self.in_flight, t))
            self.in_flight = None
        typed, chunk_done = self.editing.keystroke()
        self.keystrokes += 1
        if chunk_done:
            self.editing.next_chunk()
        self.debounce_at = t + self.debounce_s
        nxt = t + self.typist.gap(typed, chunk_done)
        self.next_key_at = nxt if nxt < self.until else None
        return out

    def _fire(self, t: float) -> Send:
        self.debounce_at = None
        req = self.request(t)
        self.in_flight = req.seq
        self.sent += 1
        return Send(req)

    def request(self, t: float) -> FimRequest:
        """The FIM request for the cursor's position now."""
        e, w, repo = self.editing, self.windower, self.repo
        prefix, n_prefix = w.prefix(e.doc, e.cursor)
        key = (e.doc.name, e.b)
        cached = self.docs.suffixes.get(key)
        if cached is None:
            cached = self.docs.suffixes[key] = w.suffix(e.doc, e.b)
        suffix, n_suffix = cached
        return FimRequest(
            session=self.sid,
            repo=repo.name,
            seq=self.sent,
            fired_at=t,
            prompt=repo.header + prefix,
            suffix=suffix,
            header_tokens=repo.header_tokens,
            prefix_tokens=n_prefix,
            suffix_tokens=n_suffix,
            file=e.doc.name,
            cursor=e.cursor,
        )


# ---------------------------------------------------------------- synthetic time


@dataclass
class Outcome:
    request: FimRequest
    ended_at: float | None = None
    cancelled: bool = False
    failed: bool = False


def simulate(
    sessions: Iterable[EditorSession],
    latency: Callable[[FimRequest], tuple[float, bool]],
) -> list[Outcome]:
    """Run sessions on synthetic time against a server that answers after `latency(req)`.

    latency gives (seconds, ok). A discrete-event loop: the same state machines
    the real driver runs, with time jumping from event to event.
    """
    ss = list(sessions)
    outcomes: dict[tuple[int, int], Outcome] = {}
    ends: list[tuple[float, int, int]] = []  # (time, session index, seq)
    while True:
        wakes = [(s.next_wakeup(), i) for i, s in enumerate(ss)]
        due = [(t, i) for t, i in wakes if t is not None]
        t_wake, i_wake = min(due) if due else (None, -1)
        if ends and (t_wake is None or ends[0][0] < t_wake):
            t, i, seq = heapq.heappop(ends)
            o = outcomes[(i, seq)]
            if not o.cancelled:
                o.ended_at = t
                ss[i].finished(seq)
            continue
        if t_wake is None:
            return list(outcomes.values())
        for action in ss[i_wake].advance(t_wake):
            if isinstance(action, Send):
                delay, ok = latency(action.request)
                o = outcomes[(i_wake, action.request.seq)] = Outcome(action.request, failed=not ok)
                heapq.heappush(ends, (t_wake + delay, i_wake, action.request.seq))
            else:
                o = outcomes[(i_wake, action.seq)]
                o.cancelled, o.ended_at, o.failed = True, action.at, False
