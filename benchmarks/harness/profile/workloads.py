"""The schema of code-assistant workloads: editor sessions, shared-prefix groups,
multi-turn chat sessions, and the scoring of what comes back (`quality`).

Editor and chat sessions are stateful: what a session sends next depends on the
clock (keystrokes, think time) or on the server's last answer, so they run in a
phase of their own (`load: {type: sessions}`); shared-prefix groups are plain
items that any load can send.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    PositiveFloat,
    PositiveInt,
    model_validator,
)

from engine.config import DEMO_MAX_MODEL_LEN

# Code Llama's infill prompt adds BOS, ▁<PRE>, ▁<SUF>, ▁<MID>; the header and the
# window are tokenized apart from each other, which can differ by a token at a seam.
FIM_OVERHEAD_TOKENS = 8


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SessionsLoad(_Model):
    """N virtual users, each running a stateful session (editor typing or a chat)."""

    type: Literal["sessions"] = "sessions"
    sessions: PositiveInt = 16
    stagger_s: NonNegativeFloat = Field(
        2.0, description="Each session starts at a seeded offset in [0, stagger_s)."
    )


class Spread(_Model):
    """A positive quantity drawn from a lognormal with this mean and coefficient of variation."""

    mean: PositiveFloat
    cv: NonNegativeFloat = 0.0
    min: NonNegativeFloat = 0.0
    max: PositiveFloat | None = None

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """n draws: lognormal with this mean and CV (the mean itself when cv is 0), clipped."""
        if self.cv == 0:
            x = np.full(n, float(self.mean))
        else:
            sigma2 = np.log1p(self.cv**2)
            x = rng.lognormal(np.log(self.mean) - sigma2 / 2, np.sqrt(sigma2), n)
        return np.clip(x, self.min, self.max if self.max is not None else np.inf)

    def draw(self, rng: np.random.Generator) -> float:
        return float(self.sample(rng, 1)[0])


class TypingSpec(_Model):
    """How fast a developer types: a per-session rate, and per-keystroke jitter around it."""

    keys_per_s: Spread = Field(
        default_factory=lambda: Spread(mean=5.0, cv=0.3, min=1.0, max=15.0),
        description="Each session's mean keystroke rate (drawn once per session).",
    )
    gap_cv: NonNegativeFloat = Field(
        0.5, description="Spread of each gap between keystrokes around the session's mean."
    )
    auto_indent: bool = Field(
        True, description="Enter also inserts the next line's indentation (as editors do)."
    )


class PauseSpec(_Model):
    """Think time: pauses after a line, at random, and between chunks of work."""

    line_end_prob: float = Field(0.25, ge=0, le=1, description="Pause after a newline.")
    key_prob: float = Field(0.02, ge=0, le=1, description="Pause after any keystroke.")
    duration_s: Spread = Field(
        default_factory=lambda: Spread(mean=1.5, cv=1.0, min=0.2, max=20.0),
        description="How long a pause lasts.",
    )
    chunk_end_s: Spread = Field(
        default_factory=lambda: Spread(mean=3.0, cv=0.5, min=0.5, max=30.0),
        description="The pause after a chunk is written, before the next one starts.",
    )


class WindowSpec(_Model):
    """The part of the file a request carries, in tokens (as editors trim to the context)."""

    prefix_tokens: PositiveInt = Field(
        1024, description="Text above the cursor, keeping the lines nearest to it."
    )
    suffix_tokens: PositiveInt = Field(
        512, description="Text below the cursor, keeping the lines nearest to it."
    )


Source = Literal["humaneval", "stdlib"]


def _all_sources() -> list[Source]:
    return ["humaneval", "stdlib"]


class FilesSpec(_Model):
    """Where the source files come from (all offline)."""

    sources: list[Source] = Field(
        default_factory=_all_sources,
        min_length=1,
        description="humaneval: canonical solutions assembled into files; stdlib: the "
        "running interpreter's standard-library .py files.",
    )
    humaneval_per_file: PositiveInt = Field(8, description="HumanEval problems per file.")
    max_files: PositiveInt = Field(64, description="Files used, drawn with the seed.")
    min_bytes: int = Field(2_000, ge=0, description="Skip smaller standard-library files.")
    max_bytes: PositiveInt = Field(120_000, description="Skip larger standard-library files.")


class EditorSpec(_Model):
    """Virtual developers typing through real Python source; FIM after each pause."""

    debounce_ms: PositiveFloat = Field(
        75.0, description="A request is sent after this long without a keystroke."
    )
    max_tokens: PositiveInt = 32
    single_line: bool = Field(
        False, description="Stop at the end of the line (else at a blank line)."
    )
    typing: TypingSpec = Field(default_factory=TypingSpec)
    pauses: PauseSpec = Field(default_factory=PauseSpec)
    window: WindowSpec = Field(default_factory=WindowSpec)
    repos: PositiveInt = Field(
        4, description="Sessions are spread over this many repos (session i in repo i % repos)."
    )
    repo_context_tokens: int = Field(
        256,
        ge=0,
        description="A header of the repo's other files before the window, shared by every "
        "session of the repo (0: none).",
    )
    chunk_lines: Spread = Field(
        default_factory=lambda: Spread(mean=12, cv=0.5, min=2, max=60),
        description="Lines written in one go, at a random place of the file.",
    )
    switch_file_prob: float = Field(
        0.3, ge=0, le=1, description="After a chunk, move on to another file of the repo."
    )
    files: FilesSpec = Field(default_factory=FilesSpec)
    context_tokens: PositiveInt = Field(
        DEMO_MAX_MODEL_LEN, description="The model's context: header + window + output fit in it."
    )

    @model_validator(mode="after")
    def _fits(self) -> EditorSpec:
        need = (
            self.repo_context_tokens
            + self.window.prefix_tokens
            + self.window.suffix_tokens
            + self.max_tokens
            + FIM_OVERHEAD_TOKENS
        )
        if need > self.context_tokens:
            raise ValueError(
                f"editor: repo_context_tokens + window + max_tokens + {FIM_OVERHEAD_TOKENS} = "
                f"{need} tokens do not fit context_tokens {self.context_tokens}"
            )
        return self

    @property
    def stop(self) -> list[str]:
        return ["\n"] if self.single_line else ["\n\n"]


class SharedPrefixSpec(_Model):
    """G groups of requests; each group shares a prefix of exactly P tokens."""

    groups: PositiveInt = 8
    prefix_tokens: PositiveInt = Field(512, description="Tokens every request of a group shares.")
    tail_tokens: PositiveInt = Field(64, description="Distinct tokens after the prefix.")
    requests_per_group: PositiveInt = 16
    text: Literal["code", "random"] = Field(
        "code", description="code: windows of real source (a repo context); random: token ids."
    )
    chat: bool = Field(
        False, description="Send chats: the prefix is the system prompt, the tail the user turn."
    )


class ChatSessionsSpec(_Model):
    """Conversations that grow turn by turn, each turn resending the whole history."""

    turns: Spread = Field(
        default_factory=lambda: Spread(mean=4, cv=0.4, min=2, max=8),
        description="Turns per conversation.",
    )
    system: str | None = "You are a careful Python programmer. Answer with code."
    think_time_s: Spread = Field(
        default_factory=lambda: Spread(mean=2.0, cv=0.8, min=0.0, max=30.0),
        description="Between an answer and the user's next turn.",
    )
    context_tokens: PositiveInt = Field(
        DEMO_MAX_MODEL_LEN,
        description="A conversation ends before its history and max_tokens would overflow this.",
    )


class QualitySpec(_Model):
    """Score what comes back: FIM exact match, HumanEval pass@k, temperature-0 equivalence."""

    fim_exact_match: bool = True
    pass_at_k: list[PositiveInt] = Field(default_factory=lambda: [1])
    equivalence: bool = Field(
        True, description="Resend temperature-0 prompts alone and compare with the loaded output."
    )
    equivalence_max_prompts: PositiveInt = 64
    timeout_s: PositiveFloat = Field(3.0, description="Per HumanEval test run.")
    memory_mb: PositiveInt = Field(1024, description="Address-space limit of a test run.")
    workers: PositiveInt = Field(2, description="Test runs at once (subprocesses).")
