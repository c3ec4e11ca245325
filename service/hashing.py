"""Stable hashes: the same input gives the same value in every process, on every machine
and Python version (unlike ``hash()``), so workers agree on cache keys, lock keys and
seeds without talking to each other."""

from __future__ import annotations

import hashlib
import json
from typing import Any


def stable_hash(value: Any, length: int = 16) -> str:
    """Hex digest (``length`` characters) of ``value``'s canonical JSON (sorted keys)."""
    blob = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


def stable_int(value: Any, bits: int = 63) -> int:
    """A non-negative integer below 2**bits derived from ``value`` (seeds, lock keys)."""
    return int(stable_hash(value, length=16), 16) % (1 << bits)
