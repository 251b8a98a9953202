"""Answers remembered across calls by a digest of what was asked, never its content."""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict

# Built once: json.dumps with options builds a new encoder on every call. What is
# encoded is parsed JSON or values the service built, never circular.
_CANONICAL = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), default=str, check_circular=False
)


def canonical_json(value: object) -> str:
    """`value` as JSON with sorted keys and no spaces: equal content, equal text."""
    return _CANONICAL.encode(value)


def digest(content: str | bytes) -> bytes:
    """A 16-byte digest of `content`: a key that cannot be read back as it."""
    data = content.encode() if isinstance(content, str) else content
    return hashlib.blake2b(data, digest_size=16).digest()


class DigestMemo:
    """A bounded, thread-safe map from digests to answers, oldest forgotten first.

    The service keeps no patient data between calls (CRD sec-6); what it learns
    about a resource or a coding is kept under the digest of its JSON or text.
    """

    def __init__(self, size: int):
        self.size = size
        self._answers: OrderedDict[bytes, object] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: bytes, default: object = None) -> object:
        with self._lock:
            try:
                self._answers.move_to_end(key)
            except KeyError:
                return default
            return self._answers[key]

    def put(self, key: bytes, answer: object) -> None:
        with self._lock:
            self._answers[key] = answer
            if len(self._answers) > self.size:
                self._answers.popitem(last=False)
