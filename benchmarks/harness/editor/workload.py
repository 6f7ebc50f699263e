"""The `editor` dataset as a session workload: the corpus, the repos, N sessions, the driver."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from benchmarks.harness.datasets import RequestItem
from benchmarks.harness.editor.corpus import Repo, build_repos, choose_files
from benchmarks.harness.editor.driver import Budget, EditorDriver
from benchmarks.harness.editor.session import Documents, EditorSession, FimRequest
from benchmarks.harness.editor.summary import editor_summary
from benchmarks.harness.editor.window import Windower, token_counter
from benchmarks.harness.profile.schema import Profile
from benchmarks.harness.profile.workloads import EditorSpec, SessionsLoad
from benchmarks.harness.records import RequestRecord
from benchmarks.harness.results import RunResult
from benchmarks.harness.session_phase import SessionContext


@dataclass(frozen=True, slots=True)
class WindowSize:
    repo: str
    header_tokens: int
    prefix_tokens: int
    suffix_tokens: int


def fim_item(req: FimRequest, spec: EditorSpec) -> RequestItem:
    return RequestItem(
        req.id, prompt=req.prompt, suffix=req.suffix, max_tokens=spec.max_tokens,
        stop=tuple(spec.stop),
    )  # fmt: skip


@dataclass
class EditorWorkload:
    """Virtual developers of `load.sessions`, typing for the profile's duration."""

    profile: Profile
    tokenizer: Any
    repos: list[Repo] = field(init=False)
    keep_items: bool = False  # for quality's equivalence check: every item sent
    _items: dict[int, RequestItem] = field(default_factory=dict)
    _windows: dict[int, WindowSize] = field(default_factory=dict)
    _sessions: list[EditorSession] = field(default_factory=list)

    def __post_init__(self) -> None:
        spec = self.spec
        rng = np.random.default_rng(self.profile.seed)
        files = choose_files(spec.files, rng)
        self.repos = build_repos(
            spec.repos, files, spec.repo_context_tokens, token_counter(self.tokenizer)
        )
        self.docs = Documents(self.tokenizer)
        self.windower = Windower(
            self.tokenizer, spec.window.prefix_tokens, spec.window.suffix_tokens
        )

    @property
    def spec(self) -> EditorSpec:
        assert self.profile.dataset.editor is not None
        return self.profile.dataset.editor

    @property
    def load(self) -> SessionsLoad:
        assert isinstance(self.profile.load, SessionsLoad)
        return self.profile.load

    @property
    def label(self) -> str:
        return f"{self.load.sessions} editor sessions"

    @property
    def offered(self) -> dict[str, Any]:
        s = self.spec
        return {
            "sessions": self.load.sessions,
            "repos": s.repos,
            "debounce_ms": s.debounce_ms,
            "keys_per_s_mean": s.typing.keys_per_s.mean,
            "max_tokens": s.max_tokens,
        }

    def sessions(self, until: float) -> list[EditorSession]:
        """The sessions, seeded: session i in repo i % repos, started within stagger_s."""
        seeds = np.random.SeedSequence(self.profile.seed).spawn(self.load.sessions + 1)
        n = self.load.sessions
        starts = np.random.default_rng(seeds[-1]).uniform(0.0, self.load.stagger_s, n)
        return [
            EditorSession(
                f"editor-{i}",
                self.repos[i % len(self.repos)],
                self.docs,
                self.windower,
                self.spec,
                np.random.default_rng(seeds[i]),
                start_at=float(starts[i]),
                until=until,
            )
            for i in range(n)
        ]

    def warmup_items(self, n: int) -> list[RequestItem]:
        """The first request each of the first n sessions would send (not measured)."""
        out = []
        for s in self.sessions(until=1.0)[:n]:
            out.append(fim_item(s.request(0.0), self.spec))
        return out

    async def run(self, ctx: SessionContext) -> None:
        assert self.profile.duration_s is not None
        self._sessions = self.sessions(until=self.profile.duration_s)
        spec = self.spec

        def new_record(req: FimRequest) -> RequestRecord:
            rec = ctx.new_record(req.id, req.session, req.fired_at)
            self._windows[rec.index] = WindowSize(
                req.repo, req.header_tokens, req.prefix_tokens, req.suffix_tokens
            )
            return rec

        async def send(req: FimRequest, rec: RequestRecord) -> None:
            item = fim_item(req, spec)
            if self.keep_items:
                self._items[rec.index] = item
            await ctx.send(item, rec)

        driver = EditorDriver(
            self._sessions, new_record, send, ctx.start, Budget(ctx.num_requests),
            clock=ctx.clock, sleep=ctx.sleep,
        )  # fmt: skip
        await driver.run()

    def item_of(self, rec: RequestRecord) -> RequestItem | None:
        return self._items.get(rec.index)

    def sections(self, result: RunResult) -> dict[str, Any]:
        summary = editor_summary(
            result.records,
            result.server,
            sessions=self.load.sessions,
            percentiles=result.profile.percentiles,
        )
        summary["keystrokes"] = sum(s.keystrokes for s in self._sessions)
        summary["window_tokens"] = _window_stats(list(self._windows.values()))
        summary["repos"] = [
            {"name": r.name, "files": len(r.files), "context_tokens": r.header_tokens}
            for r in self.repos
        ]
        return {"editor": summary}


def _window_stats(sizes: list[WindowSize]) -> dict[str, Any]:
    if not sizes:
        return {}
    return {
        key: {
            "mean": float(np.mean([getattr(w, key) for w in sizes])),
            "max": int(max(getattr(w, key) for w in sizes)),
        }
        for key in ("header_tokens", "prefix_tokens", "suffix_tokens")
    }
