"""Checking bytes against what the catalogue promised (`file:checksum`, `file:size`)."""

from __future__ import annotations

import hashlib
from typing import Any

#: multihash function codes we can verify -> hashlib names
MULTIHASH = {0x12: "sha256", 0x13: "sha512", 0x11: "sha1", 0xD5: "md5", 0x1E: "blake3"}


class ChecksumMismatch(Exception):
    pass


def hasher_for(multihash: str | None) -> tuple[Any, str] | None:
    """(a hashlib object, expected hex digest) for a hex multihash, or None if unusable."""
    if not multihash:
        return None
    try:
        raw = bytes.fromhex(multihash)
    except ValueError:
        return None
    if len(raw) < 2 or raw[0] not in MULTIHASH or raw[1] != len(raw) - 2:
        return None
    name = MULTIHASH[raw[0]]
    if name not in hashlib.algorithms_available:
        return None
    return hashlib.new(name), raw[2:].hex()


class Digest:
    """The sha256 we record, plus the catalogue's multihash when it names one we can check."""

    def __init__(self, multihash: str | None) -> None:
        self.sha256 = hashlib.sha256()
        self._check = hasher_for(multihash)

    @property
    def checkable(self) -> bool:
        return self._check is not None

    def update(self, chunk: bytes) -> None:
        self.sha256.update(chunk)
        if self._check is not None:
            self._check[0].update(chunk)

    def matches(self) -> bool:
        """True when the bytes match the catalogue (or there is nothing to match)."""
        return self._check is None or self._check[0].hexdigest() == self._check[1]
