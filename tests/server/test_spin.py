"""The latency spin (qednbd.loop): the selector spins only when hinted and never instead of
blocking, and the server hints after a lone small request only, never after a batch or a large
one (spinning there would break up batches or burn CPU for nothing)."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import qemu_img, qemu_io

from qednbd.export import Export
from qednbd.loop import SPIN_SECONDS, SpinningSelector
from qednbd.nbd.constants import Command
from qednbd.qed.image import QedImage
from qednbd.server import ExportSet, Server
from server.rawclient import RawClient


@pytest.fixture
def selector_pair() -> Iterator[tuple[SpinningSelector, socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    sel = SpinningSelector()
    sel.register(a, 1)  # EVENT_READ
    try:
        yield sel, a, b
    finally:
        sel.close()
        a.close()
        b.close()


def test_a_hinted_select_returns_what_is_ready(selector_pair) -> None:
    sel, _, b = selector_pair
    b.send(b"x")
    sel.spin_next()
    assert len(sel.select(None)) == 1
    assert sel.spins == 1


def test_a_spin_that_finds_nothing_blocks_as_usual(selector_pair) -> None:
    sel, _, b = selector_pair
    sel.spin_next()
    timer = threading.Timer(0.2, b.send, (b"x",))
    timer.start()
    start = time.monotonic()
    try:
        assert len(sel.select(5.0)) == 1  # woken by the data, not by the end of the spin
    finally:
        timer.join()
    assert time.monotonic() - start >= 0.15
    assert sel.spins == 0
    sel.spin_next()
    assert sel.select(0.01) != [] and sel.spins == 1  # data still unread: found by the spin


def test_without_a_hint_or_with_a_short_timeout_there_is_no_spin(selector_pair) -> None:
    sel, _, _ = selector_pair
    start = time.monotonic()
    assert sel.select(0) == []
    sel.spin_next()
    assert sel.select(SPIN_SECONDS / 2) == []  # a timer due sooner than a spin would end
    assert sel.spins == 0
    assert time.monotonic() - start < 1.0


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, list[int]]]:
    """A Server in a loop on a thread, on a Unix socket; yields the path and its hint count."""
    path = tmp_path / "d.qed"
    qemu_img("create", "-f", "qed", path, "16M")
    qemu_io(path, "write -P 0x61 0 4M")
    sock = str(tmp_path / "s.sock")
    hints: list[int] = []
    ready = threading.Event()
    loop = asyncio.new_event_loop()
    holder: dict[str, Server] = {}

    async def main() -> None:
        image = QedImage.open(str(path))
        server = Server(ExportSet([Export("", image)], ""), expect_soon=lambda: hints.append(1))
        holder["server"] = server
        await server.listen_unix(sock)
        ready.set()
        await server.wait_stopped()

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    assert ready.wait(10)
    try:
        yield sock, hints
    finally:
        asyncio.run_coroutine_threadsafe(holder["server"].shutdown(), loop).result(30)
        thread.join(10)
        loop.close()


def settled(hints: list[int]) -> int:
    """The hint count once the server thread is done with the last request (it hints after the
    reply has gone, so the reply can reach us first)."""
    time.sleep(0.05)
    return len(hints)


def test_the_server_hints_after_lone_small_requests_only(served) -> None:
    sock, hints = served
    with RawClient.unix(sock) as c:
        c.handshake()
        for _ in range(3):  # QD1: each request alone
            c.wait(c.send_request(Command.READ, 8192, 4096))
        assert settled(hints) == 3
        cookies = [c.new_cookie() for _ in range(16)]
        for i, cookie in enumerate(cookies):
            c.expect(cookie, Command.READ, i * 4096, 4096)
        c.send(b"".join(c.request_bytes(Command.READ, i * 4096, 4096, 0, k) for i, k in enumerate(cookies)))
        c.wait_all(cookies)  # a batch in one packet: no hint
        assert settled(hints) == 3
        c.wait(c.send_request(Command.READ, 0, 128 * 1024))  # large: no hint
        assert settled(hints) == 3
        c.wait(c.send_request(Command.WRITE, 0, payload=b"w" * 512))  # small WRITE alone: hint
        assert settled(hints) == 4
