"""deploy/healthcheck.py, the container's and the pod's NBD health check, against real servers
and against things that are not NBD servers."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from deploykit import DEPLOY
from helpers import qemu_img
from tlskit import make_pki

HEALTHCHECK = DEPLOY / "healthcheck.py"


def healthcheck(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(HEALTHCHECK), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@contextmanager
def fake_server(reply: bytes | None) -> Iterator[int]:
    """A TCP listener on 127.0.0.1 that sends ``reply`` to each client (None: says nothing)."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stop = threading.Event()
    held: list[socket.socket] = []

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            held.append(conn)
            if reply is not None:
                conn.sendall(reply)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join(5)
        for conn in held:
            conn.close()
        listener.close()


def test_healthy_over_tcp_and_unix(nbd_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    img = tmp_path / "disk.qed"
    qemu_img("create", "-f", "qed", img, "16M")
    tcp = nbd_server(img, "-r")
    r = healthcheck("--port", str(tcp.port))
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    unix = nbd_server(img, "-r", unix=True)
    r = healthcheck("--unix", unix.socket_path)
    assert r.returncode == 0, r.stderr
    # Both servers are still serving after the check's NBD_OPT_ABORT.
    assert tcp.alive() and unix.alive()


def test_healthy_when_tls_is_required(nbd_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """NBD_OPT_ABORT is allowed before STARTTLS, so the check works with tls = "require"."""
    img = tmp_path / "disk.qed"
    qemu_img("create", "-f", "qed", img, "16M")
    pki = make_pki(tmp_path / "pki")
    server = nbd_server(img, "--tls-creds", pki.server, "--tls", "require")
    r = healthcheck("--port", str(server.port))
    assert r.returncode == 0, r.stderr + server.log()


def test_unhealthy_when_nothing_listens() -> None:
    with socket.socket() as s:  # a port that was free a moment ago
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = healthcheck("--port", str(port), "--timeout", "2")
    assert r.returncode == 1
    assert "unhealthy: cannot connect" in r.stderr


@pytest.mark.parametrize(
    ("greeting", "reason"),
    [
        (b"HTTP/1.1 400 Bad Request\r\n\r\n", "not an NBD newstyle greeting"),
        (b"NBDMAGIC", "timed out after 8 of 18 bytes"),  # cut short
        (None, "timed out"),  # silent
    ],
    ids=["not-nbd", "cut-short", "silent"],
)
def test_unhealthy_peers(greeting: bytes | None, reason: str) -> None:
    with fake_server(greeting) as port:
        started = time.monotonic()
        r = healthcheck("--port", str(port), "--timeout", "1")
        elapsed = time.monotonic() - started
    assert r.returncode == 1
    assert reason in r.stderr
    assert elapsed < 10, elapsed


def test_healthcheck_script_is_lint_and_type_clean() -> None:
    """deploy/ is outside the directories scripts/test.sh lints; its Python is checked here."""
    scripts = sorted(str(p) for p in DEPLOY.rglob("*.py"))
    assert str(HEALTHCHECK) in scripts
    for cmd in (
        [sys.executable, "-m", "ruff", "check", *scripts],
        [sys.executable, "-m", "ruff", "format", "--check", *scripts],
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", *scripts],
    ):
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
        assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stdout}{r.stderr}"
