"""``fio --ioengine=nbd`` (fio 3.33, libnbd) against ``qednbd serve``: several verifying writer jobs
at once, each on its own range of one fresh image (one connection each), then a mixed random
job; the data is verified again after a server restart and ``qemu-img check`` is clean.

fio's nbd engine needs the export in its URI (``nbd://HOST:PORT/NAME``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import qemu_img, run

pytestmark = [pytest.mark.interop, pytest.mark.slow]

M = 1 << 20


def fio(uri: str, cwd: Path, *options: str) -> list[dict[str, object]]:
    """Run one fio job description in ``cwd`` (fio leaves its verify state files there); fail on
    a non-zero exit or any job error. Returns the jobs."""
    proc = run(
        ["fio", "--ioengine=nbd", f"--uri={uri}", "--output-format=json", *options],
        check=False,
        timeout=120,
        cwd=cwd,
    )
    assert proc.returncode == 0, f"fio failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr}"
    jobs = json.loads(proc.stdout[proc.stdout.index("{") :])["jobs"]
    assert all(job["error"] == 0 for job in jobs), [(job["jobname"], job["error"]) for job in jobs]
    return jobs


def check_clean(path: Path) -> None:
    out = qemu_img("check", "-f", "qed", path)
    assert "No errors were found" in out.stdout, out.stdout


# Four jobs at once, one connection each; job i writes [4M*i, 4M*(i+1)) in random order,
# 4 KiB blocks, 8 in flight, each block with a crc32c header, then reads everything back.
VERIFY_JOB = (
    "--name=verify",
    "--rw=randwrite",
    "--bs=4k",
    "--size=4M",
    "--numjobs=4",
    "--offset_increment=4M",
    "--iodepth=8",
    "--verify=crc32c",
    "--do_verify=1",
    "--verify_fatal=1",
)


def test_fio_verify_jobs_and_randrw(tmp_path: Path, nbd_server) -> None:  # type: ignore[no-untyped-def]
    image = tmp_path / "disk.qed"
    qemu_img("create", "-f", "qed", image, str(64 * M))
    server = nbd_server(image)
    uri = server.uri("disk.qed")

    jobs = fio(uri, tmp_path, *VERIFY_JOB)
    assert len(jobs) == 4
    assert all(job["write"]["io_bytes"] == 4 * M for job in jobs), [job["write"]["io_bytes"] for job in jobs]
    assert all(job["read"]["io_bytes"] == 4 * M for job in jobs)  # the verify pass

    # A mixed job beside it, two connections, in a range of its own.
    jobs = fio(
        uri,
        tmp_path,
        "--name=mixed",
        "--rw=randrw",
        "--bs=4k",
        "--offset=32M",
        "--size=16M",
        "--numjobs=2",
        "--iodepth=16",
        "--runtime=3",
        "--time_based",
    )
    assert all(job["read"]["io_bytes"] > 0 and job["write"]["io_bytes"] > 0 for job in jobs)

    assert server.stop() == 0
    check_clean(image)

    # After a restart the verify jobs' data is still there (same seeds: same blocks and headers).
    server = nbd_server(image)
    jobs = fio(server.uri("disk.qed"), tmp_path, *VERIFY_JOB, "--verify_only")
    assert all(job["read"]["io_bytes"] == 4 * M for job in jobs)
    assert server.stop() == 0
    check_clean(image)
