"""`qednbd check` shows progress on a terminal, and only there."""

from __future__ import annotations

import os
import pty
import subprocess
import sys
from pathlib import Path

from helpers import REPO_ROOT

from qednbd.qed.image import QedImage, create_image

L2_SPAN = 2 << 30  # guest bytes under one L2 table at 64 KiB clusters, table_size 4


def _image_with_many_tables(path: Path, n_tables: int) -> None:
    create_image(str(path), n_tables * L2_SPAN)
    with QedImage.open(str(path)) as image:
        for i in range(n_tables):
            image.write(i * L2_SPAN, b"\x01" * 4096)


def _check(path: Path, stderr: int) -> tuple[int, bytes, bytes]:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.run(
        [sys.executable, "-m", "qednbd", "check", str(path)],
        stdout=subprocess.PIPE,
        stderr=stderr,
        env=env,
        timeout=60,
        check=False,
    )
    return proc.returncode, proc.stdout, proc.stderr or b""


def test_progress_on_a_terminal(tmp_path: Path) -> None:
    path = tmp_path / "big.qed"
    _image_with_many_tables(path, 256)
    controller, terminal = pty.openpty()
    try:
        rc, stdout, _ = _check(path, terminal)
        os.close(terminal)
        seen = b""
        while True:
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # EIO once the other side is closed and drained
                break
            if not chunk:
                break
            seen += chunk
    finally:
        os.close(controller)
    assert rc == 0
    assert b"No errors were found on the image." in stdout
    assert b"/100%)" in seen and b"(0.00/100%)" in seen
    assert seen.endswith(b"\r\x1b[K"), "the progress line is not erased at the end"


def test_no_progress_when_not_a_terminal(tmp_path: Path) -> None:
    path = tmp_path / "big.qed"
    _image_with_many_tables(path, 128)
    rc, stdout, stderr = _check(path, subprocess.PIPE)
    assert rc == 0
    assert b"No errors were found on the image." in stdout
    assert stderr == b""
