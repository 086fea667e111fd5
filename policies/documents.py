"""Policy documents: a dataset's entry in the config file as JSON, validated by the same
models, shown without its secrets, merged (RFC 7396) and compared (the audit's diff)."""

from __future__ import annotations

import copy
import hashlib
import json
from typing import Any

from pydantic import BaseModel, SecretStr

from policies.config import Dataset, Settings
from policies.loader import ConfigError, validate

#: What a secret shows as; sent back unchanged in a PUT or PATCH, it keeps the secret.
MASK = "**********"

Document = dict[str, Any]


def reveal(model: BaseModel, doc: Document) -> Document:
    """`doc` (a JSON dump of `model`, secrets masked) with the secrets' real values."""
    for name, field in type(model).model_fields.items():
        key = field.alias or name
        if key not in doc:
            continue
        value = getattr(model, name)
        if isinstance(value, SecretStr):
            doc[key] = value.get_secret_value()
        elif isinstance(value, BaseModel):
            reveal(value, doc[key])
        elif isinstance(value, list):
            for item, sub in zip(value, doc[key], strict=False):
                if isinstance(item, BaseModel):
                    reveal(item, sub)
        elif isinstance(value, dict):
            for k, item in value.items():
                if isinstance(item, BaseModel):
                    reveal(item, doc[key][str(k)])
    return doc


def stored(ds: Dataset) -> Document:
    """The document kept in the policy store: every setting, secrets included."""
    return reveal(ds, shown(ds))


def shown(ds: Dataset) -> Document:
    """The document an operator sees: every setting in force, secrets masked."""
    return ds.model_dump(mode="json", by_alias=True, exclude_none=True)


def masked(doc: Document) -> Document:
    """A stored document as shown (its secrets masked), without validating it again."""
    return shown(Dataset.model_validate(doc))


def keep_secrets(new: Any, old: Any) -> Any:
    """`new` with every masked secret replaced by the value at the same place in `old`
    (an operator sends back what GET showed)."""
    if isinstance(new, dict):
        old = old if isinstance(old, dict) else {}
        return {k: keep_secrets(v, old.get(k)) for k, v in new.items()}
    if isinstance(new, list):
        old = old if isinstance(old, list) else []
        return [keep_secrets(v, old[i] if i < len(old) else None) for i, v in enumerate(new)]
    if new == MASK and isinstance(old, str):
        return old
    return new


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7396 JSON Merge Patch: `null` removes a key, objects merge, anything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


class InvalidPolicy(Exception):
    """A document the models refuse: one problem per error, each naming its key path."""

    def __init__(self, dataset: str, problems: list[str]) -> None:
        super().__init__(f"invalid policy for {dataset!r}")
        self.problems = problems


def checked(settings: Settings, name: str, doc: Any) -> Dataset:
    """Validate `doc` as dataset `name` of `settings` (the same models and rules as the
    config file); raises InvalidPolicy."""
    if not isinstance(doc, dict):
        raise InvalidPolicy(name, ["(top level): a policy document is a JSON object"])
    whole = settings.model_dump(mode="json", by_alias=True, exclude_none=True)
    whole["datasets"] = {name: copy.deepcopy(doc)}
    prefix = f"datasets.{name}."
    try:
        return validate(whole, "the policy").datasets[name]
    except ConfigError as e:
        problems = [p.removeprefix(prefix) for p in e.problems]
        raise InvalidPolicy(name, problems) from None


def etag(version: int, doc: Document | None) -> str:
    """A strong validator of one version of a document."""
    body = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    return f'"v{version}-{hashlib.sha256(body).hexdigest()[:16]}"'


def diff(old: Any, new: Any, path: str = "") -> list[dict[str, Any]]:
    """What changed, key path by key path: `[{path, old, new}]` (absent values left out)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[dict[str, Any]] = []
        for key in sorted(set(old) | set(new)):
            sub = f"{path}.{key}" if path else str(key)
            if key not in new:
                out.append({"path": sub, "old": old[key]})
            elif key not in old:
                out.append({"path": sub, "new": new[key]})
            else:
                out += diff(old[key], new[key], sub)
        return out
    if old == new:
        return []
    change: dict[str, Any] = {"path": path or "(document)"}
    if old is not None:
        change["old"] = old
    if new is not None:
        change["new"] = new
    return [change]
