"""qednbd serve vs qemu-nbd on copies of the same QED image, side by side in one run.

    python bench/serve_bench.py [--size-mib 512] [--rounds 3] [--tcp]

Each workload runs against both servers in alternating rounds; the table shows the median
seconds (lower is better) or latency, and the ratio qednbd / qemu-nbd (< 1 means qednbd is
faster). Workloads: nbdcopy download (1 and 4 connections), nbdcopy upload into a fresh image,
fio 4 KiB random read and write (queue depth 16), and the latency of 4 KiB reads on one
connection while another connection reads 32 MiB requests (does big I/O stall other clients?).
qemu-nbd runs as `qemu-nbd -f qed -t -e 0 -A` (its default cache mode, like ours: page cache).
Needs qemu-nbd, nbdcopy, fio and Debian's python3-libnbd (/usr/bin/python3).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

STALL_PROBE = r"""
import sys, threading, time, nbd
uri, big = sys.argv[1], 32 << 20
stop = False
def hog():
    h = nbd.NBD(); h.connect_uri(uri); size = h.get_size(); off = 0
    while not stop:
        h.pread(big, off); off = (off + big) % (size - big)
h = nbd.NBD(); h.connect_uri(uri); size = h.get_size()
t = threading.Thread(target=hog); t.start(); time.sleep(0.2)
lat = []
for i in range(2000):
    s = time.perf_counter(); h.pread(4096, (i * 7919 * 4096) % (size - 4096))
    lat.append(time.perf_counter() - s)
stop = True; t.join(); lat.sort()
print(lat[len(lat) // 2], lat[int(len(lat) * 0.99)], lat[-1])
"""


class Server:
    def __init__(self, kind: str, image: Path, sock: Path, tcp: bool) -> None:
        self.kind = kind
        if kind == "qednbd":
            where = ["-b", "127.0.0.1", "-p", "0"] if tcp else ["-k", str(sock)]
            cmd = [sys.executable, "-m", "qednbd", "serve", *where, str(image)]
        else:
            where = ["-b", "127.0.0.1", "-p", str(_free_port())] if tcp else ["-k", str(sock)]
            cmd = ["qemu-nbd", "-f", "qed", "-t", "-e", "0", "-A", *where, str(image)]
        self.log = sock.with_suffix(".log")
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        self.uri = self._wait(tcp, sock, cmd)

    def _wait(self, tcp: bool, sock: Path, cmd: list[str]) -> str:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.kind == "qednbd":
                text = self.log.read_text()
                if "listening on" in text and "export " in text:
                    return text.split("listening on ", 1)[1].split()[0]
            elif tcp:
                port = cmd[cmd.index("-p") + 1]
                if (
                    subprocess.run(
                        ["nbdinfo", "--size", f"nbd://127.0.0.1:{port}"], capture_output=True
                    ).returncode
                    == 0
                ):
                    return f"nbd://127.0.0.1:{port}"
            elif sock.exists():
                return f"nbd+unix:///?socket={sock}"
            time.sleep(0.05)
        raise SystemExit(f"{self.kind} did not start: {self.log.read_text()}")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(30)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    return time.perf_counter() - start


def _fio(uri: str, rw: str, size_mib: int) -> float:
    out = subprocess.run(
        [
            "fio",
            "--name=b",
            "--ioengine=nbd",
            f"--uri={uri}",
            f"--rw={rw}",
            "--bs=4k",
            "--iodepth=16",
            f"--size={min(size_mib, 256)}M",
            "--runtime=5",
            "--time_based",
            "--output-format=json",
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    job = json.loads(out[out.index("{") :])["jobs"][0]
    iops = job["read"]["iops"] + job["write"]["iops"]
    return 1.0 / iops  # seconds per op, so that lower is better like the others


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tcp", action="store_true", help="TCP on 127.0.0.1 instead of Unix sockets")
    args = ap.parse_args()
    for tool in ("qemu-nbd", "nbdcopy", "fio", "qemu-img"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is needed")
    work = Path(tempfile.mkdtemp(prefix="qednbd-bench-"))
    try:
        raw = work / "src.raw"
        with open(raw, "wb") as f:
            for _ in range(args.size_mib):
                f.write(os.urandom(1 << 20))
        subprocess.run(
            ["qemu-img", "convert", "-f", "raw", "-O", "qed", str(raw), str(work / "data.qed")], check=True
        )
        results: dict[str, dict[str, list[float]]] = {}

        def record(name: str, kind: str, value: float) -> None:
            results.setdefault(name, {}).setdefault(kind, []).append(value)

        for _ in range(args.rounds):
            for kind in ("qednbd", "qemu-nbd"):
                image = work / f"{kind}.qed"
                shutil.copyfile(work / "data.qed", image)
                server = Server(kind, image, work / f"{kind}.sock", args.tcp)
                try:
                    for conns in (1, 4):
                        record(
                            f"nbdcopy read, {conns} conn (s)",
                            kind,
                            _timed(["nbdcopy", f"--connections={conns}", server.uri, "null:"]),
                        )
                    record(
                        "fio randread 4k qd16 (us/op)",
                        kind,
                        _fio(server.uri, "randread", args.size_mib) * 1e6,
                    )
                    record(
                        "fio randwrite 4k qd16 (us/op)",
                        kind,
                        _fio(server.uri, "randwrite", args.size_mib) * 1e6,
                    )
                    _p50, p99, worst = map(
                        float,
                        subprocess.run(
                            ["/usr/bin/python3", "-c", STALL_PROBE, server.uri],
                            check=True,
                            capture_output=True,
                            text=True,
                        ).stdout.split(),
                    )
                    record("4k read beside 32M reads p99 (ms)", kind, p99 * 1e3)
                    record("4k read beside 32M reads max (ms)", kind, worst * 1e3)
                finally:
                    server.stop()
                fresh = work / f"{kind}-up.qed"
                subprocess.run(
                    ["qemu-img", "create", "-f", "qed", str(fresh), f"{args.size_mib}M"],
                    check=True,
                    capture_output=True,
                )
                server = Server(kind, fresh, work / f"{kind}-up.sock", args.tcp)
                try:
                    record(
                        "nbdcopy write, fresh image (s)",
                        kind,
                        _timed(["nbdcopy", "--flush", str(raw), server.uri]),
                    )
                finally:
                    server.stop()
        print(f"{'workload':40} {'qednbd':>10} {'qemu-nbd':>10} {'ratio':>7}")
        for name, by_kind in results.items():
            ours, theirs = statistics.median(by_kind["qednbd"]), statistics.median(by_kind["qemu-nbd"])
            print(f"{name:40} {ours:10.3f} {theirs:10.3f} {ours / theirs:7.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
