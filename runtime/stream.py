"""TextStream, what `Pipeline.stream` returns: text pieces, then `.result`; `Pipeline.close()` can end it.

    stream = pipe.stream(image, "Describe it.")
    for piece in stream: print(piece, end="")
    stream.result                     # the GenerationResult (also StopIteration.value)

A stream remembers the thread that made or last advanced it: `close()` ends the closing thread's own streams
at once (that thread cannot advance them while it waits in close()) and the others after its timeout.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

from runtime.errors import PipelineClosedError

CLOSED = "this Pipeline is closed; load a new one"


class TextStream:
    """Iterator of text pieces; when exhausted, `.result` holds the GenerationResult (also StopIteration.value).

    After `Pipeline.close()` ended it, `next()` raises PipelineClosedError."""

    def __init__(self, gen: Iterator[str], release):
        self._gen = gen
        self._release = release
        self._lock = threading.Lock()  # held by the thread advancing the stream
        self._owner = threading.get_ident()  # the thread that made or last advanced it
        self._ended = False
        self.result = None  # the GenerationResult, once the stream is exhausted

    def __iter__(self) -> TextStream:
        return self

    def __next__(self) -> str:
        with self._lock:
            self._owner = threading.get_ident()
            if self._ended:
                raise PipelineClosedError(f"{CLOSED} (it ended this stream)")
            try:
                return next(self._gen)
            except StopIteration as stop:
                self.result = stop.value
                raise StopIteration(stop.value) from None

    def close(self) -> None:
        """End the stream now and free its request slot, started or not (a client went away); waits for a step
        another thread has in progress. Like a generator's close(): later next() calls raise StopIteration and
        `.result` stays None unless the stream had already finished."""
        with self._lock:
            self._gen.close()
            self._release()

    def _end(self) -> bool:
        """End the stream unless a thread is advancing it right now (then False: it stops at its next check)."""
        if not self._lock.acquire(blocking=False):
            return False
        try:
            if self.result is None:
                self._ended = True
            self._gen.close()  # a started generator runs its `finally` here
            self._release()  # a never-started one has none to run
        finally:
            self._lock.release()
        return True


class _ReleaseOnce:
    """Calls `fn` the first time it is called and never again, from any thread."""

    def __init__(self, fn):
        self._fn = fn
        self._lock = threading.Lock()
        self._done = False

    def __call__(self) -> None:
        with self._lock:
            if self._done:
                return
            self._done = True
        self._fn()
