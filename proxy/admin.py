"""`/admin/policies`: operators read and edit dataset policies while fdp serves.

A policy document is the dataset's entry of the config file as JSON: what GET returns, PUT
accepts back (secrets show masked; sent back masked, they are kept). GET carries a strong
ETag; PUT, PATCH (JSON Merge Patch) and DELETE need `If-Match` (or `If-None-Match: *` to
create), so two operators editing the same version cannot both win. Every change is checked
by the config file's models, versioned and audited in the policy store, applied here at
once and by every other replica when the store announces it.
"""

from __future__ import annotations

import json
import logging
import threading
from typing import Any

import anyio
import anyio.to_thread
import redis
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from policies.config import Dataset, Settings
from policies.documents import (
    Document,
    InvalidPolicy,
    checked,
    keep_secrets,
    merge_patch,
    shown,
    stored,
)
from policies.loader import ConfigError
from policies.store import PolicyStore, Stale, Version, watch
from proxy.auth import identity
from proxy.problems import PreconditionFailed, ProxyError, problem
from upstreams.base import DatasetNotFound
from upstreams.registry import Entry, Registry

log = logging.getLogger("fdp.policies")

#: the most a policy document may weigh
MAX_BODY = 256 * 1024


class PreconditionRequired(ProxyError):
    status, slug = 428, "precondition-required"


class Policies:
    """The policy store as this process uses it: seeded from the config file, applied to
    the registry, and followed (another replica's edit applies here within seconds)."""

    def __init__(self, store: PolicyStore, settings: Settings, registry: Registry) -> None:
        self.store = store
        self.settings = settings
        self.registry = registry
        #: the version of each dataset's policy in force here, and the deleted datasets
        self.applied: dict[str, int] = {}
        self.deleted: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None

    def start(self) -> None:
        """Seed the store from the config file and serve what it holds (blocks)."""
        try:
            self.store.seed({n: stored(ds) for n, ds in self.settings.datasets.items()})
            self.refresh()
        except Exception as e:  # (Redis away: the config file's policies serve meanwhile)
            log.error("policy store unavailable (%s): serving the config file's", type(e).__name__)

    def follow(self) -> None:
        """Apply the store's changes from now on, in a thread of its own."""
        self._watcher = threading.Thread(
            target=watch,
            args=(self.store, self.settings.queue.redis_url, self.refresh, self._stop),
            name="fdp-policies",
            daemon=True,
        )
        self._watcher.start()

    def close(self) -> None:
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join(timeout=5)
        self.store.close()

    def refresh(self) -> None:
        """Apply every version newer than the one in force here (blocks)."""
        for version in self.store.versions().values():
            self.apply(version)

    def apply(self, version: Version, entry: Entry | None = None) -> None:
        """Put a stored version in force (with `entry`, built for it by `check`)."""
        with self._lock:
            if self.applied.get(version.dataset, 0) >= version.version:
                return
            try:
                ds = Dataset.model_validate(version.document) if version.document else None
                self.registry.apply(version.dataset, ds, entry)
            except Exception as e:  # (a version written elsewhere this one cannot serve)
                log.error("policy %s v%d not applied: %s", version.dataset, version.version, e)
                return
            self.applied[version.dataset] = version.version
            if ds is None:
                self.deleted.add(version.dataset)
            else:
                self.deleted.discard(version.dataset)
            log.info(
                "policy %s v%d in force (%s)", version.dataset, version.version, version.action
            )

    def check(self, name: str, doc: Any) -> tuple[Dataset, Entry]:
        """`doc` as dataset `name`'s policy and the entry that would serve it (its resolver
        built only if the upstream changed), or InvalidPolicy listing every problem."""
        ds = checked(self.settings, name, doc)
        try:
            return ds, self.registry.reusable(name, ds) or self.registry.build(name, ds)
        except ConfigError as e:
            raise InvalidPolicy(
                name, [p.removeprefix(f"datasets.{name}.") for p in e.problems]
            ) from None

    def write(
        self, name: str, doc: Document | None, by: str, action: str, expected: int
    ) -> Version:
        """Check, store and apply a new version (blocks); raises InvalidPolicy, Stale."""
        ds, entry = self.check(name, doc) if doc is not None else (None, None)
        document = stored(ds) if ds is not None else None
        version = self.store.write(name, document, by, action, expected)
        self.apply(version, entry)
        return version


# -- the HTTP side --------------------------------------------------------------------------


class PolicyStoreUnavailable(ProxyError):
    status, slug = 503, "policy-store-unavailable"


async def _call(fn: Any, *args: Any) -> Any:
    """A policy store call in a thread; a store that fails or does not answer is a 503."""
    try:
        return await anyio.to_thread.run_sync(fn, *args)
    except (redis.RedisError, OSError) as e:
        log.error("policy store unavailable: %s", type(e).__name__)
        raise PolicyStoreUnavailable(
            "the policy store is not available; try again", headers={"retry-after": "5"}
        ) from None


def _policies(request: Request) -> Policies:
    return request.app.state.policies  # type: ignore[no-any-return]


async def _body(request: Request) -> Any:
    raw = await request.body()
    if len(raw) > MAX_BODY:
        raise ProxyError(f"a policy document is at most {MAX_BODY} bytes")
    try:
        return json.loads(raw)
    except ValueError:
        raise ProxyError("the body is not JSON") from None


async def _current(request: Request, name: str) -> Version | None:
    version: Version | None = await _call(_policies(request).store.get, name)
    return version if version is not None and not version.deleted else None


async def _existing(request: Request, name: str) -> Version:
    """The dataset's current version; a 404 when it has none (never made, or deleted)."""
    current = await _current(request, name)
    if current is None:
        raise DatasetNotFound(f"no dataset named {name!r}")
    return current


def _expected(request: Request, current: Version | None, latest: int | None = None) -> int:
    """The version a write may replace, from its preconditions (RFC 9110 13.1). With
    `latest` (the version of a deleted or never seen dataset), `If-None-Match: *` creates."""
    if_match = request.headers.get("if-match")
    if_none = request.headers.get("if-none-match")
    if latest is not None and if_none is not None and if_none.strip() == "*":
        if current is not None:
            raise PreconditionFailed("the dataset exists: use If-Match with its ETag")
        return latest
    if if_match is None:
        raise PreconditionRequired(
            "send If-Match with the ETag you last read (or If-None-Match: * to create)"
        )
    tags = [t.strip() for t in if_match.split(",")]
    if current is None or not (current.etag in tags or "*" in tags):
        raise PreconditionFailed("the policy changed since you read it: read it again")
    return current.version


def _document_response(version: Version, status: int = 200) -> Response:
    assert version.document is not None
    doc = shown(Dataset.model_validate(version.document))
    return JSONResponse(
        doc,
        status_code=status,
        headers={"etag": version.etag, "cache-control": "no-store"},
    )


def _invalid(e: InvalidPolicy, path: str) -> Response:
    detail = "the policy is invalid: " + "; ".join(e.problems)
    return problem(422, detail, slug="invalid-policy", instance=path, errors=e.problems)


async def _subject(request: Request) -> str:
    who = await identity(request)
    return who.subject or "anonymous"


async def list_policies(request: Request) -> Response:
    versions = await _call(_policies(request).store.versions)
    return JSONResponse(
        {"policies": [v.public() | {"etag": v.etag} for v in versions.values() if not v.deleted]},
        headers={"cache-control": "no-store"},
    )


async def get_policy(request: Request) -> Response:
    name = request.path_params["dataset"]
    current = await _existing(request, name)
    if request.headers.get("if-none-match") == current.etag:
        return Response(status_code=304, headers={"etag": current.etag})
    return _document_response(current)


async def put_policy(request: Request) -> Response:
    name = request.path_params["dataset"]
    policies = _policies(request)
    latest = await _call(policies.store.get, name)
    current = latest if latest is not None and not latest.deleted else None
    expected = _expected(request, current, latest.version if latest else 0)
    doc = keep_secrets(await _body(request), current.document if current else None)
    return await _write(request, name, doc, "put", expected, created=current is None)


async def patch_policy(request: Request) -> Response:
    name = request.path_params["dataset"]
    current = await _existing(request, name)
    expected = _expected(request, current)
    patch = await _body(request)
    doc = keep_secrets(merge_patch(current.document, patch), current.document)
    return await _write(request, name, doc, "patch", expected)


async def delete_policy(request: Request) -> Response:
    name = request.path_params["dataset"]
    current = await _existing(request, name)
    expected = _expected(request, current)
    return await _write(request, name, None, "delete", expected)


async def _write(
    request: Request,
    name: str,
    doc: Document | None,
    action: str,
    expected: int,
    created: bool = False,
) -> Response:
    policies = _policies(request)
    try:
        version = await _call(policies.write, name, doc, await _subject(request), action, expected)
    except InvalidPolicy as e:
        return _invalid(e, request.url.path)
    except Stale:
        raise PreconditionFailed("the policy changed since you read it: read it again") from None
    if version.deleted:
        return Response(status_code=204, headers={"cache-control": "no-store"})
    return _document_response(version, 201 if created else 200)


async def policy_history(request: Request) -> Response:
    name = request.path_params["dataset"]
    versions = await _call(_policies(request).store.history, name)
    if not versions:
        raise DatasetNotFound(f"no dataset named {name!r}")
    return JSONResponse(
        {"dataset": name, "versions": [v.public() for v in versions]},
        headers={"cache-control": "no-store"},
    )


async def rollback_policy(request: Request) -> Response:
    """Make an earlier version's document the next version (checked again as it is now)."""
    name = request.path_params["dataset"]
    try:
        wanted = int(request.query_params["version"])
    except (KeyError, ValueError):
        raise ProxyError("rollback needs ?version=N") from None
    policies = _policies(request)
    history = await _call(policies.store.history, name)
    old = next((v for v in history if v.version == wanted), None)
    if old is None or old.document is None:
        raise DatasetNotFound(f"{name!r} has no version {wanted} with a document")
    latest = history[0]
    if request.headers.get("if-match") is not None:
        _expected(request, latest if not latest.deleted else None)
    return await _write(request, name, old.document, f"rollback to v{wanted}", latest.version)


async def validate_policy(request: Request) -> Response:
    """A dry run: would this document be accepted (`?dataset=NAME`, default `dataset`)?"""
    name = request.query_params.get("dataset", "dataset")
    policies = _policies(request)
    current = await _current(request, name)
    doc = keep_secrets(await _body(request), current.document if current else None)
    try:
        ds, _ = await _call(policies.check, name, doc)
    except InvalidPolicy as e:
        return _invalid(e, request.url.path)
    return JSONResponse(
        {"valid": True, "document": shown(ds)}, headers={"cache-control": "no-store"}
    )


routes = [
    Route("/admin/policies", list_policies),
    Route("/admin/policies/validate", validate_policy, methods=["POST"]),
    Route("/admin/policies/{dataset}", get_policy, methods=["GET", "HEAD"]),
    Route("/admin/policies/{dataset}", put_policy, methods=["PUT"]),
    Route("/admin/policies/{dataset}", patch_policy, methods=["PATCH"]),
    Route("/admin/policies/{dataset}", delete_policy, methods=["DELETE"]),
    Route("/admin/policies/{dataset}/history", policy_history),
    Route("/admin/policies/{dataset}/rollback", rollback_policy, methods=["POST"]),
]
