"""qednbd serve against qemu-nbd on fresh QED images of the same geometry, side by side (issue 5).

    python bench/serve_bench.py              # the full run: 2 rounds, about 5 minutes, prints the table
    python bench/serve_bench.py --quick      # a smoke run with small sizes, 1-2 minutes
    python bench/serve_bench.py --only randread_qd32,seq_read --rounds 3    # some rows (see --list)

Needs only what scripts/test.sh installs: qemu-utils (qemu-img, qemu-io, qemu-nbd), libnbd-bin
(nbdcopy), python3-libnbd (used through /usr/bin/python3 for the handshake loop) and fio. Any Python
>= 3.11 runs it; the server runs as `<this python> -m qednbd serve` from this checkout. As root, the
cold-cache row drops the whole page cache (/proc/sys/vm/drop_caches); otherwise it evicts the image
with posix_fadvise(DONTNEED) (--cold chooses).

The servers: `qednbd serve -k SOCK IMG` and `qemu-nbd -f qed -t -e 0 -k SOCK IMG` (its defaults:
writeback page cache, thread-pool I/O), each on its own copy of the same image (qemu-img's default
geometry, 64 KiB clusters). TCP (127.0.0.1, a free port) only for the TCP handshake row. Every
workload runs against both servers in each round, one server after the other, with the order flipped
every round; the table shows medians over the rounds.

The rows (S = --size-mib, T = --runtime; fio --ioengine=nbd unless said otherwise):
  seq_read          sequential read 1 MiB QD8, T seconds, S MiB of allocated data
  randread_qd1      4 KiB random read QD1, T seconds
  randread_qd32     4 KiB random read QD32, T seconds
  two_4k            two clients at once (fio numjobs=2, one connection each): 4 KiB random read QD16 each
  two_1m            two clients at once: 1 MiB sequential read QD4 each, each over its half of the image
  nbdcopy_out       nbdcopy server -> null: (S MiB; nbdcopy's defaults, 4 connections: both servers
                    advertise multi-conn)
  handshake_unix    --handshakes connections, one after the other, each connect + handshake + NBD_CMD_DISC
                    + close (libnbd, in one /usr/bin/python3 process): mean time per connection
  handshake_tcp     the same over TCP on 127.0.0.1
  randwrite_qd32    4 KiB random write QD32 on allocated space (the data image), T seconds
  seq_write_alloc   sequential write 1 MiB QD8 of S MiB into a fresh (unallocated) image
  randwrite_alloc   4 KiB random write QD32 into a fresh 64 GiB image, 32 writes per MiB of S, fio's
                    random map (no 4 KiB block twice; at most ~2 % land in a cluster allocated earlier)
  nbdcopy_in        nbdcopy S MiB raw file -> server, into a fresh image (no --flush: page cache speed)
  memory            peak RSS (VmHWM) of the server exporting a sparse 1 TiB image read-only (one data
                    cluster under each of --sparse-tables L2 tables) to 8 clients doing 4 KiB random
                    reads QD8 for T seconds
  check             `qednbd check` against `qemu-img check` on that sparse 1 TiB image (file cached)
  cold              the S MiB data image served read-only; page cache dropped, the first 1/8 (at most
                    64 MiB) read once through the server to warm it; then a 4 KiB QD1 random reader of
                    that hot part runs beside a second client streaming the rest (uncached, 1 MiB QD8)
                    until the stream ends: p99 latency of the light reader

How it is measured, per sample: wall time; the server's CPU (utime+stime of its PID, all threads,
from /proc/PID/stat before and after; to the nanosecond from /proc/PID/task/*/schedstat when the two
agree within /proc/PID/stat's 10 ms rounding, i.e. no thread exited) divided by GiB moved and by
requests (fio's counts; connections for the handshake rows); the clients' CPU (getrusage of the
children this script reaped); and the CPU the whole machine spent (/proc/stat). What neither server
nor client used is other load: a sample with more than --noise-cores CPUs of other load on average is
flagged noisy, with the busiest other process named (its own CPU in the sample, plus the lifetime CPU
of its children that exited during the sample: a test runner's load is mostly short-lived children),
and so is a row whose rounds spread more than 15 % around the median (for one server). Before every
sample dirty pages are written back (sync), so a sample does not pay for the last one; each round
starts by reading the shared files (nbdcopy's source, the data and sparse images) back into the page
cache, which the previous round's cold row dropped.

Memory that grows the page cache: a VM may hand freed memory back to its host (virtio-balloon free page
reporting, about 2 s after the free; this one does) and fault it back in slowly: writing 1 GiB into
the page cache ran at ~0.8 GiB/s into such memory and ~4 GiB/s into memory freed a moment before, so
whichever server went first in an allocating-write pair lost by 2x. Before each sample that grows the
page cache (seq_write_alloc, randwrite_alloc: 64 KiB per write, nbdcopy_in) the script therefore
writes and deletes a scratch file of that size, so that both servers find the memory backed
(--no-prime turns this off).

Output: progress on stderr; on stdout a markdown table (README-ready), notes, and one line per target
of issue 5: met / not met. --json FILE also writes every sample.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from benchkit import (
    LIBNBD_PYTHON,
    REPO,
    BenchError,
    Server,
    Usage,
    drop_cache,
    fio,
    fio_job,
    fio_totals,
    make_filled_qed,
    make_random_raw,
    make_sparse_qed,
    measure,
    qemu_img_create,
    run,
    stop_all,
    warm_file,
)

KINDS = ("qednbd", "qemu-nbd")
MIB = 1 << 20
GIB = 1 << 30
SPREAD_LIMIT = 0.15

HANDSHAKE = r"""
import json, sys, time
import nbd

uri, n = sys.argv[1], int(sys.argv[2])


def once():
    h = nbd.NBD()
    h.connect_uri(uri)
    h.shutdown()
    del h  # nbd_close: the socket is closed here


once()  # warm-up: first connection
times = []
for _ in range(n):
    start = time.perf_counter()
    once()
    times.append(time.perf_counter() - start)
times.sort()
print(json.dumps({"total": sum(times), "p50": times[n // 2], "p99": times[min(n - 1, int(n * 0.99))]}))
"""


@dataclass(frozen=True)
class Row:
    key: str
    title: str
    unit: str
    higher_better: bool
    cpu: bool = True  # show the server CPU columns


@dataclass
class Sample:
    kind: str
    round: int
    value: float
    usage: Usage
    nbytes: int = 0
    requests: int = 0
    note: str = ""

    def cpu_per_gib(self) -> float | None:
        return self.usage.server_cpu / (self.nbytes / GIB) if self.nbytes else None

    def cpu_us_per_request(self) -> float | None:
        return self.usage.server_cpu / self.requests * 1e6 if self.requests else None


class Bench:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.work = work
        self.size = args.size_mib * MIB
        self.round = 0
        self.raw = work / "data.raw"
        self.base = work / "data.qed"
        self.sparse = work / "sparse-1T.qed"
        self._main: dict[str, Server] = {}
        self.samples: dict[str, list[Sample]] = {}

    def prepare(self, keys: list[str]) -> None:
        say(f"preparing images in {self.work}")
        make_random_raw(self.raw, self.args.size_mib)
        make_filled_qed(self.raw, self.base)
        if {"memory", "check"} & set(keys):
            make_sparse_qed(self.sparse, 1 << 40, self.args.sparse_tables)
        os.sync()

    def timed(self) -> list[str]:
        return ["--time_based", f"--runtime={round(self.args.runtime * 1000)}ms"]

    def main_server(self, kind: str) -> Server:
        """This round's server on its own copy of the data image (copied on first use)."""
        if kind not in self._main:
            image = self.work / f"main-{kind}.qed"
            shutil.copyfile(self.base, image)
            os.sync()
            self._main[kind] = Server(kind, image, self.work)
        return self._main[kind]

    def start_round(self, r: int) -> None:
        """Bring the shared files back into the page cache (the last round's cold row dropped them):
        the nbdcopy source, and the sparse image whose tables the memory row reads."""
        self.round = r
        for path in (self.raw, self.base, self.sparse):
            if path.exists():
                warm_file(path)

    def end_round(self) -> None:
        for server in self._main.values():
            server.stop()
            server.image.unlink(missing_ok=True)
        self._main.clear()

    def fresh(self, kind: str, tag: str, size: int) -> Path:
        return qemu_img_create(self.work / f"{tag}-{kind}.qed", size)

    def settle(self, grows_cache: int = 0) -> None:
        """Before a sample: write back dirty pages; for a sample that grows the page cache by about
        ``grows_cache`` bytes, first touch that much memory (a scratch file, written and deleted)."""
        os.sync()
        if grows_cache and not self.args.no_prime:
            scratch = self.work / "prime.tmp"
            chunk = bytes(MIB)
            with open(scratch, "wb") as f:
                for _ in range(grows_cache // MIB):
                    f.write(chunk)
            scratch.unlink()  # dirty pages of a deleted file are dropped, not written

    def fio_sample(
        self, kind: str, server: Server, options: list[str], metric: str, grows_cache: int = 0
    ) -> Sample:
        self.settle(grows_cache)
        with measure([server.pid]) as use:
            result = fio(server.uri, options, self.work / "fio.json", self.args.runtime + 600)
        totals = fio_totals(fio_job(result))
        value = totals.iops if metric == "iops" else totals.mib_per_s
        return Sample(kind, self.round, value, use, totals.nbytes, totals.ios)


WORKLOADS: dict[str, tuple[Row, Callable[[Bench, str], Sample]]] = {}


def workload(
    key: str, title: str, unit: str, higher_better: bool, cpu: bool = True
) -> Callable[[Callable[[Bench, str], Sample]], Callable[[Bench, str], Sample]]:
    def register(fn: Callable[[Bench, str], Sample]) -> Callable[[Bench, str], Sample]:
        WORKLOADS[key] = (Row(key, title, unit, higher_better, cpu), fn)
        return fn

    return register


# The order is the order of each round: reads of the data image first, its overwrite last, then the
# fresh images, then the workloads that drop or read other files.


@workload("seq_read", "sequential read 1 MiB QD8", "MiB/s", True)
def seq_read(b: Bench, kind: str) -> Sample:
    opts = ["--name=seq_read", "--rw=read", "--bs=1M", "--iodepth=8", *b.timed()]
    return b.fio_sample(kind, b.main_server(kind), opts, "mib")


@workload("randread_qd1", "4 KiB random read QD1", "IOPS", True)
def randread_qd1(b: Bench, kind: str) -> Sample:
    opts = ["--name=randread_qd1", "--rw=randread", "--bs=4k", "--iodepth=1", *b.timed()]
    return b.fio_sample(kind, b.main_server(kind), opts, "iops")


@workload("randread_qd32", "4 KiB random read QD32", "IOPS", True)
def randread_qd32(b: Bench, kind: str) -> Sample:
    opts = ["--name=randread_qd32", "--rw=randread", "--bs=4k", "--iodepth=32", *b.timed()]
    return b.fio_sample(kind, b.main_server(kind), opts, "iops")


@workload("two_4k", "two clients, 4 KiB random read QD16 each", "IOPS", True)
def two_4k(b: Bench, kind: str) -> Sample:
    opts = ["--name=two_4k", "--numjobs=2", "--group_reporting", "--rw=randread", "--bs=4k", "--iodepth=16"]
    return b.fio_sample(kind, b.main_server(kind), [*opts, *b.timed()], "iops")


@workload("two_1m", "two clients, 1 MiB sequential read QD4 each", "MiB/s", True)
def two_1m(b: Bench, kind: str) -> Sample:
    half = b.size // 2
    opts = ["--name=two_1m", "--numjobs=2", "--group_reporting", "--rw=read", "--bs=1M", "--iodepth=4"]
    opts += [f"--size={half}", f"--offset_increment={half}", *b.timed()]
    return b.fio_sample(kind, b.main_server(kind), opts, "mib")


def _nbdcopy(b: Bench, kind: str, server: Server, src: str, dst: str, grows_cache: int = 0) -> Sample:
    b.settle(grows_cache)
    with measure([server.pid]) as use:
        run(["nbdcopy", src, dst])
    return Sample(kind, b.round, b.size / use.wall / MIB, use, b.size)


@workload("nbdcopy_out", "nbdcopy server → null:", "MiB/s", True)
def nbdcopy_out(b: Bench, kind: str) -> Sample:
    server = b.main_server(kind)
    return _nbdcopy(b, kind, server, server.uri, "null:")


def _handshakes(b: Bench, kind: str, server: Server) -> Sample:
    n = b.args.handshakes
    os.sync()
    with measure([server.pid]) as use:
        out = run([LIBNBD_PYTHON, "-c", HANDSHAKE, server.uri, str(n)])
    result = json.loads(out)
    note = f"p50 {result['p50'] * 1e6:.0f} µs, p99 {result['p99'] * 1e6:.0f} µs"
    return Sample(kind, b.round, result["total"] / n * 1e6, use, requests=n, note=note)


@workload("handshake_unix", "handshake + close, Unix socket", "µs/conn", False)
def handshake_unix(b: Bench, kind: str) -> Sample:
    return _handshakes(b, kind, b.main_server(kind))


@workload("handshake_tcp", "handshake + close, TCP 127.0.0.1", "µs/conn", False)
def handshake_tcp(b: Bench, kind: str) -> Sample:
    image = b.fresh(kind, "tcp", 64 * MIB)
    try:
        with Server(kind, image, b.work, tcp=True) as server:
            return _handshakes(b, kind, server)
    finally:
        image.unlink()


@workload("randwrite_qd32", "4 KiB random write QD32, allocated space", "IOPS", True)
def randwrite_qd32(b: Bench, kind: str) -> Sample:
    opts = ["--name=randwrite_qd32", "--rw=randwrite", "--bs=4k", "--iodepth=32", *b.timed()]
    return b.fio_sample(kind, b.main_server(kind), opts, "iops")


@workload("seq_write_alloc", "sequential write 1 MiB QD8, allocating", "MiB/s", True)
def seq_write_alloc(b: Bench, kind: str) -> Sample:
    image = b.fresh(kind, "seqw", b.size)
    try:
        with Server(kind, image, b.work) as server:
            opts = ["--name=seq_write_alloc", "--rw=write", "--bs=1M", "--iodepth=8"]
            return b.fio_sample(kind, server, opts, "mib", grows_cache=b.size)
    finally:
        image.unlink()


@workload("randwrite_alloc", "4 KiB random write QD32, allocating", "IOPS", True)
def randwrite_alloc(b: Bench, kind: str) -> Sample:
    image = b.fresh(kind, "rwa", 64 * GIB)
    writes = 32 * b.args.size_mib
    try:
        with Server(kind, image, b.work) as server:
            opts = ["--name=randwrite_alloc", "--rw=randwrite", "--bs=4k", "--iodepth=32"]
            opts.append(f"--io_size={writes * 4096}")
            return b.fio_sample(kind, server, opts, "iops", grows_cache=writes * 64 * 1024)
    finally:
        image.unlink()


@workload("nbdcopy_in", "nbdcopy file → server, allocating", "MiB/s", True)
def nbdcopy_in(b: Bench, kind: str) -> Sample:
    image = b.fresh(kind, "copyin", b.size)
    try:
        with Server(kind, image, b.work) as server:
            return _nbdcopy(b, kind, server, str(b.raw), server.uri, grows_cache=b.size)
    finally:
        image.unlink()


@workload("memory", "memory: peak RSS, 1 TiB sparse image, 8 clients random read", "MiB", False)
def memory(b: Bench, kind: str) -> Sample:
    with Server(kind, b.sparse, b.work, read_only=True) as server:
        opts = ["--name=memory", "--numjobs=8", "--group_reporting", "--rw=randread", "--bs=4k"]
        sample = b.fio_sample(kind, server, [*opts, "--iodepth=8", "--norandommap", *b.timed()], "iops")
        sample.note = f"{sample.value:,.0f} IOPS"
        sample.value = server.hwm_mib()
    return sample


@workload("check", "check: qednbd check vs qemu-img check, 1 TiB sparse image", "s", False, cpu=False)
def check(b: Bench, kind: str) -> Sample:
    if kind == "qednbd":
        cmd = [sys.executable, "-m", "qednbd", "check", str(b.sparse)]
    else:
        cmd = ["qemu-img", "check", "-f", "qed", str(b.sparse)]
    warm_file(b.sparse)
    os.sync()
    env = dict(os.environ, PYTHONPATH=str(REPO))
    with measure([]) as use:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, check=False)
    if proc.returncode not in (0, 3):  # 3: leaked clusters, still a complete check
        raise BenchError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}")
    return Sample(kind, b.round, use.wall, use, note=f"CPU {use.client_cpu:.3f} s")


@workload("cold", "cold cache: p99 of a 4 KiB QD1 reader beside an uncached stream", "ms", False, cpu=False)
def cold(b: Bench, kind: str) -> Sample:
    hot = max(MIB, min(64 * MIB, b.size // 8 // MIB * MIB))
    with Server(kind, b.base, b.work, read_only=True) as server:
        method = drop_cache(b.base, b.args.cold)
        warm = ["--name=warm", "--rw=read", "--bs=1M", "--iodepth=4", f"--size={hot}"]
        fio(server.uri, warm, b.work / "fio.json", 600)
        opts = ["--exitall", "--lat_percentiles=1"]
        opts += ["--name=light", "--rw=randread", "--bs=4k", "--iodepth=1", f"--size={hot}"]
        opts += ["--time_based", "--runtime=600"]
        opts += ["--name=stream", "--rw=read", "--bs=1M", "--iodepth=8", f"--offset={hot}"]
        opts += [f"--size={b.size - hot}"]
        with measure([server.pid]) as use:
            result = fio(server.uri, opts, b.work / "fio.json", 900)
    light = fio_totals(fio_job(result, "light"))
    stream = fio_totals(fio_job(result, "stream"))
    note = f"p50 {light.p50_ms:.3f} ms, {light.ios} reads; stream {stream.mib_per_s:,.0f} MiB/s; {method}"
    return Sample(kind, b.round, light.p99_ms, use, light.nbytes + stream.nbytes, light.ios, note)


# ---------------------------------------------------------------- report


@dataclass
class Summary:
    row: Row
    median: dict[str, float]
    cpu_gib: dict[str, float | None]
    cpu_req: dict[str, float | None]
    noise: list[str] = field(default_factory=list)
    busiest: list[str] = field(default_factory=list)  # the busiest other process of each noisy sample
    notes: dict[str, str] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        theirs = self.median["qemu-nbd"]
        return self.median["qednbd"] / theirs if theirs else float("inf")

    def cpu_ratio(self, which: str) -> float | None:
        values = self.cpu_gib if which == "gib" else self.cpu_req
        ours, theirs = values["qednbd"], values["qemu-nbd"]
        return ours / theirs if ours is not None and theirs else None


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def summarize(row: Row, samples: list[Sample], noise_cores: float) -> Summary:
    by_kind = {k: [s for s in samples if s.kind == k] for k in KINDS}
    summary = Summary(
        row,
        {k: statistics.median(s.value for s in v) for k, v in by_kind.items()},
        {k: _median([s.cpu_per_gib() for s in v]) for k, v in by_kind.items()},
        {k: _median([s.cpu_us_per_request() for s in v]) for k, v in by_kind.items()},
    )
    for kind, group in by_kind.items():
        mid = summary.median[kind]
        values = [s.value for s in group]
        if len(values) > 1 and mid and (max(values) - min(values)) / mid > SPREAD_LIMIT:
            summary.noise.append(f"{kind} spread {(max(values) - min(values)) / mid:.0%}")
        for s in group:
            if s.usage.other_cores > noise_cores:
                summary.noise.append(f"{kind} r{s.round + 1} other load {s.usage.other_cores:.1f} CPUs")
                if s.usage.top_other:
                    summary.busiest.append(f"{kind} r{s.round + 1}: {s.usage.top_other}")
        notes = [s.note for s in group if s.note]
        if notes:
            summary.notes[kind] = " | ".join(notes)
    return summary


def fmt(value: float | None, unit: str = "") -> str:
    if value is None:
        return "—"
    if unit in ("IOPS",) or abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    if abs(value) >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def pair(values: dict[str, float | None], show: bool) -> str:
    if not show or all(v is None for v in values.values()):
        return "—"
    return " / ".join(fmt(values[k]) for k in KINDS)


def table(summaries: list[Summary]) -> list[str]:
    lines = [
        "| workload | unit | qednbd | qemu-nbd | qednbd / qemu-nbd | better | server CPU s/GiB "
        "(qednbd / qemu-nbd) | server CPU µs/request (qednbd / qemu-nbd) | noise |",
        "|---|---|---:|---:|---:|---|---:|---:|---|",
    ]
    for s in summaries:
        row = s.row
        better = "higher" if row.higher_better else "lower"
        wins = (s.ratio > 1) == row.higher_better and s.ratio != 1
        ratio = f"{s.ratio:.2f}×" + (" ✓" if wins else "")
        lines.append(
            f"| {row.title} | {row.unit} | {fmt(s.median['qednbd'], row.unit)} | "
            f"{fmt(s.median['qemu-nbd'], row.unit)} | {ratio} | {better} | {pair(s.cpu_gib, row.cpu)} | "
            f"{pair(s.cpu_req, row.cpu)} | {'; '.join(s.noise) or 'ok'} |"
        )
    return lines


# (label, [(row key, quantity, comparison, limit)]); quantity: ratio | cpu_gib | cpu_req | qednbd
TARGETS: list[tuple[str, list[tuple[str, str, str, float]]]] = [
    (
        "4 KiB random read QD32: ≥ 3.0× IOPS and ≤ 0.4× server CPU per request",
        [("randread_qd32", "ratio", ">=", 3.0), ("randread_qd32", "cpu_req", "<=", 0.4)],
    ),
    ("4 KiB random write QD32, allocated space: ≥ 2.5× IOPS", [("randwrite_qd32", "ratio", ">=", 2.5)]),
    ("4 KiB random read QD1: ≥ 1.2× IOPS", [("randread_qd1", "ratio", ">=", 1.2)]),
    ("sequential read 1 MiB QD8: ≥ 2.5× throughput", [("seq_read", "ratio", ">=", 2.5)]),
    ("nbdcopy server → null: ≥ 1.5×", [("nbdcopy_out", "ratio", ">=", 1.5)]),
    (
        "sequential allocating write 1 MiB QD8; allocating 4 KiB random write QD32; "
        "nbdcopy file → server: ≥ 1.2×",
        [(k, "ratio", ">=", 1.2) for k in ("seq_write_alloc", "randwrite_alloc", "nbdcopy_in")],
    ),
    (
        "two clients at once: 4 KiB QD16 each ≥ 2.5×, 1 MiB QD4 each ≥ 2.0×",
        [("two_4k", "ratio", ">=", 2.5), ("two_1m", "ratio", ">=", 2.0)],
    ),
    (
        "handshake (Unix and TCP): ≤ 1.0× time per connection",
        [("handshake_unix", "ratio", "<=", 1.0), ("handshake_tcp", "ratio", "<=", 1.0)],
    ),
    (
        "server CPU seconds per GiB: ≤ 0.5× on reads (seq read, nbdcopy → null, two clients 1 MiB), "
        "≤ 1.0× on allocating writes",
        [(k, "cpu_gib", "<=", 0.5) for k in ("seq_read", "nbdcopy_out", "two_1m")]
        + [(k, "cpu_gib", "<=", 1.0) for k in ("seq_write_alloc", "randwrite_alloc", "nbdcopy_in")],
    ),
    ("cold-cache p99 of the light reader: no worse than qemu-nbd's (≤ 1.0×)", [("cold", "ratio", "<=", 1.0)]),
    ("memory: server RSS < 100 MiB, 1 TiB-virtual image, 8 clients", [("memory", "qednbd", "<", 100.0)]),
    ("check: `qednbd check` time ≤ `qemu-img check`", [("check", "ratio", "<=", 1.0)]),
]


def targets(summaries: dict[str, Summary]) -> list[str]:
    lines = []
    for label, conditions in TARGETS:
        parts: list[str] = []
        verdicts: list[bool | None] = []
        noisy = False
        for key, quantity, op, limit in conditions:
            s = summaries.get(key)
            value: float | None = None
            if s is not None:
                noisy |= bool(s.noise)
                if quantity == "ratio":
                    value = s.ratio
                elif quantity == "qednbd":
                    value = s.median["qednbd"]
                else:
                    value = s.cpu_ratio("gib" if quantity == "cpu_gib" else "req")
            if value is None:
                parts.append(f"{key}{'' if quantity in ('ratio', 'qednbd') else ' ' + quantity} not measured")
                verdicts.append(None)
                continue
            ok = {">=": value >= limit, "<=": value <= limit, "<": value < limit}[op]
            shown = f"{value:.1f} MiB" if quantity == "qednbd" else f"{value:.2f}×"
            what = "" if quantity in ("ratio", "qednbd") else f" {quantity.replace('_', ' ')}"
            parts.append(f"{key}{what} {shown}{'' if ok else ' ✗'}")
            verdicts.append(ok)
        if all(v is None for v in verdicts):
            lines.append(f"- **not measured** — {label}")
            continue
        verdict = "partly measured" if None in verdicts else "met" if all(verdicts) else "not met"
        lines.append(f"- **{verdict}** — {label}: {', '.join(parts)}{' (noisy samples)' if noisy else ''}")
    return lines


# ---------------------------------------------------------------- main


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def preflight() -> None:
    missing = [t for t in ("qemu-img", "qemu-io", "qemu-nbd", "nbdcopy", "fio") if shutil.which(t) is None]
    if missing:
        raise SystemExit(f"missing {', '.join(missing)}: run `bash scripts/test.sh` (it installs them)")
    probe = subprocess.run([LIBNBD_PYTHON, "-c", "import nbd"], capture_output=True, check=False)
    if probe.returncode != 0:
        raise SystemExit(f"{LIBNBD_PYTHON} cannot import nbd: install python3-libnbd (scripts/test.sh does)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    doc = __doc__ or ""
    ap = argparse.ArgumentParser(
        description=doc.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    ap.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: --size-mib 128 --runtime 1 --handshakes 50 --sparse-tables 64 unless given",
    )
    ap.add_argument("--rounds", type=int, default=2, help="rounds (each runs every workload on both servers)")
    ap.add_argument("--size-mib", type=int, help="data image / copy size, MiB (default 1024)")
    ap.add_argument("--runtime", type=float, help="seconds per time-based fio run (default 5)")
    ap.add_argument("--handshakes", type=int, help="connections per handshake sample (default 200)")
    ap.add_argument(
        "--sparse-tables", type=int, help="L2 tables holding data in the 1 TiB image (default 512)"
    )
    ap.add_argument("--only", help="comma-separated row keys (default: all; see --list)")
    ap.add_argument("--list", action="store_true", help="list the row keys and exit")
    ap.add_argument(
        "--cold",
        choices=("auto", "drop", "fadvise"),
        default="auto",
        help="how to evict the page cache for the cold row (auto: drop_caches when permitted)",
    )
    ap.add_argument(
        "--noise-cores",
        type=float,
        default=0.25,
        help="flag a sample when other processes kept more CPUs than this busy on average",
    )
    ap.add_argument(
        "--no-prime",
        action="store_true",
        help="do not touch memory before the samples that grow the page cache (see above)",
    )
    ap.add_argument(
        "--dir", type=Path, help="work directory (default: a new one under $TMPDIR, removed after)"
    )
    ap.add_argument("--json", type=Path, help="also write every sample here")
    args = ap.parse_args(argv)
    quick = {"size_mib": 128, "runtime": 1.0, "handshakes": 50, "sparse_tables": 64}
    full = {"size_mib": 1024, "runtime": 5.0, "handshakes": 200, "sparse_tables": 512}
    for name, value in (quick if args.quick else full).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.size_mib < 8 or args.rounds < 1 or args.handshakes < 1:
        ap.error("--size-mib must be >= 8, --rounds and --handshakes >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        for key, (row, _) in WORKLOADS.items():
            print(
                f"{key:16} {row.title} ({row.unit}, {'higher' if row.higher_better else 'lower'} is better)"
            )
        return 0
    keys = list(WORKLOADS) if not args.only else [k.strip() for k in args.only.split(",") if k.strip()]
    unknown = [k for k in keys if k not in WORKLOADS]
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; --list shows them")
    keys = [k for k in WORKLOADS if k in keys]  # the round order
    preflight()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.monotonic()
    own_dir = args.dir is None
    work = Path(tempfile.mkdtemp(prefix="qednbd-bench-")) if own_dir else args.dir
    work.mkdir(parents=True, exist_ok=True)
    bench = Bench(args, work)
    try:
        bench.prepare(keys)
        for r in range(args.rounds):
            bench.start_round(r)
            order = KINDS if r % 2 == 0 else tuple(reversed(KINDS))
            try:
                for key in keys:
                    row, fn = WORKLOADS[key]
                    for kind in order:
                        sample = fn(bench, kind)
                        bench.samples.setdefault(key, []).append(sample)
                        u = sample.usage
                        say(
                            f"round {r + 1}/{args.rounds} {kind:8} {key:16} {fmt(sample.value, row.unit):>9} "
                            f"{row.unit:8} server CPU {u.server_cpu:6.2f} s, client {u.client_cpu:6.2f} s, "
                            f"other {u.other_cores:.2f} CPUs{f' ({u.top_other})' if u.top_other else ''}"
                            f"{f'  [{sample.note}]' if sample.note else ''}"
                        )
            finally:
                bench.end_round()
    except BenchError as e:
        say(f"serve_bench: {e}")
        return 1
    finally:
        stop_all()
        if own_dir:
            shutil.rmtree(work, ignore_errors=True)
    elapsed = time.monotonic() - started
    summaries = {k: summarize(WORKLOADS[k][0], bench.samples[k], args.noise_cores) for k in keys}
    qemu_version = run(["qemu-nbd", "--version"]).splitlines()[0]
    command = shlex.join(["python", "bench/serve_bench.py", *(sys.argv[1:] if argv is None else argv)])
    print(
        f"`{command}` — {args.rounds} rounds, medians; data image {args.size_mib} MiB, time-based runs "
        f"{args.runtime:g} s, {args.handshakes} handshakes; {qemu_version}; Python "
        f"{platform.python_version()}; {os.cpu_count()} CPUs; run took {elapsed / 60:.1f} min"
    )
    print()
    print("\n".join(table(list(summaries.values()))))
    print()
    print(
        "Ratio = qednbd / qemu-nbd (✓: qednbd better); a request of the handshake rows is a connection; "
        "noise: other load > "
        f"{args.noise_cores:g} CPUs during a sample, or rounds spread > {SPREAD_LIMIT:.0%}."
    )
    for key, s in summaries.items():
        if s.notes:
            print(f"- {key}: " + "; ".join(f"{k}: {v}" for k, v in s.notes.items()))
    busiest = [f"{key} {b}" for key, s in summaries.items() for b in s.busiest]
    if busiest:
        print(f"- busiest other process in noisy samples: {'; '.join(busiest)}")
    print()
    print("Targets (issue 5):")
    print("\n".join(targets(summaries)))
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    k: [asdict(s) | {"other_cores": s.usage.other_cores} for s in v]
                    for k, v in bench.samples.items()
                },
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
