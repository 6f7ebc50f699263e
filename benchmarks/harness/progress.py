"""The progress bar of a run (rich), or nothing."""

from __future__ import annotations

from typing import Any


class Progress:
    """A rich progress bar (or nothing): requests done, ok and failed."""

    def __init__(self, enabled: bool) -> None:
        self._p: Any = None
        self._task: Any = None
        self.ok = self.failed = 0
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
            from rich.progress import Progress as RichProgress

            self._p = RichProgress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("ok {task.fields[ok]} · failed {task.fields[failed]}"),
                TimeElapsedColumn(),
                refresh_per_second=4,
            )
            self._p.start()

    def phase(self, label: str, total: int | None) -> None:
        self.ok = self.failed = 0
        if self._p is not None:
            self._task = self._p.add_task(label, total=total, ok=0, failed=0)

    def done(self, ok: bool) -> None:
        if ok:
            self.ok += 1
        else:
            self.failed += 1
        if self._p is not None and self._task is not None:
            self._p.update(self._task, advance=1, ok=self.ok, failed=self.failed)

    def close(self) -> None:
        if self._p is not None:
            self._p.stop()
