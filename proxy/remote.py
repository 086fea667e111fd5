"""The CLI's side of the admin API: a running proxy at `--url` (default `$FDP_URL`, else
the local default), with the operator's bearer token from `$FDP_TOKEN`."""

from __future__ import annotations

import os
from typing import Any

import httpx

DEFAULT_URL = "http://127.0.0.1:8080"
TIMEOUT = 30.0


def base_url(url: str | None) -> str:
    return (url or os.environ.get("FDP_URL") or DEFAULT_URL).rstrip("/")


def get_json(url: str | None, path: str, params: dict[str, Any] | None = None) -> Any:
    """GET `path` of the proxy; a problem or an unreachable proxy ends the command with
    its message (never the token)."""
    token = os.environ.get("FDP_TOKEN")
    headers = {"authorization": f"Bearer {token}"} if token else {}
    target = base_url(url)
    try:
        r = httpx.get(target + path, params=params, headers=headers, timeout=TIMEOUT)
    except httpx.HTTPError as e:
        raise SystemExit(f"fdp: cannot reach {target}: {type(e).__name__}") from None
    if r.status_code >= 400:
        try:
            detail = r.json().get("detail", r.reason_phrase)
        except ValueError:
            detail = r.reason_phrase
        hint = " (set FDP_TOKEN to an admin's token)" if r.status_code in (401, 403) else ""
        raise SystemExit(f"fdp: {r.status_code} {detail}{hint}")
    return r.json()
