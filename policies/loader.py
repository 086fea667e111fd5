"""Load a config file, apply `FDP_...` environment overrides, validate.

Overrides are applied to the YAML document before validation, so an error can say
whether the bad value came from the file or from an environment variable. A variable's
value is taken as a string unless its key wants a list, a map or a model (then it is
YAML); in `FDP_DATASETS__<NAME>__...`, `_` in NAME stands for `-` or `.` of an existing
dataset's name. Errors never echo a value that may be a secret.
"""

from __future__ import annotations

import os
import re
import types
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, SecretStr, ValidationError

from policies.config import Settings

ENV_PREFIX = "FDP_"
#: Variables with the prefix that are not settings.
ENV_RESERVED = {"FDP_CONFIG", "FDP_LOG_LEVEL"}
#: Keys whose values an error message must not repeat.
SECRET_KEY = re.compile(r"secret|password|passwd|token|key|credential|_file$", re.IGNORECASE)

Overrides = dict[tuple[str, ...], tuple[str, Any]]
_UNKNOWN = object()
_STRUCTURED = (list, dict, set, frozenset, tuple, Mapping, Sequence)


class ConfigError(Exception):
    """A config that cannot be used; `str()` names the file, each key path and what was expected."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        super().__init__(f"config error in {source}:\n" + "\n".join(f"  {p}" for p in problems))


def _members(tp: Any) -> list[Any]:
    """The types an annotation admits, with Annotated, Optional and unions unwrapped."""
    origin = get_origin(tp)
    if origin is Annotated:
        return _members(get_args(tp)[0])
    if origin in (Union, types.UnionType):
        return [m for a in get_args(tp) if a is not type(None) for m in _members(a)]
    return [tp]


def _child(tp: Any, part: str | int) -> Any:
    """The annotation of key `part` inside a value of type `tp`."""
    for m in _members(tp):
        origin = get_origin(m) or m
        if isinstance(m, type) and issubclass(m, BaseModel):
            for name, field in m.model_fields.items():
                if part in (name, field.alias):
                    return field.annotation
        elif origin in (dict, Mapping) and get_args(m):
            return get_args(m)[1]
        elif origin in (list, Sequence) and get_args(m) and str(part).isdigit():
            return get_args(m)[0]
    return _UNKNOWN


def _field_type(path: Sequence[str | int]) -> Any:
    """The annotation that a key path leads to in `Settings`, or `_UNKNOWN` off the model."""
    tp: Any = Settings
    for part in path:
        tp = _child(tp, part)
        if tp is _UNKNOWN:
            break
    return tp


def _wants_structure(tp: Any) -> bool:
    """Whether a key takes a list, a map or a model: what a variable must spell in YAML."""
    for m in _members(tp):
        origin = get_origin(m) or m
        if m is Any or (
            isinstance(origin, type)
            and issubclass(origin, (BaseModel, *_STRUCTURED))
            and not issubclass(origin, (str, bytes))
        ):
            return True
    return False


def _env_value(path: tuple[str, ...], raw: str) -> Any:
    """The raw string, unless the key wants a list, map or model, or is not in the model.

    Pydantic's lax mode turns strings into numbers, booleans and sizes itself, so YAML
    never gets the chance to read `abc #def` as `abc` or `0123` as 83.
    """
    if not raw.strip():
        return None
    tp = _field_type(path)
    if tp is _UNKNOWN or _wants_structure(tp):
        try:
            return yaml.safe_load(raw)
        except yaml.YAMLError:
            return raw
    for m in _members(tp):
        if get_origin(m) is Literal:
            match = [v for v in get_args(m) if not isinstance(v, str) and str(v) == raw.strip()]
            if match:
                return match[0]
    return raw


def env_overrides(environ: Mapping[str, str]) -> Overrides:
    """`FDP_CACHE__MAX_BYTES=1GiB` -> {("cache", "max_bytes"): ("FDP_CACHE__MAX_BYTES", "1GiB")}."""
    out: Overrides = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX) or name in ENV_RESERVED:
            continue
        path = tuple(p.lower() for p in name[len(ENV_PREFIX) :].split("__") if p)
        if path:
            out[path] = (name, _env_value(path, raw))
    return out


def _env_name(dataset: str) -> str:
    return re.sub(r"[-.]", "_", dataset.lower())


def _dataset_paths(doc: dict[str, Any], overrides: Overrides, source: str) -> Overrides:
    """Map `datasets.<NAME>` of each override to the existing dataset NAME stands for.

    Variable names cannot hold `-`, so `FDP_DATASETS__DEMO_COGS__...` means `demo-cogs`;
    a NAME that fits no dataset makes a new one, one that fits two is an error.
    """
    datasets = doc.get("datasets")
    names = [n for n in datasets if isinstance(n, str)] if isinstance(datasets, dict) else []
    out: Overrides = {}
    problems = []
    for path, (var, value) in overrides.items():
        if len(path) > 1 and path[0] == "datasets":
            fits = [n for n in names if _env_name(n) == path[1]]
            if len(fits) > 1:
                problems.append(f"{var}: matches datasets {' and '.join(fits)}; rename one")
            elif fits:
                path = ("datasets", fits[0], *path[2:])
        out[path] = (var, value)
    if problems:
        raise ConfigError(source, problems)
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
        problem = _hide_names(str(getattr(e, "problem", None) or "syntax error"))
        raise ConfigError(source, [f"{where}not valid YAML ({problem})"]) from None
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise ConfigError(
            source, [f"expected a mapping at the top level, got {type(doc).__name__}"]
        )
    return doc


def _hide_names(problem: str) -> str:
    """Drop quoted names (aliases, tags) from a YAML problem: they are text of the file."""
    return re.sub(r"""(['"])(?!<)[^'"]{6,}\1""", "(hidden)", problem)


def _fields(loc: tuple[Any, ...]) -> list[Any]:
    """An error location without pydantic's validator steps: the keys of the document."""
    return [p for p in loc if not (isinstance(p, str) and p.startswith("function-"))]


def _loc(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in _fields(loc))


def _is_secret(loc: tuple[Any, ...]) -> bool:
    keys = _fields(loc)
    if any(isinstance(p, str) and SECRET_KEY.search(p) for p in keys):
        return True
    tp = _field_type(keys)
    return tp is not _UNKNOWN and SecretStr in _members(tp)


def _shows_input(err: Any, loc: tuple[Any, ...]) -> bool:
    """Whether an error may repeat its input: never a secret, never a whole mapping or list."""
    if "input" not in err or err["type"] in ("missing", "extra_forbidden"):
        return False
    value = err["input"]
    if isinstance(value, (dict, list, tuple, set, BaseModel, SecretStr)):
        return False
    if isinstance(value, str) and _wants_structure(_field_type(_fields(loc))):
        return False  # an unparsable FDP_ value for a whole block may hold its secrets
    return not _is_secret(loc)


def _origin(loc: tuple[Any, ...], overrides: Overrides) -> str:
    """` (from FDP_...)`: the variables that set this key, or that set keys inside it."""
    names = [n for p, (n, _) in overrides.items() if loc[: len(p)] == p]
    if not names and loc:
        names = [n for p, (n, _) in overrides.items() if p[: len(loc)] == loc]
    return f" (from {', '.join(sorted(names))})" if names else ""


def _without_password(text: str) -> str:
    """`redis://u:pw@host` -> `redis://u:***@host`: a URL may carry its password."""
    return re.sub(r"(://[^/@:\s]*:)[^/@\s]*@", r"\1***@", text)


def _problem(err: Any, overrides: Overrides) -> str:
    loc = tuple(err["loc"])
    msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
    if _shows_input(err, loc):
        msg += f", got {err['input']!r}"
    return _without_password(f"{_loc(loc) or '(top level)'}{_origin(loc, overrides)}: {msg}")


def validate(
    doc: dict[str, Any],
    source: str,
    overrides: Overrides | None = None,
) -> Settings:
    """Validate a document; errors name the key path, what was expected and what was given."""
    overrides = _dataset_paths(doc, overrides or {}, source)
    for path, (_, value) in overrides.items():
        _set_path(doc, path, value)
    try:
        return Settings.model_validate(doc)
    except ValidationError as e:
        problems = [_problem(err, overrides) for err in e.errors(include_url=False)]
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
