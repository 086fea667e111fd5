"""S3 (any S3-compatible store, through boto3): objects under a bucket prefix.

The platform's credentials sign everything here and never leave the process: fetches use a
short-lived presigned URL (so the ordinary HTTP path does ranged GETs), and clients only
ever see presigned URLs made for the public endpoint.
"""

from __future__ import annotations

import time

import anyio.to_thread
import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from upstreams.base import ObjectNotFound, UpstreamObject, UpstreamUnavailable, safe_key

#: Lifetime of the URLs we fetch with ourselves, and how long a resolution is reused.
FETCH_URL_SECONDS = 600
RESOLVE_TTL = 60.0


class S3Resolver:
    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        endpoint_url: str | None = None,
        public_endpoint_url: str | None = None,
        region: str | None = None,
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
    ) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        config = Config(
            signature_version="s3v4",
            s3={"addressing_style": "path"},
            retries={"max_attempts": 3, "mode": "standard"},
        )
        session = boto3.session.Session(
            aws_access_key_id=access_key_id,
            aws_secret_access_key=secret_access_key,
            region_name=region or "us-east-1",
        )
        self.client = session.client("s3", endpoint_url=endpoint_url, config=config)
        self.public = session.client(
            "s3", endpoint_url=public_endpoint_url or endpoint_url, config=config
        )
        self._seen: dict[str, tuple[float, UpstreamObject]] = {}

    def key(self, path: str) -> str:
        return self.prefix + safe_key(path)

    async def resolve(self, path: str) -> UpstreamObject:
        hit = self._seen.get(path)
        if hit is not None and hit[0] > time.monotonic():
            return hit[1]
        obj = await anyio.to_thread.run_sync(self._head, path)
        self._seen[path] = (time.monotonic() + RESOLVE_TTL, obj)
        return obj

    def _head(self, path: str) -> UpstreamObject:
        key = self.key(path)
        try:
            meta = self.client.head_object(Bucket=self.bucket, Key=key)
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code", "")
            if code in ("404", "NoSuchKey", "NotFound"):
                raise ObjectNotFound(f"no object {path!r}") from None
            raise UpstreamUnavailable(f"object store answered {code or 'an error'}") from None
        except BotoCoreError as e:
            raise UpstreamUnavailable(f"object store failed ({type(e).__name__})") from None
        href = self.client.generate_presigned_url(
            "get_object",
            Params={"Bucket": self.bucket, "Key": key},
            ExpiresIn=FETCH_URL_SECONDS,
        )
        return UpstreamObject(
            href=href, size=meta["ContentLength"], media_type=meta.get("ContentType")
        )

    def presign(self, path: str, method: str, expires: int) -> str:
        """A URL for clients: GET, or HEAD (a GET signature does not cover HEAD)."""
        operation = "head_object" if method == "HEAD" else "get_object"
        return self.public.generate_presigned_url(
            operation, Params={"Bucket": self.bucket, "Key": self.key(path)}, ExpiresIn=expires
        )

    def keys(self, limit: int = 10000) -> list[str]:
        """Object keys under the prefix (relative to it), for listings."""
        out: list[str] = []
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self.prefix
        )
        for page in pages:
            out += [o["Key"][len(self.prefix) :] for o in page.get("Contents", [])]
            if len(out) >= limit:
                break
        return out[:limit]
