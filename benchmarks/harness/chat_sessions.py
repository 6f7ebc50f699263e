"""The `chat-sessions` dataset: Instruct conversations that grow turn by turn.

Each virtual user opens a conversation with a HumanEval task, then asks follow-ups;
every turn resends the whole history — system, user, assistant, user, … — with
the assistant turns being the server's own previous answers, as a chat client
does. Between turns the user thinks (seeded). A conversation ends after its
drawn number of turns, on a failed turn (there is no answer to go on from), or
before its history would overflow the context; then the user starts another.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from benchmarks.harness.datasets import CHAT_TEMPLATE, RequestItem, humaneval_problems
from benchmarks.harness.metrics import MS
from benchmarks.harness.profile.schema import Profile
from benchmarks.harness.profile.workloads import ChatSessionsSpec, SessionsLoad
from benchmarks.harness.records import RequestRecord
from benchmarks.harness.results import RunResult
from benchmarks.harness.session_phase import SessionContext

FOLLOW_UPS = (
    "Add type hints and a docstring that explains the edge cases.",
    "Now write pytest unit tests for it, including the edge cases.",
    "Can you make it faster? Say what its time complexity is.",
    "Rewrite it without any imports.",
    "Make it raise ValueError on invalid input.",
    "Refactor it into smaller helper functions.",
    "Explain how it works, step by step.",
    "Make sure it also works for an empty input.",
)
MESSAGE_OVERHEAD_TOKENS = 8  # [INST], [/INST], <<SYS>>, BOS/EOS around each turn


@dataclass
class ConversationStats:
    started: int = 0
    completed: int = 0  # all drawn turns answered
    ended_by_failure: int = 0
    ended_by_context: int = 0


@dataclass
class ChatSessionsWorkload:
    profile: Profile
    tokenizer: Any
    stats: ConversationStats = field(default_factory=ConversationStats)
    _items: dict[int, RequestItem] = field(default_factory=dict)
    _turn_of: dict[int, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.problems = humaneval_problems()

    @property
    def spec(self) -> ChatSessionsSpec:
        assert self.profile.dataset.chat_sessions is not None
        return self.profile.dataset.chat_sessions

    @property
    def load(self) -> SessionsLoad:
        assert isinstance(self.profile.load, SessionsLoad)
        return self.profile.load

    @property
    def label(self) -> str:
        return f"{self.load.sessions} chat sessions"

    @property
    def offered(self) -> dict[str, Any]:
        return {"sessions": self.load.sessions, "turns_mean": self.spec.turns.mean}

    def first_turn(self, rng: np.random.Generator) -> tuple[dict[str, str], ...]:
        p = self.problems[int(rng.integers(len(self.problems)))]
        system = ({"role": "system", "content": self.spec.system},) if self.spec.system else ()
        return (*system, {"role": "user", "content": CHAT_TEMPLATE.format(prompt=p["prompt"])})

    def warmup_items(self, n: int) -> list[RequestItem]:
        rng = np.random.default_rng(self.profile.seed + 1)
        return [RequestItem(f"chat/warmup/{i}", messages=self.first_turn(rng)) for i in range(n)]

    def tokens(self, messages: tuple[dict[str, str], ...]) -> int:
        enc = self.tokenizer([m["content"] for m in messages], add_special_tokens=False).input_ids
        return sum(len(ids) + MESSAGE_OVERHEAD_TOKENS for ids in enc)

    async def run(self, ctx: SessionContext) -> None:
        seeds = np.random.SeedSequence(self.profile.seed).spawn(self.load.sessions)
        starts = np.random.default_rng(self.profile.seed).uniform(
            0.0, self.load.stagger_s, self.load.sessions
        )
        sent = [0]
        await asyncio.gather(
            *(
                self._user(
                    ctx, f"chat-{i}", np.random.default_rng(seeds[i]), float(starts[i]), sent
                )
                for i in range(self.load.sessions)
            )
        )

    def _more(self, ctx: SessionContext, t: float, sent: list[int]) -> bool:
        assert self.profile.duration_s is not None
        within = t < self.profile.duration_s
        return within and (ctx.num_requests is None or sent[0] < ctx.num_requests)

    async def _user(
        self, ctx: SessionContext, sid: str, rng: np.random.Generator, t: float, sent: list[int]
    ) -> None:
        conv = 0
        while self._more(ctx, t, sent):
            await ctx.sleep_until(t)
            t = await self._conversation(ctx, sid, conv, rng, t, sent)
            conv += 1

    async def _conversation(
        self,
        ctx: SessionContext,
        sid: str,
        conv: int,
        rng: np.random.Generator,
        t: float,
        sent: list[int],
    ) -> float:
        """One conversation from its first turn at time t; when the next one may start."""
        spec, max_tokens = self.spec, self.profile.request.max_tokens or 0
        turns = max(1, round(spec.turns.draw(rng)))
        self.stats.started += 1
        history = self.first_turn(rng)
        for turn in range(turns):
            if self.tokens(history) + max_tokens > spec.context_tokens:
                self.stats.ended_by_context += 1
                return t
            rec = ctx.new_record(f"chat/{sid}/c{conv}/t{turn}", sid, t)
            item = RequestItem(rec.item_id, messages=history)
            self._items[rec.index], self._turn_of[rec.index] = item, turn
            sent[0] += 1
            await ctx.send(item, rec)
            if not rec.ok:
                self.stats.ended_by_failure += 1
                return ctx.elapsed()
            t = ctx.elapsed() + spec.think_time_s.draw(rng)
            if turn + 1 == turns:
                self.stats.completed += 1
                return t
            if not self._more(ctx, t, sent):  # the run ends before the user's next turn
                return t
            await ctx.sleep_until(t)
            follow_up = FOLLOW_UPS[int(rng.integers(len(FOLLOW_UPS)))]
            history = (
                *history,
                {"role": "assistant", "content": rec.text},
                {"role": "user", "content": follow_up},
            )
        return t

    def item_of(self, rec: RequestRecord) -> RequestItem | None:
        return self._items.get(rec.index)

    def sections(self, result: RunResult) -> dict[str, Any]:
        by_turn: dict[int, list[RequestRecord]] = defaultdict(list)
        for r in result.records:
            if r.index in self._turn_of:
                by_turn[self._turn_of[r.index]].append(r)
        turns = {}
        for k in sorted(by_turn):
            recs = by_turn[k]
            ok = [r for r in recs if r.ok]
            prompt = [r.prompt_tokens for r in ok if r.prompt_tokens is not None]
            ttft = [(r.token_times[0] - r.sent) * MS for r in ok if r.token_times and r.sent]
            turns[str(k + 1)] = {
                "sent": len(recs),
                "failed": len(recs) - len(ok),
                "prompt_tokens_mean": float(np.mean(prompt)) if prompt else None,
                "median_ttft_ms": float(np.median(ttft)) if ttft else None,
            }
        s = self.stats
        return {
            "chat_sessions": {
                "sessions": self.load.sessions,
                "conversations": s.started,
                "conversations_completed": s.completed,
                "ended_by_failure": s.ended_by_failure,
                "ended_by_context": s.ended_by_context,
                "turns_sent": sum(v["sent"] for v in turns.values()),
                "by_turn": turns,
            }
        }
