"""A resident-memory watchdog for long exports: past a limit it says why and ends the process.

    from export.watchdog import MemoryWatchdog, rss_bytes
    with MemoryWatchdog(20 * 2**30, on_abort=stage.discard) as watchdog:
        watchdog.stage = "write decoder"     # named in the message
        ...
    watchdog.peak                            # highest resident memory seen, bytes

A Python exception cannot interrupt a long C call (a tracer, a protobuf serialiser), so the watchdog thread
prints one line, runs `on_abort` (e.g. deleting the staging folder) and exits the process with code 3.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Callable

ABORT_EXIT_CODE = 3


def rss_bytes() -> int:
    """Resident set size of this process."""
    import psutil

    return int(psutil.Process().memory_info().rss)


class MemoryWatchdog:
    """Samples this process's resident memory every `interval` s; past `limit_bytes` it calls `on_abort`,
    prints why and ends the process (exit code 3).

    `.peak` is the highest sample; `.stage` names the current step for the message.
    """

    def __init__(self, limit_bytes: int, *, on_abort: Callable[[], None] | None = None, interval: float = 0.2):
        self.limit = int(limit_bytes)
        self.on_abort = on_abort
        self.interval = interval
        self.peak = rss_bytes()
        self.stage = "start"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="memory-watchdog", daemon=True)

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            rss = rss_bytes()
            self.peak = max(self.peak, rss)
            if rss > self.limit:
                self._abort(rss)

    def _abort(self, rss: int) -> None:
        print(
            f"[export] error: resident memory {rss / 2**30:.1f} GiB passed the "
            f"{self.limit / 2**30:.1f} GiB limit during '{self.stage}'; aborted, nothing was written. "
            "Free memory (close other programs) or raise memory_limit_gib if the machine has more RAM.",
            file=sys.stderr,
            flush=True,
        )
        if self.on_abort is not None:
            with contextlib.suppress(Exception):
                self.on_abort()
        os._exit(ABORT_EXIT_CODE)

    def __enter__(self) -> MemoryWatchdog:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())
