"""A site's set-aside list: announcements whose transfer kept failing (the other side down for
that object, or refusing it), kept on disk beside the cache and retried apart from the feed.

Set aside, one object holds neither a transfer slot nor the feed's place, nor a broker's
in-order acknowledgements: the rest of the feed goes on, and a restart keeps the list.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class SetAside:
    file: Path
    message: dict[str, Any]
    #: when it was first set aside (wall clock)
    since: float


class SetAsideList:
    """One JSON file per announcement, named by what it announces (set aside again, it
    keeps its first time)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)

    def put(self, message: dict[str, Any]) -> None:
        what = json.dumps([message.get("relPath"), message.get("identity")], sort_keys=True)
        file = self.folder / f"{hashlib.sha256(what.encode()).hexdigest()[:32]}.json"
        if _read(file) is not None:
            return
        fd, part = tempfile.mkstemp(dir=self.folder, suffix=".part")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump({"message": message, "since": time.time()}, f)
                f.flush()
                os.fsync(f.fileno())  # (the message is acknowledged next: this is its copy)
            os.replace(part, file)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(part)
            raise

    def entries(self) -> list[SetAside]:
        """Oldest first; files that are not ours (or half written) are skipped."""
        found = [e for e in map(_read, self.folder.glob("*.json")) if e is not None]
        return sorted(found, key=lambda e: e.since)

    def remove(self, entry: SetAside) -> None:
        entry.file.unlink(missing_ok=True)


def _read(file: Path) -> SetAside | None:
    try:
        doc = json.loads(file.read_text())
        return SetAside(file, dict(doc["message"]), float(doc["since"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None
