"""Priority classes: which class a request runs in, and at what engine priority.

A key carries a class (`priority=` in the keys file; the default class
otherwise). A request may ask for a class or a priority of its own with the
`priority` field (vLLM's: an integer, lower is served first; or a class name)
and gets what it asks, except that it never runs above its key's class: a
request asking for more is clamped to its key's class, and its response says
which class it ran in (`X-Codellama-Priority-Class`).

Clamping, not 403: the key decides how much a request may have, the field only
lowers it. vLLM's own clients send `priority: 0` as a matter of course (it is
the field's default there), and refusing those from every batch key would
break them for a hint that cannot raise anything anyway.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from engine.api.auth import ApiKey, KeyFileError, KeyStore
from engine.api.errors import bad_request
from engine.config import PriorityClassSpec, PriorityConfig

PRIORITY_CLASS_HEADER = "X-Codellama-Priority-Class"


@dataclass(frozen=True, slots=True)
class Assignment:
    """The class a request runs in and the priority the engine gets for it."""

    cls: PriorityClassSpec
    engine_priority: int  # 0 under --scheduling-policy fcfs (the engine ignores it there)
    clamped: bool = False  # it asked for more than its key's class

    @property
    def name(self) -> str:
        return self.cls.name


class PriorityClasses:
    """The configured classes, highest priority (lowest value) first."""

    def __init__(self, cfg: PriorityConfig) -> None:
        self.cfg = cfg
        self.classes = cfg.classes()
        self.by_name = {c.name: c for c in self.classes}
        self.default = self.by_name[cfg.default_priority_class]
        self.top = self.classes[0]
        self.enabled = cfg.scheduling_policy == "priority"
        self.fim = self.by_name[cfg.fim_priority_class] if cfg.fim_priority_class else None
        self._bands = [c.priority for c in self.classes]

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.classes]

    def check_keys(self, keys: KeyStore) -> None:
        """Every key names a configured class (KeyFileError otherwise, at start-up)."""
        for key in keys.keys:
            if key.priority_class is not None and key.priority_class not in self.by_name:
                raise KeyFileError(
                    f"API key {key.name!r}: priority={key.priority_class} is not one of the "
                    f"priority classes ({', '.join(self.names)})"
                )

    def of_key(self, key: ApiKey) -> PriorityClassSpec:
        """The key's class: the highest its requests may run in."""
        return self.by_name[key.priority_class] if key.priority_class else self.default

    def best_for(self, key: ApiKey) -> PriorityClassSpec:
        """The highest class any request of this key can get (the gate's early check)."""
        own = self.of_key(key)
        if key.priority_class is None and self.fim is not None and self.fim.priority < own.priority:
            return self.fim
        return own

    def band(self, priority: int) -> PriorityClassSpec:
        """The class an engine priority falls in: the lowest class whose priority it reaches."""
        return self.classes[max(0, bisect.bisect_right(self._bands, priority) - 1)]

    def assign(
        self, key: ApiKey, requested: int | str | None, *, infill: bool, max_tokens: int
    ) -> Assignment:
        """The class of a request of `key` that asks for `requested` (a 400 for an unknown name)."""
        cap = self.of_key(key)
        if requested is None:
            cls = cap
            fim = self.fim
            if (
                fim is not None
                and key.priority_class is None
                and infill
                and max_tokens <= self.cfg.fim_priority_max_tokens
            ):
                cls = fim
            return self._assignment(cls, cls.priority)
        if isinstance(requested, str):
            asked = self.by_name.get(requested)
            if asked is None:
                raise bad_request(
                    f"priority {requested!r} is not a priority class ({', '.join(self.names)})",
                    param="priority", code="unknown_priority_class",
                )  # fmt: skip
            requested = asked.priority
        if requested < cap.priority:
            return self._assignment(cap, cap.priority, clamped=True)
        return self._assignment(self.band(requested), requested)

    def _assignment(
        self, cls: PriorityClassSpec, priority: int, clamped: bool = False
    ) -> Assignment:
        return Assignment(cls, priority if self.enabled else 0, clamped)
