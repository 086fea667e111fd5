"""The `account` stage's output: one structured line per `/assets` request.

Lines go to the `fdp.access` logger at INFO (JSON with `log.format: json`). They carry the
path without its query, the caller's subject and never a header value, so no token or
credential can end up in them.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

from proxy.exchange import Exchange

log = logging.getLogger("fdp.access")


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message and any `fields` extra."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        out |= getattr(record, "fields", {})
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def configure_logging(fmt: str = "text") -> None:
    """Root logging for fdp processes: level from FDP_LOG_LEVEL, text or JSON lines."""
    level = os.environ.get("FDP_LOG_LEVEL", "INFO").upper()
    handler = logging.StreamHandler()
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    for noisy in ("eodag", "httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def fields(x: Exchange) -> dict[str, Any]:
    """What the access line says about one exchange."""
    plan = x.plan
    return {
        "method": x.method,
        "path": x.path,
        "dataset": x.dataset or None,
        "user": x.who.subject,
        "client": x.client,
        "status": x.status,
        "bytes": x.sent,
        "plan": plan.kind.value if plan is not None else None,
        "range": x.range,
        "error": x.error,
        "ms": round(x.duration * 1000, 2),
    }


class AccessLog:
    def write(self, x: Exchange) -> None:
        """Log `x` when the access logger is on (it costs about as much as a cache hit)."""
        if not log.isEnabledFor(logging.INFO):
            return
        f = fields(x)
        log.info(
            "%s %s %s %sB %s %.1fms%s",
            f["method"],
            f["path"],
            f["status"],
            f["bytes"],
            f["plan"] or "-",
            f["ms"],
            f" error={f['error']}" if f["error"] else "",
            extra={"fields": f},
        )
