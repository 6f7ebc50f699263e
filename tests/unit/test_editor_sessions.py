"""Editor sessions on synthetic time: debounce, cancellation, growing prefixes, windows,
and every request accounted for exactly once (the pure state machine and the async driver)."""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Coroutine
from typing import Any

import numpy as np
import pytest

from benchmarks.harness.editor.corpus import SourceFile, build_repos, choose_files
from benchmarks.harness.editor.driver import Budget, EditorDriver
from benchmarks.harness.editor.session import (
    Cancel,
    Documents,
    EditorSession,
    FimRequest,
    Send,
    simulate,
)
from benchmarks.harness.editor.summary import editor_summary
from benchmarks.harness.editor.window import Document, Windower, token_counter
from benchmarks.harness.profile.workloads import EditorSpec
from benchmarks.harness.records import RequestRecord

SMALL_FILE = SourceFile(
    "small.py",
    "def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n\n\n"
    "def mul(a, b):\n    total = 0\n    for _ in range(b):\n        total += a\n    return total\n",
)


def steady_spec(**editor: Any) -> EditorSpec:
    """A metronome typist: exactly `keys_per_s`, no jitter, no pauses unless asked."""
    base: dict[str, Any] = {
        "debounce_ms": 75,
        "typing": {"keys_per_s": {"mean": 10.0, "cv": 0}, "gap_cv": 0, "auto_indent": False},
        "pauses": {
            "line_end_prob": 0,
            "key_prob": 0,
            "chunk_end_s": {"mean": 5.0, "cv": 0},
        },
        "chunk_lines": {"mean": 200, "cv": 0},  # the whole file is one chunk
        "repos": 1,
        "repo_context_tokens": 0,
        "window": {"prefix_tokens": 1024, "suffix_tokens": 512},
    }
    for k, v in editor.items():
        base[k] = base[k] | v if isinstance(v, dict) and k in base else v
    return EditorSpec.model_validate(base)


def session(
    tok: Any,
    spec: EditorSpec,
    files: list[SourceFile] | None = None,
    seed: int = 0,
    until: float = 30.0,
    sid: str = "s0",
) -> EditorSession:
    count = token_counter(tok)
    repo = build_repos(1, files or [SMALL_FILE], spec.repo_context_tokens, count)[0]
    windower = Windower(tok, spec.window.prefix_tokens, spec.window.suffix_tokens)
    s = EditorSession(
        sid, repo, Documents(tok), windower, spec, np.random.default_rng(seed), until=until
    )
    # Start typing at the top of the file (tests read positions from there).
    s.editing.a = s.editing.cursor = 0
    s.editing.b = len(s.editing.doc.text)
    return s


def test_keystrokes_closer_than_the_debounce_send_nothing(demo_tokenizer: Any) -> None:
    s = session(demo_tokenizer, steady_spec(debounce_ms=150))  # keys every 100 ms
    actions = s.advance(5.0)  # 50 keystrokes, none followed by 150 ms of quiet
    assert actions == [] and s.keystrokes == 51 and s.sent == 0
    assert s.debounce_at == pytest.approx(5.0 + 0.15)


def test_the_debounce_fires_a_request_75_ms_after_the_last_keystroke(demo_tokenizer: Any) -> None:
    s = session(demo_tokenizer, steady_spec())
    assert s.advance(0.074) == []  # the first keystroke at 0; its timer at 0.075
    (send,) = s.advance(0.075)
    assert isinstance(send, Send) and send.request.fired_at == pytest.approx(0.075)
    assert send.request.prompt == "d" and send.request.seq == 0


def test_a_keystroke_during_the_request_cancels_it(demo_tokenizer: Any) -> None:
    s = session(demo_tokenizer, steady_spec())
    (send,) = s.advance(0.075)
    actions = s.advance(0.100)  # the next keystroke, with the request still in flight
    assert actions == [Cancel(send.request.seq, pytest.approx(0.1))]
    assert s.in_flight is None


def test_a_request_that_ends_before_the_next_keystroke_is_not_cancelled(
    demo_tokenizer: Any,
) -> None:
    s = session(demo_tokenizer, steady_spec())
    (send,) = s.advance(0.075)
    s.finished(send.request.seq)  # answered within 25 ms
    assert s.advance(0.100) == []  # the keystroke has nothing to cancel: it was shown


def test_a_pause_lets_a_slow_completion_be_shown(demo_tokenizer: Any) -> None:
    spec = steady_spec(pauses={"line_end_prob": 1.0, "duration_s": {"mean": 2.0, "cv": 0}})
    outcomes = simulate([session(demo_tokenizer, spec, until=10.0)], lambda r: (0.5, True))
    shown = [o for o in outcomes if not o.cancelled and not o.failed]
    cancelled = [o for o in outcomes if o.cancelled]
    assert shown and cancelled
    # Shown ones were fired right after a newline (the pause); the rest were overtaken.
    assert all(o.request.prompt.endswith("\n") for o in shown)
    assert not any(o.request.prompt.endswith("\n") for o in cancelled)


def test_prefixes_grow_as_typed(demo_tokenizer: Any) -> None:
    spec = steady_spec(debounce_ms=50)
    outcomes = simulate([session(demo_tokenizer, spec, until=4.0)], lambda r: (0.01, True))
    prompts = [o.request.prompt for o in outcomes]
    assert len(prompts) == 40  # one per keystroke: every gap (100 ms) exceeds the debounce
    for a, b in itertools.pairwise(prompts):
        assert b.startswith(a) and len(b) == len(a) + 1  # one character typed in between
    assert prompts[-1] == SMALL_FILE.text[:40]
    # Below the cursor: the rest of the file, after the chunk being written.
    assert all(o.request.suffix == "\n" for o in outcomes)


def test_auto_indent_types_the_indentation_with_enter(demo_tokenizer: Any) -> None:
    spec = steady_spec(typing={"auto_indent": True}, debounce_ms=50)
    outcomes = simulate([session(demo_tokenizer, spec, until=2.0)], lambda r: (0.01, True))
    after_enter = next(o.request.prompt for o in outcomes if "\n" in o.request.prompt)
    assert after_enter == "def add(a, b):\n    "


def test_every_request_is_accounted_exactly_once(demo_tokenizer: Any) -> None:
    spec = EditorSpec.model_validate({"repos": 2, "files": {"max_files": 6}})
    files = choose_files(spec.files, np.random.default_rng(1))
    rng = np.random.default_rng(7)

    def latency(_r: FimRequest) -> tuple[float, bool]:
        return float(rng.exponential(0.3)), bool(rng.random() > 0.1)

    sessions = [
        session(demo_tokenizer, spec, files, seed=i, until=20.0, sid=f"s{i}") for i in range(4)
    ]
    outcomes = simulate(sessions, latency)
    sent = sum(s.sent for s in sessions)
    assert len(outcomes) == sent > 50
    assert len({(o.request.session, o.request.seq) for o in outcomes}) == sent
    shown = sum(1 for o in outcomes if not o.cancelled and not o.failed)
    cancelled = sum(1 for o in outcomes if o.cancelled)
    failed = sum(1 for o in outcomes if o.failed and not o.cancelled)
    assert shown + cancelled + failed == sent and shown and cancelled and failed
    assert all(o.ended_at is not None for o in outcomes)


def test_sessions_are_reproducible_from_the_seed(demo_tokenizer: Any) -> None:
    spec = EditorSpec.model_validate({"repos": 1, "files": {"max_files": 3}})
    files = choose_files(spec.files, np.random.default_rng(2))

    def run(seed: int) -> list[tuple[float, str, str]]:
        s = session(demo_tokenizer, spec, files, seed=seed, until=15.0)
        return [
            (o.request.fired_at, o.request.prompt, o.request.suffix)
            for o in simulate([s], lambda r: (0.2, True))
        ]

    a, b = run(5), run(5)
    assert a == b and len(a) > 10
    assert run(6) != a


def test_windows_fit_their_token_budgets_keeping_the_text_nearest_the_cursor(
    demo_tokenizer: Any,
) -> None:
    count = token_counter(demo_tokenizer)
    spec = EditorSpec.model_validate({"files": {"sources": ["stdlib"], "max_files": 4}})
    big = max(choose_files(spec.files, np.random.default_rng(0)), key=lambda f: len(f.text))
    doc = Document.build(big.name, big.text, demo_tokenizer)
    assert count(big.text) > 2048  # a whole file would overflow the demo model
    w = Windower(demo_tokenizer, prefix_budget=300, suffix_budget=120)
    cursor = doc.line_start(doc.lines // 2) + 7
    prefix, n_prefix = w.prefix(doc, cursor)
    suffix, n_suffix = w.suffix(doc, doc.line_start(doc.lines // 2 + 1))
    assert n_prefix == count(prefix) <= 300 and n_prefix > 250
    assert big.text[:cursor].endswith(prefix)  # the nearest text, whole lines
    assert n_suffix == count(suffix) <= 120 and n_suffix > 80
    assert suffix.startswith("\n") and big.text[doc.line_start(doc.lines // 2 + 1) :].startswith(
        suffix[1:]
    )


def test_sessions_of_a_repo_share_its_context_header(demo_tokenizer: Any) -> None:
    count = token_counter(demo_tokenizer)
    spec = EditorSpec.model_validate({"repos": 2, "files": {"max_files": 6}})
    files = choose_files(spec.files, np.random.default_rng(3))
    repos = build_repos(2, files, 200, count)
    assert all(0 < r.header_tokens <= 200 and count(r.header) == r.header_tokens for r in repos)
    assert repos[0].header != repos[1].header
    w = Windower(demo_tokenizer, 1024, 512)
    docs = Documents(demo_tokenizer)
    s0, s2 = (
        EditorSession(f"s{i}", repos[0], docs, w, spec, np.random.default_rng(i)) for i in (0, 2)
    )
    assert s0.request(0).prompt.startswith(repos[0].header)
    assert s2.request(0).prompt.startswith(repos[0].header)


def test_a_window_that_cannot_fit_the_context_is_refused() -> None:
    with pytest.raises(ValueError, match="do not fit context_tokens 2048"):
        EditorSpec.model_validate({"window": {"prefix_tokens": 1800, "suffix_tokens": 400}})


# ---------------------------------------------------------------- the async driver


class VirtualTime:
    """asyncio on synthetic time: sleeps resolve in time order once nothing else can run."""

    def __init__(self) -> None:
        self.t = 0.0
        self._heap: list[tuple[float, int, asyncio.Future[None]]] = []
        self._n = 0

    def clock(self) -> float:
        return self.t

    async def sleep(self, delay: float) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._n += 1
        heapq.heappush(self._heap, (self.t + max(0.0, delay), self._n, fut))
        await fut

    async def run(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        while not task.done():
            for _ in range(50):
                await asyncio.sleep(0)
            while self._heap and not task.done():
                t, _, fut = heapq.heappop(self._heap)
                if not fut.done():
                    self.t = max(self.t, t)
                    fut.set_result(None)
                    break
        task.result()


async def test_the_driver_on_synthetic_time_matches_the_simulation(demo_tokenizer: Any) -> None:
    spec = EditorSpec.model_validate({"repos": 2, "files": {"max_files": 6}})
    files = choose_files(spec.files, np.random.default_rng(4))

    def latency(req: FimRequest) -> float:  # deterministic per request
        return 0.05 + (hash(req.id) % 1000) / 1000 * 0.6

    def fresh() -> list[EditorSession]:
        return [
            session(demo_tokenizer, spec, files, seed=i, until=15.0, sid=f"s{i}") for i in range(3)
        ]

    expected = {o.request.id: o.cancelled for o in simulate(fresh(), lambda r: (latency(r), True))}
    vt = VirtualTime()
    records: list[RequestRecord] = []

    def new_record(req: FimRequest) -> RequestRecord:
        rec = RequestRecord(len(records), req.id, scheduled=req.fired_at)
        records.append(rec)
        return rec

    async def send(req: FimRequest, rec: RequestRecord) -> None:
        rec.sent = vt.clock()
        try:
            await vt.sleep(latency(req))
        except asyncio.CancelledError:
            if rec.cancelled:  # as OpenAIClient.send: a cancel on purpose ends the record
                rec.finished = vt.clock()
            raise
        rec.token_times, rec.finished, rec.text = [vt.clock()], vt.clock(), "x"

    driver = EditorDriver(fresh(), new_record, send, 0.0, Budget(None), vt.clock, vt.sleep)
    await vt.run(driver.run())
    assert {r.item_id: r.cancelled for r in records} == expected
    summary = editor_summary(records, {}, sessions=3)
    assert summary["requests_sent"] == len(records) == len(expected)
    assert summary["completions_shown"] + summary["requests_cancelled"] == len(records)
    assert summary["requests_cancelled"] and summary["completions_shown"]
    assert summary["wasted_output_tokens"]["source"] == "client"
    shown_latency = summary["shown_latency_ms"]["p50"]
    assert 50 <= shown_latency <= 650  # debounce expiry to last token: the latency drawn


async def test_the_request_budget_stops_every_session(demo_tokenizer: Any) -> None:
    vt = VirtualTime()
    records: list[RequestRecord] = []

    def new_record(req: FimRequest) -> RequestRecord:
        records.append(RequestRecord(len(records), req.id, scheduled=req.fired_at))
        return records[-1]

    async def send(req: FimRequest, rec: RequestRecord) -> None:
        rec.sent = vt.clock()
        await vt.sleep(0.01)
        rec.finished = vt.clock()

    spec = steady_spec()
    sessions = [session(demo_tokenizer, spec, sid=f"s{i}") for i in range(3)]
    driver = EditorDriver(sessions, new_record, send, 0.0, Budget(10), vt.clock, vt.sleep)
    await vt.run(driver.run())
    assert len(records) == 10 and vt.t < 2.0
