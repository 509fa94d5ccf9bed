"""Session-wide checks. Shared helpers live in ``helpers.py`` (``from helpers import run``)."""

from __future__ import annotations

import contextlib
import shutil

import pytest

REQUIRED_TOOLS = ("qemu-img", "qemu-io")  # both from Debian's qemu-utils


@pytest.fixture(scope="session", autouse=True)
def _qemu_tools_present() -> None:
    """Fail every test, loudly, when the QEMU tools are missing: nothing is skipped silently."""
    missing = [tool for tool in REQUIRED_TOOLS if shutil.which(tool) is None]
    if missing:
        pytest.fail(
            f"{', '.join(missing)} not found on PATH: run scripts/test.sh, which installs qemu-utils",
            pytrace=False,
        )


@pytest.fixture
def nbd_server(tmp_path):  # type: ignore[no-untyped-def]
    """Factory: ``nbd_server(*serve_args, unix=False)`` starts ``qednbd serve`` and waits until it
    listens (TCP on 127.0.0.1 and an ephemeral port, or a Unix socket in tmp_path). Every server
    started is stopped at teardown (SIGTERM, then SIGKILL)."""
    import itertools
    import signal as _signal

    from serverkit import RunningServer, spawn_server, wait_listening

    started: list[RunningServer] = []
    counter = itertools.count()

    def start(
        *args: object,
        unix: bool = False,
        wait: bool = True,
        env: dict[str, str] | None = None,
        pass_fds: tuple[int, ...] = (),
    ) -> RunningServer:
        n = next(counter)
        where: list[object] = ["-k", tmp_path / f"nbd{n}.sock"] if unix else ["-b", "127.0.0.1", "-p", "0"]
        server = spawn_server(
            *where,
            *args,
            log_path=tmp_path / f"server{n}.log",
            env=env,  # type: ignore[arg-type]
            pass_fds=pass_fds,
        )
        started.append(server)
        return wait_listening(server) if wait else server

    yield start
    for server in started:
        if server.alive():
            with contextlib.suppress(AssertionError):
                server.stop(_signal.SIGTERM, timeout=20)
