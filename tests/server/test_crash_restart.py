"""``kill -9`` the server during allocating writes, restart it on the same image.

A client (libnbd, under Debian's ``/usr/bin/python3``) writes batches of 8 pipelined 2 KiB writes,
each into a fresh 4 KiB cluster (a partial cluster: the server fills head and tail), spread over
the image so that new L2 tables are allocated too, then flushes and prints ``ACK n``. The test
kills the server with SIGKILL at a different moment each round (right after the connection, and
a few milliseconds after the 1st, 6th, 40th and 150th acknowledged flush), then:

* before any repair, ``qemu-img check`` finds no corruption (leaks are acceptable);
* the restarted server repairs the image before it listens (or finds nothing to repair), logs it,
  and NEED_CHECK is clear while it serves;
* every write of every acknowledged batch — of this round and all earlier ones — reads back
  intact through the restarted server; a write that was not acknowledged reads either its data or
  zeros, never anything else;
* after a clean stop of the restarted server, ``qemu-img check`` is clean (exit 0).

The restarted server then takes the next round's writes, so later rounds crash an image that has
been crashed and repaired before.
"""

from __future__ import annotations

import json
import os
import random
import select
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import qemu_img, read_features, run
from serverkit import RunningServer

pytestmark = pytest.mark.interop

NBD_PYTHON = "/usr/bin/python3"  # the interpreter that has libnbd's ``nbd`` module
NEED_CHECK = 0x02
CLUSTER = 4096
IMAGE_CLUSTERS = 65536  # 256 MiB of 4 KiB clusters; table_size 2: one L2 table per 4 MiB
PER_BATCH = 8
STEP = 2053  # odd, so index -> cluster is a permutation of the image's clusters
# When to kill: after this many acknowledged flushes (0: once connected), then a random delay.
KILL_AFTER = (0, 1, 6, 40, 150)

# Shared by the writer and the verifier (both run under /usr/bin/python3).
_BLOCKS = f"""
CLUSTER, CLUSTERS, PER_BATCH, STEP = {CLUSTER}, {IMAGE_CLUSTERS}, {PER_BATCH}, {STEP}
def block(i):
    cluster = (i * STEP) % CLUSTERS
    return cluster * CLUSTER + 1024, (i + 1).to_bytes(4, "little") * 512
"""

_WRITER = (
    _BLOCKS
    + r"""
import sys, nbd
uri, first = sys.argv[1], int(sys.argv[2])
h = nbd.NBD()
h.connect_uri(uri)
print("connected", flush=True)
for batch in range(first, CLUSTERS // PER_BATCH):
    keep = []
    for i in range(batch * PER_BATCH, (batch + 1) * PER_BATCH):
        offset, data = block(i)
        keep.append((h.aio_pwrite(data, offset), data))
    while h.aio_in_flight():
        h.poll(-1)
    for cookie, _ in keep:
        h.aio_command_completed(cookie)  # raises if that write failed
    h.flush()
    print(f"ACK {batch}", flush=True)
"""
)

_VERIFIER = (
    _BLOCKS
    + r"""
import json, sys, nbd
uri = sys.argv[1]
todo = json.load(sys.stdin)
h = nbd.NBD()
h.connect_uri(uri)
wrong, unwritten = [], []
for i in todo["acked"]:
    offset, data = block(i)
    if h.pread(len(data), offset) != data:
        wrong.append(i)
for i in todo["maybe"]:
    offset, data = block(i)
    got = h.pread(len(data), offset)
    if got != data:
        if got == bytes(len(data)):
            unwritten.append(i)
        else:
            wrong.append(i)
h.shutdown()
json.dump({"wrong": wrong, "unwritten": unwritten}, sys.stdout)
"""
)


class LineReader:
    """Lines from a child's unbuffered stdout, each wait bounded."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        self.proc = proc
        self.fd = proc.stdout.fileno()
        self.buf = b""
        self.lines: list[str] = []
        self.eof = False

    def _fill(self, timeout: float) -> None:
        ready, _, _ = select.select([self.fd], [], [], max(0.0, timeout))
        if not ready:
            return
        chunk = os.read(self.fd, 65536)
        if not chunk:
            self.eof = True
            return
        self.buf += chunk
        *complete, self.buf = self.buf.split(b"\n")
        self.lines += [line.decode() for line in complete]

    def wait_for(self, predicate: Callable[[list[str]], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not predicate(self.lines):
            if self.eof or time.monotonic() > deadline:
                raise AssertionError(f"writer output so far: {self.lines[-5:]} (eof={self.eof})")
            self._fill(deadline - time.monotonic())

    def drain(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self.eof and time.monotonic() < deadline:
            self._fill(deadline - time.monotonic())


def acks(lines: list[str]) -> list[int]:
    return [int(line.split()[1]) for line in lines if line.startswith("ACK ")]


def check_report(path: Path) -> tuple[int, dict[str, int]]:
    proc = qemu_img("check", "--output=json", path, check=False)
    return proc.returncode, json.loads(proc.stdout)


@pytest.mark.slow
def test_kill_9_during_allocating_writes(nbd_server: Callable[..., RunningServer], tmp_path: Path) -> None:
    path = tmp_path / "crash.qed"
    qemu_img("create", "-q", "-f", "qed", "-o", "cluster_size=4k,table_size=2", path, "256M")
    rng = random.Random(4)
    acked: set[int] = set()  # block indices of acknowledged batches
    maybe: set[int] = set()  # written, not acknowledged (the batch the kill interrupted)
    next_batch = 0
    s = nbd_server(path)
    summary = []
    for round_no, kill_after in enumerate(KILL_AFTER):
        writer = subprocess.Popen(
            [NBD_PYTHON, "-c", _WRITER, s.uri(), str(next_batch)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0,
        )  # fmt: skip
        reader = LineReader(writer)
        try:
            if kill_after == 0:
                reader.wait_for(lambda lines: "connected" in lines, timeout=20)
            else:
                reader.wait_for(lambda lines, n=kill_after: len(acks(lines)) >= n, timeout=60)
            time.sleep(rng.uniform(0, 0.015))
            os.kill(s.pid, signal.SIGKILL)
            assert s.proc.wait(10) == -signal.SIGKILL
            reader.drain(timeout=10)
            writer.wait(10)
        finally:
            if writer.poll() is None:
                writer.kill()
                writer.wait()
        assert writer.returncode != 0, "the writer finished although its server was killed"
        round_acks = acks(reader.lines)
        assert len(round_acks) >= kill_after
        assert round_acks == list(range(next_batch, next_batch + len(round_acks)))
        for batch in round_acks:
            acked.update(range(batch * PER_BATCH, (batch + 1) * PER_BATCH))
        last = next_batch + len(round_acks)  # the batch in progress when the server died
        interrupted = set(range(last * PER_BATCH, (last + 1) * PER_BATCH))
        maybe |= interrupted
        next_batch = last + 1

        # Before any repair: leaks are acceptable, corruption is not.
        dirty = bool(read_features(path) & NEED_CHECK)
        code, report = check_report(path)
        assert code in (0, 3), report
        assert report.get("corruptions", 0) == 0 and report.get("check-errors", 0) == 0, report
        leaks_before = report.get("leaks", 0)

        # Restart: repair (or nothing to repair) before listening, then every acked write is there.
        s = nbd_server(path)
        log = s.log()
        if dirty:
            assert "was not closed cleanly" in log, log
            assert log.index("was not closed cleanly") < log.index("listening on")
        assert "Traceback" not in log, log
        assert not read_features(path) & NEED_CHECK, "dirty bit still set after the restart's repair"
        todo = json.dumps({"acked": sorted(acked), "maybe": sorted(maybe)})
        out = run([NBD_PYTHON, "-c", _VERIFIER, s.uri()], input=todo, timeout=60).stdout
        result = json.loads(out)
        assert not result["wrong"], f"round {round_no}: blocks wrong after restart: {result['wrong'][:10]}"
        # What did not make it is gone for good: later rounds must not see it appear.
        maybe -= set(result["unwritten"])
        acked |= maybe & interrupted  # written after all: from now on it must stay
        maybe -= interrupted

        # After the restart's repair the image is clean, also for qemu-img.
        assert s.stop() == 0, s.log()
        code, report = check_report(path)
        assert code == 0, f"round {round_no}: qemu-img check after repair: {report}"
        summary.append(f"round {round_no}: {len(round_acks)} acked, dirty={dirty}, leaks={leaks_before}")
        s = nbd_server(path)
    assert s.stop() == 0
    assert not read_features(path) & NEED_CHECK
    print("\n".join(summary))


def test_restart_on_the_same_unix_socket_after_kill_9(
    nbd_server: Callable[..., RunningServer], tmp_path: Path
) -> None:
    """A server killed with SIGKILL leaves its socket file; the next one on the same path
    replaces it and serves."""
    path = tmp_path / "crash.qed"
    qemu_img("create", "-q", "-f", "qed", path, "8M")
    sock = tmp_path / "same.sock"
    s = nbd_server("-k", sock, path)  # -k wins over the fixture's TCP flags
    assert s.base_uri == f"nbd+unix:///?socket={sock}"
    os.kill(s.pid, signal.SIGKILL)
    s.proc.wait(10)
    assert sock.is_socket()  # the stale socket stays
    s = nbd_server("-k", sock, path)
    out = run(["nbdinfo", "--size", s.uri()], timeout=30).stdout
    assert out.strip() == str(8 << 20)
    assert s.stop() == 0
    assert not sock.exists()
