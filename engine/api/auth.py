"""API keys: loaded once, kept only as SHA-256 digests, compared in constant time.

Key sources: `--api-keys` / `CODELLAMA_SERVE_API_KEYS` (comma-separated) and
`--api-keys-file` (one per line, e.g. a mounted Kubernetes Secret):

    sk-team-a-1234 name=team-a rpm=600 tpm=2000000 priority=interactive adapters=team-a-sql
    sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08 name=ci
    sk-evals-5678 name=evals priority=batch weight=2
    sk-ops-9012 name=ops admin

`priority=` names the key's priority class (the highest its requests may ask
for; engine/api/priority.py checks it against the configured classes) and
`weight=` its weight in its class's fair share of admission.
`adapters=` lists the LoRA adapters a key may use (none listed: the base model
only; no `adapters=` option: all of them); to a key, any other adapter does not
exist. `admin` marks a key that may load and unload adapters at runtime.

A key's `name` (or the first 8 hex digits of its digest) is what logs show;
the key itself is never logged or used as a metric label.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.adapters import AdapterError, check_adapter_name
from engine.config import PRIORITY_CLASS_NAME, AuthConfig

_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class KeyFileError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class ApiKey:
    name: str
    digest: bytes = b""
    rpm: int | None = None
    tpm: int | None = None
    priority_class: str | None = None  # None: the default class (an "unclassed" key)
    weight: float = 1.0  # its weight in its class's fair share
    admin: bool = False  # may load and unload LoRA adapters
    adapters: frozenset[str] | None = None  # LoRA adapters it may use (None: all)

    def may_use(self, adapter: str) -> bool:
        return self.adapters is None or adapter in self.adapters


ANONYMOUS = ApiKey(name="anonymous")


def digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("utf-8")).digest()


def _parse_entry(entry: str, where: str, defaults: AuthConfig) -> ApiKey:
    secret, *options = entry.split()
    if secret.startswith("sha256:"):
        hexdigest = secret[len("sha256:") :].lower()
        if not _HEX64.match(hexdigest):
            raise KeyFileError(f"{where}: 'sha256:' must be followed by 64 hex digits")
        key_digest = bytes.fromhex(hexdigest)
    else:
        key_digest = digest(secret)
    fields: dict[str, Any] = {}
    for option in options:
        if option == "admin":  # a flag, not name=value
            fields["admin"] = ""
            continue
        name, sep, value = option.partition("=")
        if not sep or name not in KEY_OPTIONS:
            expected = ", ".join(f"{o}=" for o in KEY_OPTIONS)
            raise KeyFileError(f"{where}: unknown option {name!r} (expected {expected}, admin)")
        parse, problem = KEY_OPTIONS[name]
        try:
            fields[name] = parse(value)
        except AdapterError as e:  # says which name and why
            raise KeyFileError(f"{where}: {name}=: {e}") from None
        except ValueError:
            raise KeyFileError(f"{where}: {problem}") from None
    label = fields.get("name") or "key-" + key_digest.hex()[:8]
    return ApiKey(
        name=label,
        digest=key_digest,
        rpm=fields.get("rpm", defaults.rate_limit_rpm),
        tpm=fields.get("tpm", defaults.rate_limit_tpm),
        priority_class=fields.get("priority"),
        weight=fields.get("weight", 1.0),
        admin="admin" in fields,
        adapters=fields.get("adapters"),
    )


def _class_name(value: str) -> str:
    if not re.fullmatch(PRIORITY_CLASS_NAME, value):
        raise ValueError(value)
    return value


def _weight(value: str) -> float:
    weight = float(value)
    if not 0 < weight < math.inf:
        raise ValueError(value)
    return weight


def _adapter_names(value: str) -> frozenset[str]:
    return frozenset(check_adapter_name(n) for n in value.split(",") if n)


# The options a keys-file line may carry (besides the flag `admin`): how each
# value is parsed, and what the error says when it cannot be.
KEY_OPTIONS: dict[str, tuple[Callable[[str], Any], str]] = {
    "name": (str, "name needs a label"),
    "rpm": (int, "rpm and tpm must be whole numbers"),
    "tpm": (int, "rpm and tpm must be whole numbers"),
    "priority": (_class_name, "priority must name a priority class"),
    "weight": (_weight, "weight must be a positive number"),
    "adapters": (_adapter_names, "adapters lists LoRA adapter names"),
}


class KeyStore:
    """The accepted keys. Empty means the API is open."""

    def __init__(self, keys: list[ApiKey]) -> None:
        self._keys = keys

    @classmethod
    def from_config(cls, cfg: AuthConfig) -> KeyStore:
        keys: list[ApiKey] = []
        if cfg.api_keys:
            for n, entry in enumerate(e.strip() for e in cfg.api_keys.split(",")):
                if entry:
                    keys.append(_parse_entry(entry, f"--api-keys entry {n + 1}", cfg))
        if cfg.api_keys_file:
            path = Path(cfg.api_keys_file)
            try:
                lines = path.read_text(encoding="utf-8").splitlines()
            except OSError as e:
                raise KeyFileError(f"cannot read the API keys file {path}: {e.strerror}") from None
            for n, line in enumerate(lines, start=1):
                line = line.strip()
                if line and not line.startswith("#"):
                    keys.append(_parse_entry(line, f"{path}:{n}", cfg))
        return cls(keys)

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    @property
    def keys(self) -> tuple[ApiKey, ...]:
        return tuple(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def lookup(self, presented: str) -> ApiKey | None:
        """The key matching `presented`, comparing every digest in constant time."""
        wanted = digest(presented)
        found = None
        for key in self._keys:  # no early exit: the time does not depend on which key matched
            if hmac.compare_digest(key.digest, wanted):
                found = key
        return found


def bearer_token(authorization: bytes | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.decode("latin-1").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()
