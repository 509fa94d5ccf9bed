"""Processes, /proc accounting and tool wrappers for bench/serve_bench.py (no workloads here).

- ``Server``: ``qednbd serve`` or ``qemu-nbd -f qed -t -e 0`` on a Unix socket (or TCP on 127.0.0.1 and
  a free port), started and waited for with bounded timeouts; every server started is in ``SERVERS``
  and ``stop_all()`` stops whatever is still running.
- ``measure(pids)``: wall time, CPU of the given server processes (utime+stime from /proc/PID/stat),
  CPU of the clients (the children we reaped, from getrusage) and of everything else on the machine
  (/proc/stat busy time minus both), with the name of the busiest other process: the noise check.
- ``fio()``, ``run()``, image makers.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
LIBNBD_PYTHON = "/usr/bin/python3"  # Debian's python3-libnbd lives only there
START_TIMEOUT = 30.0
L2_SPAN = 2 << 30  # guest bytes under one L2 table (64 KiB clusters, table_size 4: qemu-img's defaults)


class BenchError(Exception):
    pass


def run(cmd: list[str], timeout: float = 900.0, ok: tuple[int, ...] = (0,)) -> str:
    """Run a command to completion; its stdout, or BenchError with the tail of its output."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as e:
        raise BenchError(f"{' '.join(cmd)}: no result after {timeout:.0f} s") from e
    if proc.returncode not in ok:
        raise BenchError(
            f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}"
        )
    return proc.stdout


# ---------------------------------------------------------------- /proc accounting


def _stat_fields(text: str) -> list[str]:
    """Fields of /proc/PID/stat after the command name: index 0 is field 3 (state)."""
    return text[text.rindex(")") + 2 :].split()


def proc_cpu(pid: int) -> float:
    """utime + stime of a whole process (all its threads, live and exited), seconds, in 10 ms steps."""
    fields = _stat_fields(Path(f"/proc/{pid}/stat").read_text())
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_cpu_ns(pid: int) -> int:
    """The same run time to the nanosecond, summed over the live threads (/proc/PID/task/*/schedstat):
    what a thread that exited had used is missing here."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError):
            total += int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0])
    return total


class CpuClock:
    """CPU seconds a process uses from now on: the nanosecond per-thread sums, unless they disagree with
    /proc/PID/stat by more than its rounding (a thread exited), then utime+stime."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.ticks0, self.ns0 = proc_cpu(pid), proc_cpu_ns(pid)

    def elapsed(self) -> float:
        ticks = proc_cpu(self.pid) - self.ticks0
        precise = (proc_cpu_ns(self.pid) - self.ns0) / 1e9
        return precise if abs(precise - ticks) <= 2.5 / CLK_TCK else ticks


def proc_hwm_mib(pid: int) -> float:
    """Peak resident set size (VmHWM) of a process, MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise BenchError(f"no VmHWM for pid {pid}")


def system_busy() -> float:
    """CPU seconds all CPUs spent not idle since boot (/proc/stat: user nice system irq softirq steal)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = values
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def _all_processes() -> dict[int, tuple[str, float, float]]:
    """pid -> (command name, its CPU seconds, CPU seconds of the children it has reaped) for every
    process now alive: a test runner's short-lived children only show in the second figure."""
    found: dict[int, tuple[str, float, float]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            text = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        fields = _stat_fields(text)
        found[int(entry.name)] = (
            text[text.index("(") + 1 : text.rindex(")")],
            (int(fields[11]) + int(fields[12])) / CLK_TCK,  # utime stime
            (int(fields[13]) + int(fields[14])) / CLK_TCK,  # cutime cstime
        )
    return found


def _self_and_children_cpu() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


@dataclass
class Usage:
    wall: float = 0.0
    server_cpu: float = 0.0  # seconds, the measured server processes
    client_cpu: float = 0.0  # seconds, this script and the clients it ran (fio, nbdcopy, ...)
    other_cpu: float = 0.0  # seconds, everything else on the machine (kernel threads included)
    top_other: str = ""  # the busiest other process, counting the children it reaped meanwhile

    @property
    def other_cores(self) -> float:
        """Average number of CPUs other processes kept busy during the sample."""
        return self.other_cpu / self.wall if self.wall > 0 else 0.0


@contextlib.contextmanager
def measure(server_pids: list[int]) -> Iterator[Usage]:
    """Account one sample. Clients must be run to completion (and reaped) inside the block."""
    usage = Usage()
    ours = {os.getpid(), *server_pids}
    before = _all_processes()
    busy0, mine0 = system_busy(), _self_and_children_cpu()
    clocks = [CpuClock(p) for p in server_pids]
    start = time.perf_counter()
    yield usage
    usage.wall = time.perf_counter() - start
    usage.server_cpu = sum(c.elapsed() for c in clocks)
    usage.client_cpu = _self_and_children_cpu() - mine0
    usage.other_cpu = max(0.0, system_busy() - busy0 - usage.server_cpu - usage.client_cpu)
    after = _all_processes()
    busiest = (0.0, 0.0, 0.0, "")
    for pid, (name, own, reaped) in after.items():
        if pid not in ours:
            _, own0, reaped0 = before.get(pid, (name, 0.0, 0.0))
            busiest = max(busiest, (own - own0 + reaped - reaped0, own - own0, reaped - reaped0, name))
    total, own, reaped, name = busiest
    if total > 0:
        # children that exited: their whole lifetime's CPU, which may have started before the sample
        usage.top_other = f"{name} {own:.2f} s" + (f" +{reaped:.2f} s exited children" if reaped > 0 else "")


# ---------------------------------------------------------------- servers

SERVERS: list[Server] = []
_serial = itertools.count()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """One NBD server process serving one QED image (the default export, name "")."""

    def __init__(self, kind: str, image: Path, workdir: Path, *, tcp: bool = False, read_only: bool = False):
        self.kind = kind
        self.image = image
        n = next(_serial)
        self.log_path = workdir / f"{kind}-{n}.log"
        where: list[str]
        if kind == "qednbd":
            where = ["-b", "127.0.0.1", "-p", "0"] if tcp else ["-k", str(workdir / f"s{n}.sock")]
            cmd = [sys.executable, "-m", "qednbd", "serve", *where]
        elif kind == "qemu-nbd":
            where = (
                ["-b", "127.0.0.1", "-p", str(_free_port())] if tcp else ["-k", str(workdir / f"s{n}.sock")]
            )
            cmd = ["qemu-nbd", "-f", "qed", "-t", "-e", "0", *where]
        elif kind == "floor":  # bench/handshake_floor.py: canned handshake replies, no image
            where = ["-k", str(workdir / f"s{n}.sock")]
            cmd = [sys.executable, str(REPO / "bench" / "handshake_floor.py"), "--serve", where[1]]
        else:
            raise ValueError(kind)
        if kind != "floor":
            cmd += [*(["-r"] if read_only else []), str(image)]
        env = dict(
            os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
        )
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO
            )
        SERVERS.append(self)
        try:
            self.uri = self._wait(where)
        except BaseException:
            self.stop()
            raise

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def _wait(self, where: list[str]) -> str:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(f"{self.kind} exited {self.proc.returncode} before listening:\n{self.log()}")
            if self.kind == "qednbd":
                text = self.log()
                found = re.findall(r"listening on (\S+)", text)
                if found and "export " in text.split(found[-1], 1)[1]:
                    return str(found[-1])
            elif self._connectable(where):
                if where[0] == "-k":
                    return f"nbd+unix:///?socket={where[1]}"
                return f"nbd://127.0.0.1:{where[3]}"
            time.sleep(0.02)
        raise BenchError(f"{self.kind} not listening after {START_TIMEOUT:.0f} s:\n{self.log()}")

    @staticmethod
    def _connectable(where: list[str]) -> bool:
        """qemu-nbd says nothing when ready: try a connection (it logs the aborted handshake)."""
        if where[0] == "-k":
            if not os.path.exists(where[1]):
                return False
            probe = socket.socket(socket.AF_UNIX)
            address: str | tuple[str, int] = where[1]
        else:
            probe = socket.socket()
            address = ("127.0.0.1", int(where[3]))
        with probe:
            probe.settimeout(2)
            try:
                probe.connect(address)
            except OSError:
                return False
        return True

    def hwm_mib(self) -> float:
        return proc_hwm_mib(self.pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self in SERVERS:
            SERVERS.remove(self)

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def stop_all() -> None:
    for server in list(SERVERS):
        with contextlib.suppress(Exception):
            server.stop()


# ---------------------------------------------------------------- clients


Json = dict[str, Any]  # fio's JSON output, read as it comes


def fio(uri: str, options: list[str], out: Path, timeout: float) -> Json:
    """Run fio with the nbd engine on ``uri`` (global options first, then ``--name=`` jobs)."""
    run(
        ["fio", "--ioengine=nbd", f"--uri={uri}", "--output-format=json", f"--output={out}", *options],
        timeout,
    )
    text = out.read_text()
    result: Json = json.loads(text[text.index("{") :])
    return result


@dataclass
class FioTotals:
    ios: int
    nbytes: int
    seconds: float
    p50_ms: float  # latency percentiles of the busiest direction (total latency when fio has it)
    p99_ms: float

    @property
    def iops(self) -> float:
        return self.ios / self.seconds

    @property
    def mib_per_s(self) -> float:
        return self.nbytes / self.seconds / (1 << 20)


def fio_totals(job: Json) -> FioTotals:
    """Totals of one fio job (or of a group_reporting group): read, write and trim together."""
    parts: list[Json] = [job[d] for d in ("read", "write", "trim") if isinstance(job.get(d), dict)]
    ios = sum(int(p["total_ios"]) for p in parts)
    nbytes = sum(int(p["io_bytes"]) for p in parts)
    seconds = max(int(p["runtime"]) for p in parts) / 1000
    busiest = max(parts, key=lambda p: int(p["total_ios"]))
    pct: dict[str, float] = busiest.get("lat_ns", {}).get("percentile") or busiest["clat_ns"].get(
        "percentile", {}
    )
    return FioTotals(ios, nbytes, seconds, pct.get("50.000000", 0) / 1e6, pct.get("99.000000", 0) / 1e6)


def fio_job(result: Json, name: str | None = None) -> Json:
    jobs: list[Json] = result["jobs"]
    for job in jobs:
        if name is None or job["jobname"] == name:
            return job
    raise BenchError(f"no fio job {name!r}")


# ---------------------------------------------------------------- images


def qemu_img_create(path: Path, size: int) -> Path:
    run(["qemu-img", "create", "-q", "-f", "qed", str(path), str(size)])
    return path


def make_random_raw(path: Path, size_mib: int) -> Path:
    with open(path, "wb") as f:
        for _ in range(size_mib):
            f.write(os.urandom(1 << 20))
    return path


def make_filled_qed(raw: Path, path: Path) -> Path:
    """A QED image with every cluster allocated, holding the raw file's data (default geometry)."""
    run(["qemu-img", "convert", "-f", "raw", "-O", "qed", str(raw), str(path)])
    return path


def make_sparse_qed(path: Path, virtual: int, n_tables: int) -> Path:
    """``virtual`` bytes, one 64 KiB data cluster under each of ``n_tables`` L2 tables spread evenly
    (written by qemu-io, so neither tool under test made the image)."""
    qemu_img_create(path, virtual)
    total_tables = virtual // L2_SPAN
    step = max(1, total_tables // max(1, n_tables))
    writes = [f"write -P 1 {i * L2_SPAN} 64k" for i in range(0, total_tables, step)][:n_tables]
    for start in range(0, len(writes), 256):  # keep the argument list bounded
        args = ["qemu-io", "-f", "qed"]
        for w in writes[start : start + 256]:
            args += ["-c", w]
        run([*args, str(path)])
    return path


def drop_cache(path: Path, method: str) -> str:
    """Evict ``path`` from the page cache: 'drop' (all caches, /proc/sys/vm/drop_caches), 'fadvise'
    (posix_fadvise DONTNEED on the file) or 'auto' (drop when permitted). Returns the method used."""
    os.sync()  # dirty pages are not dropped
    if method in ("auto", "drop"):
        try:
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("3\n")
            return "drop_caches"
        except OSError:
            if method == "drop":
                raise
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return "fadvise"


def warm_file(path: Path) -> None:
    """Read a file once so that it is in the page cache."""
    with open(path, "rb", buffering=0) as f:
        while f.read(8 << 20):
            pass
