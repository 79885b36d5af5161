"""Admission control: at most `running` requests on the backend, at most `queue` more waiting, the rest refused.

    slots = Slots(running=4, queue=64)
    await slots.acquire()          # waits its turn in arrival order; raises Full at once when the queue is full
    try: ... finally: slots.release()

Runs on the server's event loop (not thread-safe); a waiter cancelled while queued (its client left) gives up
its place, and a slot handed to a waiter that was cancelled at the same moment is passed on, never lost.
"""

from __future__ import annotations

import asyncio
from collections import deque


class Full(Exception):
    """`running` requests are running and `queue` are waiting."""


class Slots:
    def __init__(self, running: int, queue: int):
        if running < 1 or queue < 0:
            raise ValueError(f"need running >= 1 and queue >= 0, got {running} and {queue}")
        self.capacity, self.queue_size = running, queue
        self.running = 0
        self._waiters: deque[asyncio.Future] = deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    async def acquire(self) -> None:
        if self.running < self.capacity and not self._waiters:
            self.running += 1
            return
        if len(self._waiters) >= self.queue_size:
            raise Full(f"{self.running} requests are running and {len(self._waiters)} waiting")
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await fut  # release() hands its slot over: running stays counted
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release()  # the slot arrived as we were cancelled: pass it on
            else:
                self._waiters.remove(fut)
            raise

    def release(self) -> None:
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return
        self.running -= 1
