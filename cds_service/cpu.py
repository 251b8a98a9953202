"""One CPU slot per process: the computing part of a call runs one call at a time.

A gunicorn worker answers several calls at once on threads, so that a call waiting
on the EHR's FHIR server does not stop the others. Python runs one thread at a time
anyway, and four threads taking turns in the middle of judging orders cost about
half as much CPU again per call as one thread doing the same calls in turn: each
handover evicts the other call's data from the processor's caches. So
the part of a call that computes (parsing the body, building the record, judging,
writing cards) holds the slot, and whatever waits on the network (reading the
body, the JWT check, the FHIR fallback, sending the answer) does not.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class CpuSlot:
    """A lock each thread holds at most once, released where it waits."""

    def __init__(self):
        # A lock, not a semaphore: threading's semaphores are Python code (a
        # condition and its list of waiters), taken and given back on every call.
        self._lock = threading.Lock()
        self._held = threading.local()

    @property
    def held(self) -> bool:
        return getattr(self._held, "value", False)

    def acquire(self) -> None:
        if not self.held:
            self._lock.acquire()
            self._held.value = True

    def release(self) -> None:
        if self.held:
            self._held.value = False
            self._lock.release()

    @contextmanager
    def released(self) -> Iterator[None]:
        """Let other calls compute while this one waits (a no-op if not held)."""
        if not self.held:
            yield
            return
        self.release()
        try:
            yield
        finally:
            self.acquire()


slot = CpuSlot()
