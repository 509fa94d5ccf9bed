"""The README's first command: ``bash scripts/run.sh`` sets up, creates a demo image, and serves it."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from helpers import REPO_ROOT, qemu_img, run


@pytest.mark.interop
def test_run_script_creates_and_serves_an_image(tmp_path: Path) -> None:
    image = tmp_path / "demo.qed"
    log_path = tmp_path / "run.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            ["bash", "scripts/run.sh", os.fspath(image), "-p", "0"],
            cwd=REPO_ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        deadline = time.monotonic() + 120  # pip install -e . into an existing .venv
        port = None
        while time.monotonic() < deadline and proc.poll() is None:
            match = re.search(r"listening on nbd://127\.0\.0\.1:(\d+)", log_path.read_text())
            if match and "export " in log_path.read_text():
                port = int(match.group(1))
                break
            time.sleep(0.1)
        assert port is not None, log_path.read_text()
        info = run(["nbdinfo", "--size", f"nbd://127.0.0.1:{port}"]).stdout
        assert int(info) == 1 << 30
        run(["qemu-io", "-f", "raw", "-c", "write -P 0x5a 0 64k", f"nbd://127.0.0.1:{port}"])
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        rc = proc.wait(30)
    assert rc == 0, log_path.read_text()
    assert "No errors were found" in qemu_img("check", image).stdout
    readback = run(["qemu-io", "-f", "qed", "-c", "read -P 0x5a 0 64k", os.fspath(image)]).stdout
    assert "verification failed" not in readback
