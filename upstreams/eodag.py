"""EODAG datasets: `{item_id}/{asset_key}` resolved through an EODAG provider.

EODAG does the provider-specific part (search, auth plugins, order metadata); the bytes are
fetched by our own async client with the client's Range, because EODAG's streaming ignores
ranges (NOTES.md). Every EODAG call blocks, so it runs on the provider's own threads (a
stalled provider cannot take the process's shared thread pool), with our timeouts.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import anyio

from upstreams.base import (
    BadPath,
    ObjectNotFound,
    Origins,
    Timeouts,
    UpstreamError,
    UpstreamObject,
    UpstreamUnavailable,
    bind,
    run_blocking,
    safe_key,
)
from upstreams.memo import Memo

T = TypeVar("T")

#: How long a resolved item (or a miss) is trusted before EODAG is asked again.
ITEM_TTL = 300.0
MISS_TTL = 30.0
MEMO_SIZE = 4096
#: How long an order may take before the retrieval counts as failed.
ORDER_TIMEOUT = 6 * 3600.0
#: Retries of one EODAG search request (EODAG's default is 3, with growing pauses).
SEARCH_RETRIES = 1
#: Provider config keys whose URLs are patterns or data mappings, not places we fetch from.
NOT_HOSTS = ("metadata_mapping", "products", "matching_url", "matching_conf")


def make_gateway(providers_file: Path | None, workdir: Path) -> Any:
    """An EODataAccessGateway that loads only our providers and never reaches the internet.

    Its config lives in `workdir` (not `$HOME`), and the external collections list is an
    empty local file, otherwise EODAG fetches it from the web on first use.
    """
    from eodag import EODataAccessGateway
    from eodag.config import EODAGSettings

    providers_dir = workdir / "providers"
    providers_dir.mkdir(parents=True, exist_ok=True)
    if providers_file is not None:
        shutil.copyfile(providers_file, providers_dir / "providers.yml")
    ext = workdir / "ext_collections.json"
    ext.write_text("{}")
    user_conf = workdir / "eodag.yml"
    user_conf.write_text("{}\n")  # no per-user provider overrides (and no template warnings)
    settings = EODAGSettings(
        cfg_dir=workdir / "cfg",
        cfg_file=user_conf,
        providers_cfg_dir=providers_dir,
        ext_collections_cfg_uri=str(ext),
    )
    return EODataAccessGateway(settings=settings)


def limit_provider(gateway: Any, provider: str, timeouts: Timeouts) -> None:
    """Give a provider's searches our timeout and few retries, unless its config sets them.

    (`gateway.providers` is a copy: changes go through `update_providers_config`.)
    """
    config = gateway.providers[provider].config
    topic = "search" if getattr(config, "search", None) is not None else "api"
    search = getattr(config, topic, None)
    if search is None:
        return
    wanted = {"timeout": timeouts.read, "retry_total": SEARCH_RETRIES}
    update = {k: v for k, v in wanted.items() if getattr(search, k, None) is None}
    if update:
        gateway.update_providers_config(dict_conf={provider: {topic: update}})


def provider_origins(gateway: Any, provider: str) -> Origins:
    """Every origin a provider's config names: its `url`, search/API endpoints, auth and
    download hosts (not its data mappings, which are patterns)."""
    seen: set[int] = set()

    def walk(value: Any) -> Iterator[str]:
        if id(value) in seen:
            return
        seen.add(id(value))
        if isinstance(value, str):
            parts = urlsplit(value)
            if parts.scheme in ("http", "https") and parts.netloc and "{" not in parts.netloc:
                yield value
        elif isinstance(value, dict):
            for k, v in value.items():
                if k not in NOT_HOSTS:
                    yield from walk(v)
        elif isinstance(value, list | tuple):
            for v in value:
                yield from walk(v)
        elif hasattr(value, "__dict__"):
            yield from walk(vars(value))

    return Origins.of(*walk(gateway.providers[provider].config))


class EodagWorkdir:
    """A private temporary folder for EODAG's config files, removed on close."""

    def __init__(self) -> None:
        self.path = Path(tempfile.mkdtemp(prefix="fdp-eodag-"))

    def close(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def _split(path: str) -> tuple[str, str]:
    key = safe_key(path)
    if '"' in key:  # a provider's search would choke on it (or worse): a client mistake
        raise BadPath(f"invalid item id or asset key {key!r}")
    item_id, sep, asset_key = key.partition("/")
    if not sep or "/" in asset_key:
        raise ObjectNotFound(f"expected {{item_id}}/{{asset_key}}, got {key!r}")
    return item_id, asset_key


class EodagResolver:
    """Resolve through one provider and collection; items are cached, lookups single-flight."""

    def __init__(
        self,
        gateway: Any,
        provider: str,
        collection: str,
        *,
        timeouts: Timeouts | None = None,
        limiter: anyio.CapacityLimiter | None = None,
        origins: Origins | None = None,
    ) -> None:
        self.gateway = gateway
        self.provider = provider
        self.collection = collection
        self.timeouts = timeouts or Timeouts()
        self.limiter = limiter or anyio.CapacityLimiter(8)
        self.origins = origins if origins is not None else provider_origins(gateway, provider)
        #: found items and known misses, each bounded by size and age
        self._items: Memo[str, dict[str, UpstreamObject]] = Memo(MEMO_SIZE, ITEM_TTL)
        self._missing: Memo[str, bool] = Memo(MEMO_SIZE, MISS_TTL)
        self._inflight: dict[str, asyncio.Future[dict[str, UpstreamObject] | None]] = {}

    async def resolve(self, path: str) -> UpstreamObject:
        item_id, asset_key = _split(path)
        assets = await self._assets(item_id)
        if assets is None:
            raise ObjectNotFound(f"no item {item_id!r} in {self.collection}")
        if asset_key not in assets:
            raise ObjectNotFound(f"item {item_id!r} has no asset {asset_key!r}")
        return bind(assets[asset_key], self.origins, self.timeouts)

    async def run_blocking(self, fn: Callable[..., T], *args: object) -> T:
        """Run a blocking EODAG call on this provider's threads; waiting is bounded too."""
        return await run_blocking(self.limiter, self.timeouts.call, fn, *args)

    async def search(
        self, limit: int, query: dict[str, Any], cursor: dict[str, Any] | None
    ) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
        """One page of the collection; EODAG pages by the provider's own next-page token."""
        return await self.run_blocking(self._search_page, limit, query, cursor)

    def _search_page(
        self, limit: int, query: dict[str, Any], cursor: dict[str, Any] | None
    ) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
        kwargs: dict[str, Any] = {
            "collection": self.collection,
            "provider": self.provider,
            "raise_errors": True,
            "limit": limit,
            **query,
        }
        if cursor:
            kwargs |= {"next_page_token": cursor["t"], "next_page_token_key": cursor["k"]}
        try:
            results = self.gateway.search(**kwargs)
        except Exception as e:  # EODAG's errors are many; the provider failed either way
            raise UpstreamUnavailable(f"EODAG search failed ({type(e).__name__})") from None
        token = results.next_page_token if len(results) >= limit else None
        nxt = {"k": results.next_page_token_key, "t": token} if token is not None else None
        return [p.as_dict() for p in results], nxt

    async def _assets(self, item_id: str) -> dict[str, UpstreamObject] | None:
        if item_id in self._missing:
            return None
        hit = self._items.get(item_id)
        if hit is not None:
            return hit
        if item_id in self._inflight:
            return await asyncio.shield(self._inflight[item_id])
        future: asyncio.Future[dict[str, UpstreamObject] | None]
        future = asyncio.get_running_loop().create_future()
        self._inflight[item_id] = future
        try:
            assets = await self.run_blocking(self._search, item_id)
            if assets is None:
                self._missing[item_id] = True
            else:
                self._items[item_id] = assets
            future.set_result(assets)
            return assets
        except BaseException as e:
            future.set_exception(e)
            future.exception()  # retrieved: waiters get it, nobody else needs to
            raise
        finally:
            del self._inflight[item_id]

    def _search(self, item_id: str) -> dict[str, UpstreamObject] | None:
        try:
            results = self.gateway.search(
                id=item_id,
                collection=self.collection,
                provider=self.provider,
                raise_errors=True,
            )
        except Exception as e:  # EODAG raises many kinds; all mean "provider failed"
            raise UpstreamUnavailable(f"EODAG search failed ({type(e).__name__})") from None
        product = next((p for p in results if p.properties.get("id") == item_id), None)
        return None if product is None else _objects(product)

    def order(self, path: str, progress: Callable[[int, int | None], None]) -> UpstreamObject:
        """Order an offline product with EODAG's downloader; poll until online. Blocking.

        One `order()` call places the order (once) and checks its status; we poll with
        backoff, honouring the provider's Retry-After, and give up after ORDER_TIMEOUT.
        """
        from eodag.utils.exceptions import EodagError
        from requests import RequestException

        item_id, asset_key = _split(path)
        try:
            results = self.gateway.search(
                id=item_id, collection=self.collection, provider=self.provider, raise_errors=True
            )
        except Exception as e:  # EODAG raises many kinds; all mean "provider failed"
            raise UpstreamUnavailable(f"EODAG search failed ({type(e).__name__})") from None
        product = next((p for p in results if p.properties.get("id") == item_id), None)
        if product is None:
            raise ObjectNotFound(f"no item {item_id!r} in {self.collection}")
        props = product.properties
        auth = product.downloader_auth.authenticate() if product.downloader_auth else None
        deadline, delay = time.monotonic() + ORDER_TIMEOUT, 1.0
        while props.get("order:status") != "succeeded":
            props.pop("eodag:retry_after", None)
            try:
                product.downloader.order(product, auth=auth, wait=0, timeout=0)
            except (EodagError, RequestException) as e:
                # EODAG marks the product ordered before it POSTs: undo, so a retry orders
                props["order:status"] = "orderable"
                props.pop("eodag:order_status", None)
                raise UpstreamUnavailable(f"ordering failed ({type(e).__name__})") from None
            if props.get("order:status") == "succeeded":
                break
            if props.get("eodag:order_status") == "orderable":  # the order did not take
                props["order:status"] = "orderable"
                props.pop("eodag:order_status", None)
            if time.monotonic() > deadline:
                raise UpstreamUnavailable(f"order not ready after {ORDER_TIMEOUT:.0f} s")
            hint = props.get("eodag:retry_after")
            pause = float(hint) if str(hint or "").isdigit() else delay
            time.sleep(min(max(pause, 0.5), 300.0))
            delay = min(delay * 2, 60.0)
        self._items.pop(item_id)  # its order status changed
        objects = _objects(product)
        if asset_key not in objects:
            raise ObjectNotFound(f"item {item_id!r} has no asset {asset_key!r}")
        return bind(objects[asset_key], self.origins, self.timeouts)


def _objects(product: Any) -> dict[str, UpstreamObject]:
    """An EOProduct's assets as upstream objects (with the provider's auth headers)."""
    online = product.properties.get("order:status") in (None, "succeeded")
    out = {}
    for key, asset in product.assets.items():
        href = asset.get("href")
        if not href:
            continue
        # for an offline product EODAG's storage options would place the order (and wait)
        options = product.get_storage_options(key) if online else {}
        headers = options.get("headers") or {}
        out[key] = UpstreamObject(
            href=options.get("path") or href,
            size=asset.get("file:size"),
            media_type=asset.get("type"),
            checksum=asset.get("file:checksum"),
            headers={str(k): str(v) for k, v in headers.items()},
            online=online,
        )
    return out


class FederatedResolver:
    """One collection at several EODAG providers, in the order given: a path resolves at the
    first provider that has its item, and an offline item is ordered from that provider; a
    provider that fails is passed over. Searches page through `members` one after another
    (the STAC catalogue does that, so it can say which provider failed)."""

    def __init__(self, members: list[EodagResolver]) -> None:
        self.members = members
        self.origins = Origins()
        for member in members:
            self.origins = self.origins | member.origins

    async def resolve(self, path: str) -> UpstreamObject:
        return await self._first(lambda m: m.resolve(path))

    async def _first(self, call: Callable[[EodagResolver], Any]) -> Any:
        failure: UpstreamError | None = None
        for member in self.members:
            try:
                return await call(member)
            except (ObjectNotFound, UpstreamUnavailable) as e:
                if isinstance(e, UpstreamUnavailable) or failure is None:
                    failure = e  # a provider's failure outranks another's "not found"
        assert failure is not None
        raise failure

    def order(self, path: str, progress: Callable[[int, int | None], None]) -> UpstreamObject:
        """Order from the first provider that has the item (blocking, like EodagResolver's)."""
        failure: Exception | None = None
        for member in self.members:
            try:
                return member.order(path, progress)
            except (ObjectNotFound, UpstreamUnavailable) as e:
                failure = e
        assert failure is not None
        raise failure
