"""Profile files: the bundled profiles, resolving a name or path, reading YAML,
merging overrides (`--set load.burstiness=0.5`) into it."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from benchmarks.harness.profile.schema import Profile


def bundled_profiles_dir() -> Path:
    return Path(str(resources.files("benchmarks") / "profiles"))


def bundled_profiles() -> dict[str, Path]:
    return {p.stem: p for p in sorted(bundled_profiles_dir().glob("*.yaml"))}


def resolve_profile_path(name_or_path: str) -> Path:
    """A file path, or the name of a bundled profile (`default`, `sweep`, ...)."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    bundled = bundled_profiles()
    if name_or_path in bundled:
        return bundled[name_or_path]
    raise FileNotFoundError(
        f"no profile file {name_or_path!r} and no bundled profile of that name "
        f"(bundled: {', '.join(bundled)})"
    )


def read_profile_dict(name_or_path: str) -> tuple[dict[str, Any], Path]:
    path = resolve_profile_path(name_or_path)
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a profile is a YAML mapping")
    _resolve_paths(data, path.parent)
    return data, path


def _resolve_paths(data: dict[str, Any], base: Path) -> None:
    # Paths inside a profile are relative to the profile file, so bundled
    # profiles find their bundled trace wherever the package is installed.
    for section, key in (("load", "path"), ("dataset", "path")):
        sec = data.get(section)
        if isinstance(sec, dict) and isinstance(sec.get(key), str):
            p = Path(sec[key])
            if not p.is_absolute() and not p.exists() and (base / p).exists():
                sec[key] = str(base / p)


def load_profile(name_or_path: str, overrides: dict[str, Any] | None = None) -> Profile:
    data, _ = read_profile_dict(name_or_path)
    return Profile.model_validate(deep_merge(data, overrides or {}))


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            # A new load type replaces the old load block instead of mixing fields.
            if k == "load" and "type" in v and v["type"] != out[k].get("type"):
                out[k] = dict(v)
            else:
                out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def set_dotted(d: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    for k in keys[:-1]:
        d = d.setdefault(k, {})
    d[keys[-1]] = value
