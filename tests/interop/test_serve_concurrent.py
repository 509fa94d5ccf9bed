"""No data lost when several connections allocate at once: four writer processes (libnbd, one
connection each, every request of a writer in flight together) start on a shared signal and
write different 512-byte sectors of the same unallocated clusters, different fresh clusters
under the same new L2 table, and the sectors of one single cluster. Afterwards every write is
there — read back over NBD, and from the stopped image with qemu-io and qemu-img."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from helpers import qemu_img, qemu_io

pytestmark = pytest.mark.interop

K, M = 1 << 10, 1 << 20
SIZE = 64 * M
WRITERS = 4

# One writer: connect, wait for the go file, send every write at once (aio), wait, flush.
WRITER = """
import json, os, sys, time
import nbd
uri, plan_path, go = sys.argv[1:4]
with open(plan_path) as f:
    plan = json.load(f)
h = nbd.NBD()
h.connect_uri(uri)
deadline = time.monotonic() + 30
while not os.path.exists(go):
    assert time.monotonic() < deadline, "no go signal"
    time.sleep(0.001)
cookies = [h.aio_pwrite(bytes([value]) * length, offset) for offset, length, value in plan]
while h.aio_in_flight() > 0:
    h.poll(-1)
for cookie in cookies:
    assert h.aio_command_completed(cookie)
h.flush()
h.shutdown()
print("ok", len(cookies))
"""

Write = tuple[int, int, int]  # offset, length, byte value


def plans() -> list[list[Write]]:
    """Per writer, in the order it sends them. Values are distinct per (writer, region, place)."""
    out: list[list[Write]] = [[] for _ in range(WRITERS)]
    for i in range(WRITERS):
        # One cluster, every writer on every fourth sector of it: all race for one allocation.
        out[i] += [(48 * M + s * 512, 512, 0xC0 + i) for s in range(i, 128, WRITERS)]
        # 16 fresh clusters 1 MiB apart; each writer fills its own sectors of each.
        for c in range(16):
            out[i] += [(c * M + s * 512, 512, 1 + i * 16 + c) for s in range(i, 32, WRITERS)]
        # Different fresh 64 KiB clusters next to each other (one new L2 table for all of them).
        out[i] += [(32 * M + (j * WRITERS + i) * 64 * K, 64 * K, 0x80 + i * 8 + j) for j in range(8)]
    return out


def expected_image(all_plans: list[list[Write]]) -> bytearray:
    image = bytearray(SIZE)
    for plan in all_plans:
        for offset, length, value in plan:
            image[offset : offset + length] = bytes([value]) * length
    return image


def first_difference(got: bytes, want: bytes) -> str:
    if len(got) != len(want):
        return f"length {len(got)} != {len(want)}"
    for start in range(0, len(want), 512):
        if got[start : start + 512] != want[start : start + 512]:
            return (
                f"sector at {start}: got {got[start : start + 8].hex()}, want {want[start : start + 8].hex()}"
            )
    return "identical"


@pytest.mark.parametrize(
    "geometry",
    [
        pytest.param([], id="64K-clusters"),
        # 4 KiB clusters, two-cluster tables: an L2 table covers 4 MiB, so many writes allocate one
        # (table_size=1 would be smaller, but QEMU cannot open such images: its table-offset check
        # treats offset + (1 - 1) * cluster_size == offset as an overflow).
        pytest.param(["-o", "cluster_size=4096,table_size=2"], id="4K-clusters-small-L2"),
    ],
)
def test_concurrent_allocating_writes(tmp_path: Path, nbd_server, geometry: list[str]) -> None:  # type: ignore[no-untyped-def]
    image = tmp_path / "disk.qed"
    qemu_img("create", "-f", "qed", *geometry, image, str(SIZE))
    server = nbd_server(image)
    uri = server.uri("disk.qed")

    all_plans = plans()
    go = tmp_path / "go"
    writers = []
    for i, plan in enumerate(all_plans):
        plan_path = tmp_path / f"plan{i}.json"
        plan_path.write_text(json.dumps(plan))
        writers.append(
            subprocess.Popen(
                ["/usr/bin/python3", "-c", WRITER, uri, os.fspath(plan_path), os.fspath(go)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    try:
        time.sleep(0.3)  # let them connect; they poll for the go file
        go.touch()
        results = [w.communicate(timeout=60) for w in writers]
    finally:
        for w in writers:
            if w.poll() is None:
                w.kill()
                w.wait(10)
    for w, (out, err) in zip(writers, results, strict=True):
        assert w.returncode == 0 and out.startswith("ok"), f"writer failed: {out}{err}\n{server.log()}"

    want = expected_image(all_plans)
    proc = subprocess.run(["nbdcopy", uri, "-"], capture_output=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == want, "over NBD: " + first_difference(proc.stdout, want)

    assert server.stop() == 0
    commands = [f"read -P {value} {offset} {length}" for plan in all_plans for offset, length, value in plan]
    out = qemu_io(image, *commands)
    text = out.stdout + out.stderr
    assert "fail" not in text.lower(), text[:4000]
    assert text.count("read ") == len(commands)
    flat = tmp_path / "flat.raw"
    qemu_img("convert", "-f", "qed", "-O", "raw", image, flat)
    got = flat.read_bytes()
    assert got == want, "in the image: " + first_difference(got, want)
    check = qemu_img("check", "-f", "qed", image)
    assert "No errors were found" in check.stdout, check.stdout
