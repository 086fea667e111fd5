"""S3 (any S3-compatible store, through boto3): objects under a bucket prefix.

The platform's credentials sign everything here and never leave the process: fetches use a
short-lived presigned URL (so the ordinary HTTP path does ranged GETs), and clients only
ever see presigned URLs made for the public endpoint. boto3 blocks, so its calls run on this
store's own threads (a stalled store cannot take the process's shared thread pool).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TypeVar

import anyio
import boto3
from botocore.client import BaseClient
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectTimeoutError,
    ReadTimeoutError,
)

from policies.upstream import S3Access
from upstreams.base import (
    Listed,
    ObjectNotFound,
    Origins,
    Timeouts,
    UpstreamObject,
    UpstreamTimeout,
    UpstreamUnavailable,
    bind,
    run_blocking,
    safe_key,
)
from upstreams.memo import Memo

T = TypeVar("T")

#: Lifetime of the URLs we fetch with ourselves, and how long a resolution is reused.
FETCH_URL_SECONDS = 600
RESOLVE_TTL = 60.0
MEMO_SIZE = 4096
#: Attempts per call, the first included: a stalled store costs at most this many timeouts.
MAX_ATTEMPTS = 2


@contextlib.contextmanager
def map_boto_errors(what: str) -> Iterator[None]:
    """The one place botocore's errors become ours."""
    try:
        yield
    except ClientError as e:
        code = e.response.get("Error", {}).get("Code", "")
        if code in ("404", "NoSuchKey", "NotFound"):
            raise ObjectNotFound(f"{what}: no such object") from None
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        raise UpstreamUnavailable(
            f"{what}: object store answered {code or 'an error'}", status
        ) from None
    except (ConnectTimeoutError, ReadTimeoutError) as e:
        raise UpstreamTimeout(f"{what}: object store timed out ({type(e).__name__})") from None
    except BotoCoreError as e:
        raise UpstreamUnavailable(f"{what}: object store failed ({type(e).__name__})") from None


def make_clients(access: S3Access, timeouts: Timeouts) -> tuple[BaseClient, BaseClient]:
    """(the client we call the store with, the one that presigns URLs for clients: signed
    for `public_endpoint_url`): SigV4, path-style, bounded timeouts and attempts.
    Credentials are read now (their files may have been rotated)."""
    key_id, secret = access.credentials()
    config = Config(
        signature_version="s3v4",
        s3={"addressing_style": "path"},
        connect_timeout=timeouts.connect,
        read_timeout=timeouts.read,
        retries={"total_max_attempts": MAX_ATTEMPTS, "mode": "standard"},
    )
    session = boto3.session.Session(
        aws_access_key_id=key_id,
        aws_secret_access_key=secret,
        region_name=access.region or "us-east-1",
    )
    endpoint = str(access.endpoint_url) if access.endpoint_url else None
    public = str(access.public_endpoint_url) if access.public_endpoint_url else endpoint
    return (
        session.client("s3", endpoint_url=endpoint, config=config),
        session.client("s3", endpoint_url=public, config=config),
    )


class S3Resolver:
    def __init__(
        self,
        bucket: str,
        prefix: str,
        access: S3Access,
        *,
        timeouts: Timeouts | None = None,
        limiter: anyio.CapacityLimiter | None = None,
        origins: Origins | None = None,
    ) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.timeouts = timeouts or Timeouts()
        self.limiter = limiter or anyio.CapacityLimiter(8)
        self.client, self.public = make_clients(access, self.timeouts)
        # the presigned URLs we fetch point at the endpoint: it is always allowed
        self.origins = (origins or Origins()) | Origins.of(self.client.meta.endpoint_url)
        self._seen: Memo[str, UpstreamObject] = Memo(MEMO_SIZE, RESOLVE_TTL)

    def key(self, path: str) -> str:
        return self.prefix + safe_key(path)

    async def run_blocking(self, fn: Callable[..., T], *args: object) -> T:
        """Run a blocking call on this store's threads; waiting for one is bounded too."""
        return await run_blocking(self.limiter, self.timeouts.call, fn, *args)

    async def resolve(self, path: str) -> UpstreamObject:
        obj = self._seen.get(path)
        if obj is None:
            obj = self._seen[path] = await self.run_blocking(self._head, path)
        return obj

    def _head(self, path: str) -> UpstreamObject:
        key = self.key(path)
        with map_boto_errors(f"object {path!r}"):
            meta = self.client.head_object(Bucket=self.bucket, Key=key)
        href = self.client.generate_presigned_url(
            "get_object",
            Params={"Bucket": self.bucket, "Key": key},
            ExpiresIn=FETCH_URL_SECONDS,
        )
        obj = UpstreamObject(
            href=href, size=meta["ContentLength"], media_type=meta.get("ContentType")
        )
        return bind(obj, self.origins, self.timeouts)

    def presign(self, path: str, method: str, expires: int) -> str:
        """A URL for clients: GET, or HEAD (a GET signature does not cover HEAD)."""
        operation = "head_object" if method == "HEAD" else "get_object"
        return self.public.generate_presigned_url(
            operation, Params={"Bucket": self.bucket, "Key": self.key(path)}, ExpiresIn=expires
        )

    async def listing(self, limit: int = 10000) -> list[Listed]:
        """`keys()` on this store's threads."""
        return await self.run_blocking(self.keys, limit)

    def keys(self, limit: int = 10000) -> list[Listed]:
        """Objects under the prefix (keys relative to it), for listings. Blocking."""
        out: list[Listed] = []
        with map_boto_errors("listing"):
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self.prefix
            )
            for page in pages:
                out += [
                    Listed(o["Key"][len(self.prefix) :], o.get("Size"))
                    for o in page.get("Contents", [])
                    if not o["Key"].endswith("/")  # folder markers are not objects
                ]
                if len(out) >= limit:
                    break
        return out[:limit]
