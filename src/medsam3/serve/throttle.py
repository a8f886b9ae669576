"""Failed-authentication throttling: a client that keeps sending wrong tokens is made to wait.

After :attr:`FailureThrottle.limit` failed attempts within :attr:`FailureThrottle.window` seconds from one
client address, that address gets 429 (with ``Retry-After``) for every request until its oldest counted
failure leaves the window. Right tokens are not counted, so one user's typo does not lock out a shared
address for long; memory is bounded (the least recently failing addresses are forgotten first).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque


class FailureThrottle:
    """Counts failed attempts per client address (module docstring)."""

    def __init__(self, limit: int = 10, window: float = 60.0, max_clients: int = 10_000):
        self.limit = int(limit)
        self.window = float(window)
        self.max_clients = int(max_clients)
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()
        self._lock = threading.Lock()

    def wait(self, client: str, now: float | None = None) -> float:
        """Seconds ``client`` must wait before its next attempt (0: it may try now)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            times = self._failures.get(client)
            if times is None:
                return 0.0
            while times and times[0] <= now - self.window:
                times.popleft()
            if not times:
                del self._failures[client]
                return 0.0
            return max(0.0, times[0] + self.window - now) if len(times) >= self.limit else 0.0

    def failed(self, client: str, now: float | None = None) -> None:
        """Count one failed attempt of ``client``."""
        now = time.monotonic() if now is None else now
        with self._lock:
            times = self._failures.setdefault(client, deque(maxlen=self.limit))
            times.append(now)
            self._failures.move_to_end(client)
            while len(self._failures) > self.max_clients:
                self._failures.popitem(last=False)
