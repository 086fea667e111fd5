"""Load a config file, apply `FDP_...` environment overrides, validate.

Overrides are applied to the YAML document before validation, so an error can say
whether the bad value came from the file or from an environment variable.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from policies.config import Settings

ENV_PREFIX = "FDP_"
#: Variables with the prefix that are not settings.
ENV_RESERVED = {"FDP_CONFIG", "FDP_LOG_LEVEL"}


class ConfigError(Exception):
    """A config that cannot be used; `str()` names the file, each key path and what was expected."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        super().__init__(f"config error in {source}:\n" + "\n".join(f"  {p}" for p in problems))


def env_overrides(environ: Mapping[str, str]) -> dict[tuple[str, ...], tuple[str, Any]]:
    """`FDP_CACHE__MAX_BYTES=1GiB` -> {("cache", "max_bytes"): ("FDP_CACHE__MAX_BYTES", "1GiB")}."""
    out: dict[tuple[str, ...], tuple[str, Any]] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX) or name in ENV_RESERVED:
            continue
        path = tuple(p.lower() for p in name[len(ENV_PREFIX) :].split("__") if p)
        if path:
            try:
                value = yaml.safe_load(raw) if raw.strip() else None
            except yaml.YAMLError:
                value = raw
            out[path] = (name, value)
    return out


def _set_path(doc: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    node = doc
    for key in path[:-1]:
        child = node.get(key)
        if not isinstance(child, dict):
            child = node[key] = {}
        node = child
    node[path[-1]] = value


def read_yaml(path: Path) -> dict[str, Any]:
    source = str(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(source, ["file not found"]) from None
    except OSError as e:
        raise ConfigError(source, [f"cannot read: {e.strerror}"]) from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError(source, [f"{where}not valid YAML ({getattr(e, 'problem', e)})"]) from None
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise ConfigError(
            source, [f"expected a mapping at the top level, got {type(doc).__name__}"]
        )
    return doc


def _loc(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc if not (isinstance(p, str) and p.startswith("function-")))


def validate(
    doc: dict[str, Any],
    source: str,
    overrides: dict[tuple[str, ...], tuple[str, Any]] | None = None,
) -> Settings:
    """Validate a document; errors name the key path, what was expected and what was given."""
    overrides = overrides or {}
    for path, (_, value) in overrides.items():
        _set_path(doc, path, value)
    try:
        return Settings.model_validate(doc)
    except ValidationError as e:
        problems = []
        for err in e.errors(include_url=False):
            loc = tuple(err["loc"])
            key = _loc(loc) or "(top level)"
            env = next((n for p, (n, _) in overrides.items() if loc[: len(p)] == p), None)
            origin = f" (from {env})" if env else ""
            msg = err["msg"]
            if err["type"] == "extra_forbidden":
                msg = "unknown key"
            elif "input" in err and err["type"] not in ("missing",):
                msg += f", got {err['input']!r}"
            problems.append(f"{key}{origin}: {msg}")
        raise ConfigError(source, problems) from None


def load_settings(
    path: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
    default: dict[str, Any] | None = None,
) -> Settings:
    """Read `path` (or `$FDP_CONFIG`); with neither, validate `default` (the embedded config).

    Relative `eodag.providers_file` paths are taken relative to the config file.
    """
    environ = os.environ if environ is None else environ
    path = path or environ.get("FDP_CONFIG") or None
    if path is None:
        doc, source = dict(default or {}), "the embedded default config"
    else:
        file = Path(path)
        doc, source = read_yaml(file), str(file)
        eodag = doc.get("eodag")
        if isinstance(eodag, dict) and isinstance(eodag.get("providers_file"), str):
            eodag["providers_file"] = str((file.parent / eodag["providers_file"]).resolve())
    return validate(doc, source, env_overrides(environ))
