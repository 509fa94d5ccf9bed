"""Images with known content, and the check every raw-protocol test ends with: the server is alive
and a fresh client reads the right data."""

from __future__ import annotations

from pathlib import Path

from helpers import qemu_img, qemu_io
from serverkit import RunningServer

from server.rawclient import RawClient

# The first 1 MiB of every test image: sixteen 64 KiB runs of 0x01, 0x02, … 0x10, so a read that
# lands in the wrong place (or a write that was applied when it must not be) does not match.
KNOWN_RUN = 64 * 1024
KNOWN = b"".join(bytes([i + 1]) * KNOWN_RUN for i in range(16))


def make_image(tmp_path: Path, size: str = "64M", name: str = "disk.qed") -> Path:
    """A fresh QED image of ``size`` with :data:`KNOWN` at offset 0 and nothing else allocated."""
    path = tmp_path / name
    qemu_img("create", "-q", "-f", "qed", path, size)
    writes = [f"write -P {i + 1} {i * KNOWN_RUN} {KNOWN_RUN}" for i in range(16)]
    out = qemu_io(path, *writes)
    assert "failed" not in out.stdout + out.stderr, out.stdout + out.stderr
    return path


def assert_healthy(server: RunningServer, name: str = "", *, simple_too: bool = True) -> None:
    """The server process is alive, logged no internal error, and a fresh client (structured
    replies, and optionally a second one with simple replies) reads :data:`KNOWN` intact."""
    assert server.alive(), f"server died:\n{server.log()}"
    modes = (True, False) if simple_too else (True,)
    for structured in modes:
        with RawClient.to(server.uri()) as client:
            client.handshake(name, structured=structured)
            assert client.read_ok(0, len(KNOWN)) == KNOWN
            client.disconnect()
            client.wait_closed()
    log = server.log()
    assert "Traceback" not in log and "internal error" not in log, log
