"""API keys: loaded once, kept only as SHA-256 digests, compared in constant time.

Key sources: `--api-keys` / `CODELLAMA_SERVE_API_KEYS` (comma-separated) and
`--api-keys-file` (one per line, e.g. a mounted Kubernetes Secret):

    sk-team-a-1234 name=team-a rpm=600 tpm=2000000 adapters=team-a-sql,team-a-docs
    sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08 name=ci
    sk-ops-5678 name=ops admin

`adapters=` lists the LoRA adapters a key may use (none listed: the base model
only; no `adapters=` option: all of them); to a key, any other adapter does not
exist. `admin` marks a key that may load and unload adapters at runtime.

A key's `name` (or the first 8 hex digits of its digest) is what logs show;
the key itself is never logged or used as a metric label.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass
from pathlib import Path

from engine.adapters import AdapterError, check_adapter_name
from engine.config import AuthConfig

_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class KeyFileError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class ApiKey:
    name: str
    digest: bytes = b""
    rpm: int | None = None
    tpm: int | None = None
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
    fields: dict[str, str] = {}
    for option in options:
        if option == "admin":  # a flag, not name=value
            fields["admin"] = ""
            continue
        name, sep, value = option.partition("=")
        if not sep or name not in ("name", "rpm", "tpm", "adapters"):
            raise KeyFileError(
                f"{where}: unknown option {name!r} (expected name=, rpm=, tpm=, adapters=, admin)"
            )
        fields[name] = value
    try:
        rpm = int(fields["rpm"]) if "rpm" in fields else defaults.rate_limit_rpm
        tpm = int(fields["tpm"]) if "tpm" in fields else defaults.rate_limit_tpm
    except ValueError:
        raise KeyFileError(f"{where}: rpm and tpm must be whole numbers") from None
    label = fields.get("name") or "key-" + key_digest.hex()[:8]
    return ApiKey(
        name=label, digest=key_digest, rpm=rpm, tpm=tpm,
        admin="admin" in fields, adapters=_adapter_list(fields.get("adapters"), where),
    )  # fmt: skip


def _adapter_list(value: str | None, where: str) -> frozenset[str] | None:
    if value is None:
        return None
    names = frozenset(n for n in value.split(",") if n)
    try:
        for n in names:
            check_adapter_name(n)
    except AdapterError as e:
        raise KeyFileError(f"{where}: adapters=: {e}") from None
    return names


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
