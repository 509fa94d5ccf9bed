"""deploy/systemd/: the unit pair passes ``systemd-analyze verify`` (and its offline security
review), the sysusers file is valid, and qednbd really starts through socket activation
(``systemd-socket-activate``, which passes the listening socket as fd 3 with LISTEN_FDS/LISTEN_PID,
as systemd does) and serves clients on the socket it was given.

systemd is not PID 1 in this container, so the units are verified offline against a scratch root
(``--root``) that holds them, the distribution's units and a stand-in for ExecStart's program.
"""

from __future__ import annotations

import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from deploykit import DEPLOY, free_tcp_port, tool
from helpers import REPO_ROOT, qemu_img, qemu_io

UNITS = DEPLOY / "systemd"
SYSTEM_UNITS = Path("/usr/lib/systemd/system")
START_TIMEOUT = 30.0  # seconds, for the activator and then for qednbd to answer


def unit_settings(path: Path) -> dict[str, list[str]]:
    """``Section.Key`` -> values, in order (unit files may repeat a key)."""
    settings: dict[str, list[str]] = {}
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        settings.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return settings


def exec_start() -> list[str]:
    (line,) = unit_settings(UNITS / "qednbd.service")["Service.ExecStart"]
    return shlex.split(line)


def scratch_root(tmp_path: Path, with_program: bool = True) -> Path:
    """A root directory for ``systemd-analyze --root``: our units, the system's, ExecStart's program."""
    root = tmp_path / "root"
    units = root / "etc/systemd/system"
    units.mkdir(parents=True)
    for name in ("qednbd.service", "qednbd.socket"):
        shutil.copy(UNITS / name, units / name)
    shutil.copytree(SYSTEM_UNITS, root / SYSTEM_UNITS.relative_to("/"), symlinks=True)
    if with_program:
        program = root / exec_start()[0].lstrip("/")
        program.parent.mkdir(parents=True)
        program.write_text("#!/bin/sh\nexit 0\n")
        program.chmod(0o755)
    return root


def analyze(*args: str | Path) -> subprocess.CompletedProcess[str]:
    cmd = [tool("systemd-analyze"), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)


def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    root = scratch_root(tmp_path)
    units = [root / "etc/systemd/system" / name for name in ("qednbd.socket", "qednbd.service")]
    r = analyze("verify", f"--root={root}", *units)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout + r.stderr == ""  # not even a warning (unknown keys are only warnings)


def test_verify_has_teeth(tmp_path: Path) -> None:
    """Without the program ExecStart names, or with a misspelt key, verify complains."""
    root = scratch_root(tmp_path, with_program=False)
    service = root / "etc/systemd/system/qednbd.service"
    r = analyze("verify", f"--root={root}", service)
    assert r.returncode != 0
    assert "is not executable" in r.stderr
    service.write_text(service.read_text().replace("TimeoutStopSec=", "TimeoutStopSecs="))
    r = analyze("verify", f"--root={root}", service)
    assert "Unknown key 'TimeoutStopSecs'" in r.stderr


def test_service_sandbox_exposure_is_low(tmp_path: Path) -> None:
    """systemd's own review of the sandboxing: exposure 2.0 or lower ("OK" is below 4.0)."""
    root = scratch_root(tmp_path)
    r = analyze(
        "security",
        "--offline=true",
        "--threshold=20",
        f"--root={root}",
        root / "etc/systemd/system/qednbd.service",
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr


def test_sysusers_file_is_valid(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    cmd = [tool("systemd-sysusers"), "--dry-run", f"--root={root}", str(UNITS / "qednbd.sysusers")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    assert "Creating user 'qednbd'" in r.stdout + r.stderr


def test_units_agree_with_each_other_and_the_image() -> None:
    socket_unit = unit_settings(UNITS / "qednbd.socket")
    service = unit_settings(UNITS / "qednbd.service")
    assert socket_unit["Socket.ListenStream"] == ["10809"]
    assert socket_unit["Socket.Service"] == ["qednbd.service"]
    assert service["Unit.Requires"] == ["qednbd.socket"]
    assert service["Service.StateDirectory"] == ["qednbd"]  # /var/lib/qednbd, as in the image
    assert exec_start()[1:] == ["serve", "--config", "/etc/qednbd/qednbd.toml"]  # the image's entry point
    assert service["Service.KillSignal"] == ["SIGTERM"]


def activated_server(listen: str, config: Path, log: Path) -> subprocess.Popen[bytes]:
    """``systemd-socket-activate -l LISTEN`` + the unit's ExecStart (this checkout's qednbd, and a
    test config instead of /etc/qednbd/qednbd.toml)."""
    argv = exec_start()
    argv[argv.index("--config") + 1] = str(config)
    command = [sys.executable, "-m", "qednbd", *argv[1:]]
    with open(log, "wb") as out:
        return subprocess.Popen(
            [tool("systemd-socket-activate"), "-l", listen, "-E", f"PYTHONPATH={REPO_ROOT}", *command],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def wait_for(log: Path, text: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if text in log.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            break
        time.sleep(0.02)
    raise AssertionError(f"no {text!r} (exit {proc.poll()}):\n{log.read_text(errors='replace')}")


def stop(proc: subprocess.Popen[bytes], log: Path) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
            raise AssertionError(f"not stopped 30 s after SIGTERM:\n{log.read_text()}") from None
    return proc.returncode


@pytest.mark.parametrize("family", ["tcp", "unix"])
def test_socket_activation(family: str, tmp_path: Path) -> None:
    img = tmp_path / "disk.qed"
    qemu_img("create", "-f", "qed", img, "32M")
    config = tmp_path / "qednbd.toml"
    # bind/port name another address on purpose: with an inherited socket they must be ignored.
    config.write_text('bind = "127.0.0.1"\nport = 1\n\n[exports.disk]\nfile = "disk.qed"\n')
    log = tmp_path / "activate.log"
    proc: subprocess.Popen[bytes] | None = None
    try:
        if family == "tcp":
            for _attempt in range(3):  # the free port may be taken between the probe and the bind
                port = free_tcp_port()
                proc = activated_server(f"127.0.0.1:{port}", config, log)
                time.sleep(0.1)
                if proc.poll() is None or "Address already in use" not in log.read_text():
                    break
            uri, listen = f"nbd://127.0.0.1:{port}", f"127.0.0.1:{port}"
        else:
            sock = tmp_path / "nbd.sock"
            proc = activated_server(str(sock), config, log)
            uri, listen = f"nbd+unix:///?socket={sock}", str(sock)
        assert proc is not None
        wait_for(log, f"Listening on {listen} as 3.", proc)
        assert "qednbd:" not in log.read_text()  # nothing started before the first client

        r = subprocess.run(
            ["nbdinfo", "--size", uri], capture_output=True, text=True, timeout=START_TIMEOUT, check=False
        )
        assert r.returncode == 0, r.stderr + log.read_text()
        assert int(r.stdout) == 32 << 20
        text = log.read_text()
        assert f"Execing {sys.executable}" in text, text  # the activator became qednbd: same pid
        expected = f"listening on nbd://127.0.0.1:{port}" if family == "tcp" else "listening on nbd+unix"
        assert expected in text, text

        # More clients on the same inherited socket: write, then read back.
        w = qemu_io(uri, "write -P 0x5a 1M 3M", fmt="raw", check=False)
        assert w.returncode == 0 and "wrote 3145728/3145728" in w.stdout, w.stdout + w.stderr
        rd = qemu_io(uri, "read -P 0x5a 1M 3M", fmt="raw", check=False)
        assert "read 3145728/3145728" in rd.stdout and "Pattern verification failed" not in rd.stdout, (
            rd.stdout
        )
        assert stop(proc, log) == 0, log.read_text()
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert "Pattern verification failed" not in qemu_io(img, "read -P 0x5a 1M 3M").stdout
    check = qemu_img("check", img)
    assert "No errors were found" in check.stdout
