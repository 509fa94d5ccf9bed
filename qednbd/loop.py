"""The event loop the server runs on: asyncio's selector loop, spinning briefly before it blocks
when a client looks latency-bound.

Why: a client with one request in flight (QD1) waits for each reply before it sends the next
request. If the loop sleeps in ``epoll_wait`` meanwhile, every request pays a wake-up of the
server thread, which costs tens of microseconds on a virtual machine — as much as the request
itself. So after a wake-up that brought exactly one small request, :class:`SpinningSelector` polls
without blocking for up to :data:`SPIN_SECONDS` before it sleeps (QEMU's IOThreads poll the same
way, for the same reason). Only then: a wake-up that brought a batch (a deep queue) sleeps at once,
because spinning would take each request as it trickles in and lose the batching that makes deep
queues cheap, and large requests sleep at once because their own cost dwarfs a wake-up.
"""

from __future__ import annotations

import selectors
import time
from typing import Final

# Longest spin before blocking. A QD1 client's next request arrives ~20-40 us after its reply
# leaves; a spin that catches it saves the server's wake-up. Measured on the 2-core benchmark
# machine: 4 KiB QD1 reads at 9.2-9.6K IOPS blocking, 14-16K with a 30 us spin, 16-19K with 100 us.
SPIN_SECONDS: Final = 50e-6


class SpinningSelector(selectors.EpollSelector):
    """An epoll selector that, when :meth:`spin_next` was called since its last select, polls for
    up to :data:`SPIN_SECONDS` before it blocks."""

    def __init__(self) -> None:
        super().__init__()
        self._spin = False
        self.spins = 0  # spins that found an event (for tests and the curious)

    def spin_next(self) -> None:
        """The request just answered was a lone small one: its client may well send another."""
        self._spin = True

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if self._spin:
            self._spin = False
            if timeout is None or timeout > SPIN_SECONDS:
                start = time.monotonic()
                while True:
                    ready = super().select(0)
                    now = time.monotonic()
                    if ready:
                        self.spins += 1
                        return ready
                    if now - start >= SPIN_SECONDS:
                        break
        return super().select(timeout)
