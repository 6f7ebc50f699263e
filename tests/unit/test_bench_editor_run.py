"""The editor profile against the fake server over real HTTP: cancellation closes the
connection (the server counts an abort), the report's `editor` section, failures summarised."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from benchmarks.harness.client import Target
from benchmarks.harness.fake_server import FakeOpenAI, FakeServerThread
from benchmarks.harness.profile.files import load_profile
from benchmarks.harness.profile.schema import Profile
from benchmarks.harness.report.write import write_run_report
from benchmarks.harness.runner import Runner


def editor_profile(sessions: int = 4, duration: float = 4.0, **editor: Any) -> Profile:
    return load_profile(
        "editor",
        {
            "duration_s": duration,
            "load": {"type": "sessions", "sessions": sessions, "stagger_s": 0.5},
            "dataset": {"editor": {"repos": 2, "files": {"max_files": 8}, **editor}},
            "scrape_interval_s": 0.2,
        },
    )


async def test_an_editor_run_cancels_on_keystrokes_and_shows_what_finishes_in_time(
    tmp_path: Path,
) -> None:
    app = FakeOpenAI(ttft_s=0.03, token_delay_s=0.01, replica_id="replica-a")
    with FakeServerThread(app) as srv:
        target = Target(srv.base_url, api_key="secret-key", api_key_label="editor-key", name="fake")
        res = await Runner(editor_profile(), target).run()
    e = res.sections["editor"]
    assert e["requests_sent"] == len(res.records) > 20
    assert (
        e["completions_shown"] + e["requests_cancelled"] + e["requests_failed"]
        == e["requests_sent"]
    )
    assert e["completions_shown"] > 0 and e["requests_cancelled"] > 0 and e["requests_failed"] == 0
    # The server saw the cancelled requests go: counted as aborts, with their tokens.
    assert e["server_aborted_client_disconnect"] == app.aborted
    # Every cancelled request the server had answered (headers seen) is an abort there,
    # unless the cancel raced its last token (the server finished it: a 200 not shown);
    # one cancelled while still on the client (a loaded machine) never reached it.
    started = sum(1 for r in res.records if r.cancelled and r.first_byte is not None)
    finished_unseen = app.statuses["200"] - e["completions_shown"]
    assert 0 < started <= app.aborted + finished_unseen
    assert app.aborted <= e["requests_cancelled"]
    w = e["wasted_output_tokens"]
    assert w["source"] == "server" and w["value"] == app.aborted_tokens > 0
    # The client's partial streams are a lower bound of the server's aborted tokens, but
    # for the cancels that raced their last token: those the server finished (a 200) and
    # counted as generated, not aborted.
    partial = sorted((len(r.token_times) for r in res.records if r.cancelled), reverse=True)
    assert 0 < w["client_partial_streams"] <= w["value"] + sum(partial[:finished_unseen])
    # Successive requests of a session share their prefix: the fake's cache hits.
    assert e["prefix_cache_hit_rate"] > 0.3
    # Shown latency runs from the debounce to the last token: at least 32 tokens' worth.
    assert e["shown_latency_ms"]["p50"] >= 30 + 31 * 10
    # The generic summary: the shown ones, cancelled apart (not failures).
    s = res.summary
    assert s["completed"] == e["completions_shown"] and s["cancelled"] == e["requests_cancelled"]
    assert s["failed"] == 0 and not any("failed" in x for x in res.warnings)
    # Every record says who sent it and who answered, never the key itself.
    assert all(r.target == "fake" and r.api_key == "editor-key" for r in res.records)
    assert {r.replica for r in res.records if r.status == 200} == {"replica-a"}
    assert all(r.session and r.scheduled is not None for r in res.records)
    paths = write_run_report(res, tmp_path, with_requests=True, plots=False)
    data = json.loads(paths["json"].read_text())
    assert data["editor"]["requests_sent"] == e["requests_sent"]
    assert "secret-key" not in paths["json"].read_text()
    assert data["requests"][0]["replica"] == "replica-a"
    md = paths["markdown"].read_text()
    assert "## Editor sessions" in md and "shown / cancelled / failed" in md


async def test_a_server_that_refuses_suffix_fails_every_editor_request_with_its_reason() -> None:
    app = FakeOpenAI(reject_suffix=True)  # as vLLM's own server does for Code Llama
    with FakeServerThread(app) as srv:
        res = await Runner(editor_profile(sessions=2, duration=2.0), Target(srv.base_url)).run()
    e = res.sections["editor"]
    # Each request fails with the server's reason, unless the next keystroke cancels it
    # first (on a loaded machine the 400 can take longer than a keystroke).
    assert e["requests_failed"] > 3
    assert e["requests_failed"] + e["requests_cancelled"] == e["requests_sent"]
    assert e["completions_shown"] == 0
    assert e["errors"][0]["error"] == "HTTP 400: suffix is not currently supported"
    assert e["errors"][0]["count"] == e["requests_failed"]
    assert any("suffix is not currently supported" in w for w in res.warnings)
    assert res.warmup[0]["ok"] is False  # the warm-up failed too, and the run went on


async def test_single_line_mode_stops_at_the_end_of_the_line() -> None:
    bodies: list[dict[str, Any]] = []
    app = FakeOpenAI()
    orig = app.generate

    async def spy(send: Any, req: dict[str, Any], chat: bool, receive: Any = None) -> None:
        bodies.append(req)
        await orig(send, req, chat, receive)

    app.generate = spy  # type: ignore[method-assign]
    p = editor_profile(sessions=1, duration=1.5, single_line=True, max_tokens=8)
    with FakeServerThread(app) as srv:
        await Runner(p, Target(srv.base_url)).run()
    assert bodies and all(b["stop"] == ["\n"] and b["max_tokens"] == 8 for b in bodies)
    assert all(b["stream"] and isinstance(b["suffix"], str) for b in bodies)


async def test_two_workloads_at_once_split_by_key_and_replica() -> None:
    from benchmarks.harness.api import report, run_workloads, shares, split

    editor = {
        "load": {"type": "sessions", "sessions": 2, "stagger_s": 0.2},
        "duration_s": 2.0,
        "warmup_requests": 0,
        "dataset": {"type": "editor", "editor": {"repos": 1, "files": {"max_files": 3}}},
    }
    flood = {
        "load": {"type": "concurrent", "concurrency": 4},
        "duration_s": 2.0,
        "warmup_requests": 0,
        "request": {"max_tokens": 8},
    }
    with (
        FakeServerThread(FakeOpenAI(token_delay_s=0.005, replica_id="r1")) as a,
        FakeServerThread(FakeOpenAI(token_delay_s=0.005, replica_id="r2")) as b,
    ):
        ed, fl = await run_workloads(
            [
                (editor, Target(a.base_url, api_key="k1", api_key_label="interactive")),
                (flood, Target(b.base_url, api_key="k2", api_key_label="batch")),
            ]
        )
    assert "editor" in report(ed) and "editor" not in report(fl)
    assert report(ed)["requests"][0]["api_key"] == "interactive"
    records = ed.records + fl.records
    by_key = split(records, by="api_key")
    assert set(by_key) == {"interactive", "batch"}
    by_replica = shares([r for r in records if r.status == 200], by="replica")
    assert set(by_replica) == {"r1", "r2"}
    assert sum(v["share"] for v in by_replica.values()) == 1.0
