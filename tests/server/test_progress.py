"""Long work reports progress: the server's start-up repair in the log (a line when it starts,
then one every PROGRESS_LOG_SECONDS), and `qednbd check -r` on a terminal (a line that is erased
when done; `check` alone and `convert -p` have their own tests)."""

from __future__ import annotations

import logging
import os
import pty
import select
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO_ROOT, qemu_img, qemu_io

from qednbd import config as cfg
from qednbd import serve
from qednbd.serve import LogProgress
from server.test_lifecycle import set_need_check

pytestmark = pytest.mark.interop


def test_log_progress_is_throttled(caplog: pytest.LogCaptureFixture) -> None:
    now = [100.0]
    progress = LogProgress("disk.qed", every=2.0, clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="qednbd.serve"):
        calls = [(0.0, 100.0), (0.1, 101.5), (0.3, 102.1), (0.35, 103.0), (0.9, 104.2), (1.0, 110)]
        for fraction, at in calls:
            now[0] = at
            progress(fraction)
    assert [r.getMessage() for r in caplog.records] == [
        "disk.qed was not closed cleanly: check and repair 30% done",
        "disk.qed was not closed cleanly: check and repair 90% done",
    ]


def test_server_start_up_repair_reports_progress(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    image = tmp_path / "disk.qed"
    qemu_img("create", "-f", "qed", image, "64M")
    qemu_io(image, "write -P 1 0 1M")
    set_need_check(image)
    monkeypatch.setattr(serve, "PROGRESS_LOG_SECONDS", 0.0)  # every report, however quick
    conf = cfg.build(cfg.CommandLine(files=[str(image)]))
    with caplog.at_level(logging.INFO):
        serve.open_exports(conf).close()
    messages = [r.getMessage() for r in caplog.records]
    assert any("check and repair" in m and "% done" in m for m in messages), messages
    assert any("the check found nothing to repair" in m for m in messages), messages


def run_on_terminal(*args: str, timeout: float = 60) -> tuple[int, str]:
    """Run ``python -m qednbd ARGS`` with stderr (and stdout) on a pseudo-terminal."""
    controller, terminal = pty.openpty()
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "qednbd", *args], stdout=terminal, stderr=terminal, env=env, cwd=REPO_ROOT
    )
    os.close(terminal)
    out = b""
    try:
        while True:
            ready, _, _ = select.select([controller], [], [], timeout)
            if not ready:
                raise TimeoutError(out.decode(errors="replace"))
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            out += chunk
        return proc.wait(timeout), out.decode(errors="replace")
    finally:
        os.close(controller)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_repair_shows_progress_on_a_terminal(tmp_path: Path) -> None:
    """(`qednbd check` alone: tests/interop/test_check_progress.py.)"""
    image = tmp_path / "disk.qed"
    qemu_img("create", "-f", "qed", image, "1G")
    qemu_io(image, "write -P 1 0 1M", "write -P 2 512M 1M")
    set_need_check(image)
    code, out = run_on_terminal("check", "-r", "all", str(image))
    assert code == 0 and "(0.00/100%)" in out and "(55.00/100%)" in out and "\x1b[K" in out, out
