"""The CLI's side of the admin API: a running proxy at `--url` (default `$FDP_URL`, else
the local default), with the operator's bearer token from `$FDP_TOKEN`."""

from __future__ import annotations

import os
from typing import Any

import httpx

DEFAULT_URL = "http://127.0.0.1:8080"
TIMEOUT = 30.0


class Remote:
    """One proxy's admin API; an error answer ends the command with its message."""

    def __init__(self, url: str | None) -> None:
        self.url = (url or os.environ.get("FDP_URL") or DEFAULT_URL).rstrip("/")
        token = os.environ.get("FDP_TOKEN")
        self.headers = {"authorization": f"Bearer {token}"} if token else {}

    def call(
        self,
        method: str,
        path: str,
        ok: tuple[int, ...] = (200,),
        headers: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> httpx.Response:
        """The answer, if its status is one of `ok`; else SystemExit with the problem's
        detail and each of its `errors` (never the token)."""
        try:
            r = httpx.request(
                method,
                self.url + path,
                headers={**self.headers, **(headers or {})},
                timeout=TIMEOUT,
                **kwargs,
            )
        except httpx.HTTPError as e:
            raise SystemExit(f"fdp: cannot reach {self.url}: {type(e).__name__}") from None
        if r.status_code in ok:
            return r
        try:
            body = r.json()
            detail, errors = body.get("detail", r.reason_phrase), body.get("errors", [])
        except ValueError:
            detail, errors = r.reason_phrase, []
        hint = " (set FDP_TOKEN to an admin's token)" if r.status_code in (401, 403) else ""
        lines = [f"fdp: {r.status_code} {detail}{hint}"]
        if errors:
            lines = [f"fdp: {r.status_code} {r.reason_phrase}", *(f"  {e}" for e in errors)]
        raise SystemExit("\n".join(lines))

    def json(self, path: str, params: dict[str, Any] | None = None) -> Any:
        return self.call("GET", path, params=params).json()
