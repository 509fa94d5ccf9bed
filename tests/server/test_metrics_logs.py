"""--metrics (Prometheus text, scraped while clients work) and --log-format json (one object per
line, a line per connection start and end with its totals, nothing per request at INFO)."""

from __future__ import annotations

import json
import re
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from helpers import REPO_ROOT, qednbd, qemu_img, qemu_io
from prometheus_client.parser import text_string_to_metric_families

from qednbd.nbd.constants import Command, Errno
from server.rawclient import RawClient
from server.test_lifecycle import set_need_check

pytestmark = pytest.mark.interop


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample name, sorted labels): value} from one scrape."""
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def metrics_url(server) -> str:  # type: ignore[no-untyped-def]
    """The address the server logged (just after it started listening)."""
    deadline = time.monotonic() + 10
    while (match := re.search(r"metrics on (http://[^\s\"]+)", server.log())) is None:
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.02)
    return match.group(1)


def value(samples, name: str, **labels: str) -> float:  # type: ignore[no-untyped-def]
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.qed"
    qemu_img("create", "-f", "qed", path, "64M")
    qemu_io(path, "write -P 0x61 0 4M")
    return path


def test_metrics_count_what_clients_do(nbd_server, image: Path) -> None:
    server = nbd_server("--metrics", "127.0.0.1:0", image, unix=True)
    url = metrics_url(server)
    before = scrape(url)
    assert value(before, "qednbd_requests_total", export="disk.qed", command="READ") == 0
    assert value(before, "qednbd_startup_check", export="disk.qed", outcome="clean") == 1
    with RawClient.unix(server.socket_path) as c:
        c.handshake()
        for i in range(10):
            c.wait(c.send_request(Command.READ, i * 4096, 4096))
        c.wait(c.send_request(Command.WRITE, 8 << 20, payload=b"w" * 65536))  # allocating
        c.wait(c.send_request(Command.READ, 0, 1 << 20))
        bad = c.wait(c.send_request(Command.READ, 64 << 20, 512))  # past the end
        assert bad.error == Errno.EINVAL
        c.wait(c.send_request(Command.FLUSH))
        during = scrape(url)  # while the client is connected
        assert value(during, "qednbd_connections", export="disk.qed") == 1
        assert value(during, "qednbd_dirty", export="disk.qed") == 1  # the allocating write set it
    assert value(during, "qednbd_requests_total", export="disk.qed", command="READ") == 12
    assert value(during, "qednbd_bytes_total", export="disk.qed", command="READ") == 10 * 4096 + (1 << 20)
    assert value(during, "qednbd_requests_total", export="disk.qed", command="WRITE") == 1
    assert value(during, "qednbd_bytes_total", export="disk.qed", command="WRITE") == 65536
    assert value(during, "qednbd_requests_total", export="disk.qed", command="FLUSH") == 1
    assert value(during, "qednbd_errors_total", export="disk.qed", errno="EINVAL") == 1
    assert value(during, "qednbd_request_seconds_count", export="disk.qed", command="READ") == 12
    assert value(during, "qednbd_request_seconds_bucket", export="disk.qed", command="READ", le="+Inf") == 12
    assert 0 < value(during, "qednbd_request_seconds_sum", export="disk.qed", command="READ") < 10
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # the connection's end is counted once the server sees it
        after = scrape(url)
        if value(after, "qednbd_connections", export="disk.qed") == 0:
            break
        time.sleep(0.05)
    assert value(after, "qednbd_connections", export="disk.qed") == 0
    assert value(after, "qednbd_connections_opened_total", export="disk.qed") == 1


def test_metrics_while_nbdcopy_streams(nbd_server, image: Path, tmp_path: Path) -> None:
    server = nbd_server("--metrics", "127.0.0.1:0", "-r", image)
    url = metrics_url(server)
    copy = subprocess.Popen(
        ["nbdcopy", "--connections=2", server.uri(), str(tmp_path / "out.raw")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        samples = [scrape(url) for _ in range(5)]
        assert copy.wait(60) == 0
    finally:
        if copy.poll() is None:
            copy.kill()
            copy.wait(10)
    final = scrape(url)
    read = value(final, "qednbd_bytes_total", export="disk.qed", command="READ")
    assert read == 4 << 20  # the data, once (nbdcopy skips what BLOCK_STATUS calls holes)
    counts = [value(s, "qednbd_bytes_total", export="disk.qed", command="READ") for s in samples]
    assert counts == sorted(counts)  # monotonic while it ran
    assert value(final, "qednbd_connections_opened_total", export="disk.qed") >= 2


def test_startup_repair_is_reported(nbd_server, image: Path) -> None:
    set_need_check(image)
    server = nbd_server("--metrics", "127.0.0.1:0", image)
    samples = scrape(metrics_url(server))
    outcomes = [k[1] for k, v in samples.items() if k[0] == "qednbd_startup_check" and v == 1]
    assert outcomes == [(("export", "disk.qed"), ("outcome", "nothing-to-repair"))], outcomes
    assert value(samples, "qednbd_dirty", export="disk.qed") == 0  # repaired and cleared


def test_json_log_lines(nbd_server, image: Path) -> None:
    server = nbd_server("--log-format", "json", image, unix=True)
    qemu_io(server.uri(), "write -P 0x33 0 64k", "read -P 0x33 0 64k", "read 1M 4k", fmt="raw")
    server.stop()
    lines = [json.loads(line) for line in server.log().splitlines() if line.strip()]
    assert all({"time", "level", "logger", "message"} <= set(line) for line in lines)
    connects = [line for line in lines if line.get("event") == "connect"]
    ends = [line for line in lines if line.get("event") == "disconnect"]
    assert len(connects) == len(ends) == 1  # one line each way, nothing per request
    end = ends[0]
    assert end["export"] == "disk.qed" and end["client"] == "unix socket" and end["tls"] is False
    assert end["bytes_written"] == 65536 and end["bytes_read"] == 65536 + 4096 and end["errors"] == 0
    assert end["requests"] >= 3 and end["seconds"] >= 0
    assert len(lines) <= 6, lines  # listening, export, connect, disconnect, shutdown lines


def test_text_log_is_the_default_and_metrics_errors_are_one_line(nbd_server, image: Path) -> None:
    server = nbd_server(image)
    assert all(line.startswith("qednbd: ") for line in server.log().splitlines())
    for bad in ("9100", "localhost:http", "127.0.0.1:70000"):
        proc = qednbd("serve", "-p", "0", "--metrics", bad, image)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 1 and len(lines) == 1 and "HOST:PORT" in lines[0], proc.stderr


def test_a_failing_read_is_logged_and_counted_as_an_error_not_as_data(nbd_server, tmp_path: Path) -> None:
    damaged = tmp_path / "l2-past-eof.qed"
    damaged.write_bytes((REPO_ROOT / "tests" / "data" / "l2-past-eof.qed").read_bytes())
    server = nbd_server("-r", "--metrics", "127.0.0.1:0", damaged, unix=True)
    url = metrics_url(server)
    with RawClient.unix(server.socket_path) as c:
        c.handshake()
        result = c.wait(c.send_request(Command.READ, 8192, 512))  # L2 entry 2 points past EOF
        assert result.error == Errno.EIO
    samples = scrape(url)
    assert value(samples, "qednbd_errors_total", export="l2-past-eof.qed", errno="EIO") == 1
    assert value(samples, "qednbd_requests_total", export="l2-past-eof.qed", command="READ") == 1
    assert value(samples, "qednbd_bytes_total", export="l2-past-eof.qed", command="READ") == 0
    assert re.search(r"export 'l2-past-eof.qed': READ of 512 bytes at 8192 failed: .*offset", server.log())
