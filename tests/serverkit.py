"""Start and stop a real ``qednbd serve`` for tests: ephemeral port or Unix socket, bounded waits.

``start_server`` returns once the server has logged that it listens (or fails with its log);
:meth:`RunningServer.stop` sends a signal and waits. Use the ``nbd_server`` fixture from
``tests/conftest.py``: it stops every server a test started, whatever happened.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from helpers import REPO_ROOT, StrPath

START_TIMEOUT = 30.0  # seconds; opening includes a repair of a dirty image
_LISTEN_RE = re.compile(r"listening on ([^\s\"]+)")  # text or JSON log lines


class RunningServer:
    def __init__(self, proc: subprocess.Popen[bytes], log_path: Path) -> None:
        self.proc = proc
        self.log_path = log_path
        self.uris: list[str] = []

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    @property
    def base_uri(self) -> str:
        """``nbd://127.0.0.1:PORT`` or ``nbd+unix:///?socket=PATH`` (the default export)."""
        return self.uris[0]

    def uri(self, export: str = "") -> str:
        """The URI of an export (``""``: the default export)."""
        base = self.base_uri
        if base.startswith("nbd+unix:"):
            return base.replace(":///", f":///{export}", 1)
        return f"{base}/{export}" if export else base

    @property
    def port(self) -> int:
        match = re.search(r":(\d+)$", self.base_uri)
        assert match, self.base_uri
        return int(match.group(1))

    @property
    def socket_path(self) -> str:
        return self.base_uri.split("socket=", 1)[1]

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Signal the server and wait for it; returns its exit status (killed after ``timeout``)."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
                raise AssertionError(f"server did not stop within {timeout} s:\n{self.log()}") from None
        return self.proc.returncode


def server_command(*args: StrPath | int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "qednbd",
        "serve",
        *(os.fspath(a) if not isinstance(a, int) else str(a) for a in args),
    ]


def spawn_server(
    *args: StrPath | int,
    log_path: Path,
    env: dict[str, str] | None = None,
    pass_fds: tuple[int, ...] = (),
) -> RunningServer:
    """Start ``qednbd serve ARGS`` without waiting for it."""
    full_env = dict(os.environ if env is None else env)
    full_env["PYTHONPATH"] = os.fspath(REPO_ROOT) + os.pathsep + full_env.get("PYTHONPATH", "")
    log_file = open(log_path, "wb")  # noqa: SIM115 - handed to the child, closed below
    try:
        proc = subprocess.Popen(
            server_command(*args),
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=full_env,
            pass_fds=pass_fds,
        )
    finally:
        log_file.close()
    return RunningServer(proc, log_path)


def wait_listening(server: RunningServer, timeout: float = START_TIMEOUT) -> RunningServer:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = server.log()
        uris = _LISTEN_RE.findall(text)
        if uris and "export " in text.split(uris[-1], 1)[1]:
            server.uris = uris
            return server
        if server.proc.poll() is not None:
            raise AssertionError(f"server exited with {server.proc.returncode} before listening:\n{text}")
        time.sleep(0.02)
    server.stop(signal.SIGKILL)
    raise AssertionError(f"server not listening after {timeout} s:\n{server.log()}")
