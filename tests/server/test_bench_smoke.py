"""bench/serve_bench.py still runs: every row against both servers, a table with ratios, a verdict per
target. Tiny sizes and short runs (about 30 s); the figures themselves are not checked."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO_ROOT

pytestmark = [pytest.mark.slow, pytest.mark.interop]

NUMBER = r"[\d,]+(?:\.\d+)?"
ROW = re.compile(
    rf"^\| (?P<title>[^|]+) \| (?P<unit>[^|]+) \| (?P<ours>{NUMBER}) \| (?P<theirs>{NUMBER}) \| "
    rf"(?P<ratio>\d+\.\d\d)×(?: ✓)? \| (?:higher|lower) \| "
    rf"(?P<cpu_gib>[^|]+) \| (?P<cpu_req>[^|]+) \| [^|]+ \|$"
)


def test_serve_bench_quick_run_prints_the_table(tmp_path: Path) -> None:
    listing = subprocess.run(
        [sys.executable, "bench/serve_bench.py", "--list"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    keys = [line.split()[0] for line in listing.splitlines() if line.strip()]
    assert len(keys) == 15, listing

    samples = tmp_path / "samples.json"
    proc = subprocess.run(
        [
            sys.executable,
            "bench/serve_bench.py",
            "--quick",
            "--size-mib=16",
            "--runtime=0.3",
            "--handshakes=10",
            "--sparse-tables=8",
            "--cold=fadvise",  # not drop_caches: leave the rest of the machine's page cache alone
            f"--dir={tmp_path / 'work'}",
            f"--json={samples}",
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr[-4000:]}"
    out = proc.stdout
    assert "| workload | unit | qednbd | qemu-nbd | qednbd / qemu-nbd |" in out, out

    rows = [m for m in (ROW.match(line) for line in out.splitlines()) if m]
    assert len(rows) == len(keys), out
    for row in rows:
        ours, theirs = (float(row[k].replace(",", "")) for k in ("ours", "theirs"))
        assert ours > 0 and theirs > 0, row.group(0)
        assert float(row["ratio"]) == pytest.approx(ours / theirs, rel=0.25, abs=0.01), row.group(0)
    by_title = {row["title"]: row for row in rows}
    qd32 = by_title["4 KiB random read QD32"]
    assert re.fullmatch(rf"{NUMBER} / {NUMBER}", qd32["cpu_req"].strip()), qd32.group(0)
    assert re.fullmatch(rf"{NUMBER} / {NUMBER}", qd32["cpu_gib"].strip()), qd32.group(0)

    verdicts = re.findall(r"^- \*\*(met|not met)\*\* — ", out, re.MULTILINE)
    assert len(verdicts) == 12, out  # one per target of issue 5, each measured

    recorded = json.loads(samples.read_text())
    assert sorted(recorded) == sorted(keys)
    for key, values in recorded.items():
        assert sorted(s["kind"] for s in values) == ["qednbd", "qednbd", "qemu-nbd", "qemu-nbd"], key
    assert not list((tmp_path / "work").glob("*.sock")), "servers left running"


def test_handshake_floor_compares_three_servers() -> None:
    proc = subprocess.run(
        [sys.executable, "bench/handshake_floor.py", "--rounds=1", "--handshakes=10"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    rows = re.findall(
        rf"^  (floor|qednbd|qemu-nbd) +({NUMBER}) µs/conn +server CPU +({NUMBER}) µs/conn$", proc.stdout, re.M
    )
    assert [r[0] for r in rows] == ["floor", "qednbd", "qemu-nbd"], proc.stdout
    assert all(float(r[1].replace(",", "")) > 0 for r in rows)
