"""Many connections at once: 200 simultaneous clients, the ``-e`` client limit, and two connections
allocating into the same clusters and the same new L2 table (multi-conn honesty)."""

from __future__ import annotations

import os
import resource
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import qemu_img, qemu_io, run
from serverkit import RunningServer

from qednbd.nbd.constants import ClientFlag, Command, CommandFlag, Option, OptionReply
from server.rawcheck import KNOWN, assert_healthy, make_image
from server.rawclient import RawClient, pattern

MiB = 1 << 20
GiB = 1 << 30
StartServer = Callable[..., RunningServer]


def raise_fd_limit(needed: int) -> None:
    """Make sure this process (and the servers it starts) may open ``needed`` descriptors."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            pytest.fail(f"RLIMIT_NOFILE hard limit {hard} < {needed}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


# === 200 clients ======================================================================================


@pytest.mark.parametrize("unix", [False, True], ids=["tcp", "unix"])
def test_200_simultaneous_clients(nbd_server: StartServer, tmp_path: Path, unix: bool) -> None:
    count = 200
    raise_fd_limit(4 * count)
    server = nbd_server(make_image(tmp_path), unix=unix)
    baseline = open_fds(server.pid)
    clients: list[RawClient] = []
    try:
        for i in range(count):
            client = RawClient.to(server.uri())
            clients.append(client)
            client.handshake(structured=i % 2 == 0)
            offset = (i % 16) * 64 * 1024
            assert client.read_ok(offset, 4096) == KNOWN[offset : offset + 4096]
        assert open_fds(server.pid) >= baseline + count
        # every one of them at once: a request on each before any reply is read
        cookies = []
        for i, client in enumerate(clients):
            offset = ((i + 7) % 16) * 64 * 1024 + 512
            cookies.append(client.send_request(Command.READ, offset, 8192))
        for i, (client, cookie) in enumerate(zip(clients, cookies, strict=True)):
            offset = ((i + 7) % 16) * 64 * 1024 + 512
            result = client.wait(cookie)
            assert result.error == 0 and result.read_bytes() == KNOWN[offset : offset + 8192]
        # they leave: half with DISC, half by just closing
        for i, client in enumerate(clients):
            if i % 2:
                client.disconnect()
            client.close()
    finally:
        for client in clients:
            client.close()
    deadline = time.monotonic() + 10
    while open_fds(server.pid) > baseline and time.monotonic() < deadline:
        time.sleep(0.05)
    assert open_fds(server.pid) <= baseline, "the server kept sockets of clients that left"
    assert_healthy(server)


# === the client limit ===================================================================================


def test_client_limit_refuses_the_next_client_cleanly(nbd_server: StartServer, tmp_path: Path) -> None:
    server = nbd_server("-e", "3", make_image(tmp_path))
    served = [RawClient.to(server.uri()) for _ in range(3)]
    for client in served:
        client.handshake()

    # the fourth is told why, on every option, and may still abort politely
    fourth = RawClient.to(server.uri())
    fourth.read_greeting()
    fourth.send_client_flags()
    (refusal,) = fourth.opt_go().replies
    assert refusal.type == OptionReply.ERR_POLICY
    assert "limit" in refusal.message and "3" in refusal.message
    (listing,) = fourth.opt_list()
    assert listing.type == OptionReply.ERR_POLICY
    assert fourth.opt_abort().type == OptionReply.ACK
    assert fourth.wait_closed() == b""
    fourth.close()
    # EXPORT_NAME cannot carry the error: closed
    old_style = RawClient.to(server.uri())
    old_style.read_greeting()
    old_style.send_client_flags(ClientFlag.FIXED_NEWSTYLE)
    old_style.send_option(Option.EXPORT_NAME, b"")
    assert old_style.wait_closed() == b""
    old_style.close()

    # a libnbd client fails at once with an error from GO. libnbd 1.14 turns ERR_POLICY into
    # ENOTSUP ("Operation not supported") and prints the server's message only in debug output.
    env = {**os.environ, "PATH": "/usr/bin:/bin", "LIBNBD_DEBUG": "1"}
    nbdinfo = run(["nbdinfo", server.uri()], check=False, env=env, timeout=30)
    assert nbdinfo.returncode != 0
    assert "server replied with error to opt_go request" in nbdinfo.stderr, nbdinfo.stderr[-2000:]
    assert "server error message: the server is at its limit of 3 clients" in nbdinfo.stderr

    # the three go on working
    for i, client in enumerate(served):
        client.write_ok(2 * MiB + i * 4096, pattern(i, 4096))
        assert client.read_ok(0, len(KNOWN)) == KNOWN

    # one leaves: the next one is served (the server notices the close asynchronously)
    served[0].disconnect()
    assert served[0].wait_closed() == b""
    served[0].close()
    newcomer = next_served_client(server)
    for i in range(3):
        assert newcomer.read_ok(2 * MiB + i * 4096, 4096) == pattern(i, 4096)
    # and the limit holds again
    extra = RawClient.to(server.uri())
    extra.read_greeting()
    extra.send_client_flags()
    assert extra.opt_go().replies[-1].type == OptionReply.ERR_POLICY
    extra.close()
    for client in (*served[1:], newcomer):
        client.close()
    next_served_client(server).close()  # once the server has seen them go
    assert_healthy(server)


def next_served_client(server: RunningServer, timeout: float = 5.0) -> RawClient:
    """A client past GO, retrying while the server is still at its limit (bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        client = RawClient.to(server.uri())
        client.read_greeting()
        client.send_client_flags()
        replies = client.opt_go().replies
        if replies[-1].type == OptionReply.ACK:
            return client
        client.close()
        assert replies[-1].type == OptionReply.ERR_POLICY, replies
        assert time.monotonic() < deadline, "no client slot came free"
        time.sleep(0.05)


# === concurrency: same clusters, same new L2 table, two connections ===============================

SECTOR = 512
# QED defaults: 64 KiB clusters, 4-cluster tables, so one L2 table maps 2 GiB. The image is 6 GiB:
# the L2 table for 2-4 GiB does not exist until these writes, which race to create it.
TARGET_CLUSTERS = (2 * GiB, 2 * GiB + 64 * 1024, 3 * GiB, 4 * GiB - 64 * 1024, 16 * MiB, 5 * GiB)


def sector_byte(cluster: int, sector: int) -> int:
    return (cluster * 128 + sector) % 251 + 1


def test_two_connections_allocating_the_same_clusters_lose_nothing(
    nbd_server: StartServer, tmp_path: Path
) -> None:
    image = make_image(tmp_path, "6G")
    server = nbd_server(image, unix=True)
    connections = [RawClient.to(server.uri()), RawClient.to(server.uri())]
    for client in connections:
        client.handshake()
    errors: list[str] = []

    def writer(which: int) -> None:
        """Connection ``which`` writes every other sector of every target cluster, pipelined in
        batches of 16, reading replies only at the end."""
        client = connections[which]
        try:
            cookies = []
            batch = bytearray()
            n = 0
            for sector in range(which, 128, 2):
                for ci, cluster in enumerate(TARGET_CLUSTERS):
                    offset = cluster + sector * SECTOR
                    cookie = client.new_cookie()
                    flags = CommandFlag.FUA if n % 37 == 0 else 0
                    data = bytes([sector_byte(ci, sector)]) * SECTOR
                    batch += client.request_bytes(Command.WRITE, offset, SECTOR, flags, cookie) + data
                    client.expect(cookie, Command.WRITE, offset, SECTOR)
                    cookies.append(cookie)
                    n += 1
                    if n % 16 == 0:
                        client.send(batch)
                        batch.clear()
            client.send(batch)
            for cookie in cookies:
                result = client.wait(cookie)
                if result.error:
                    errors.append(f"connection {which}: {result.error} {result.message}")
        except Exception as exc:  # reported below, in the test's thread
            errors.append(f"connection {which}: {exc!r}")

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not any(t.is_alive() for t in threads) and not errors, errors

    # both connections see every sector, whoever wrote it
    for client in connections:
        for ci, cluster in enumerate(TARGET_CLUSTERS):
            want = b"".join(bytes([sector_byte(ci, s)]) * SECTOR for s in range(128))
            assert client.read_ok(cluster, 128 * SECTOR) == want, (ci, cluster)
    # FLUSH on ONE connection, after every write on both was answered; then kill the server
    assert connections[0].flush().error == 0
    assert server.stop(signal.SIGKILL) == -signal.SIGKILL
    for client in connections:
        client.close()

    # every write is in the file, read by QEMU straight from the tables as the server left them
    commands = [
        f"read -P {sector_byte(ci, s)} {cluster + s * SECTOR} {SECTOR}"
        for ci, cluster in enumerate(TARGET_CLUSTERS)
        for s in range(128)
    ]
    commands.append(f"read -P 1 0 {64 * 1024}")
    out = qemu_io(image, *commands, fmt="qed", timeout=120)
    text = out.stdout + out.stderr
    assert "verification failed" not in text and "error" not in text.lower(), text[:4000]
    assert text.count(f"read {SECTOR}/{SECTOR} bytes") == len(commands) - 1, text[:4000]
    # no corruption and no leak: a cluster allocated twice by racing connections would leak one
    check = qemu_img("check", "-f", "qed", image, check=False)
    assert check.returncode == 0 and "No errors were found" in check.stdout, check.stdout + check.stderr
    assert f"{16 + len(TARGET_CLUSTERS)}/" in check.stdout, check.stdout  # KNOWN's 16 + one per target

    # and our own server, restarted on the dirty image, repairs it and serves the same bytes
    again = nbd_server(image)
    client = RawClient.to(again.uri())
    client.handshake()
    for ci, cluster in enumerate(TARGET_CLUSTERS):
        want = b"".join(bytes([sector_byte(ci, s)]) * SECTOR for s in range(128))
        assert client.read_ok(cluster, 128 * SECTOR) == want
    client.close()
    assert_healthy(again)


def test_one_client_limit_does_not_advertise_multi_conn(nbd_server: StartServer, tmp_path: Path) -> None:
    """With -e 1 a client that opens several connections when told it may (nbdcopy) would be
    refused its second one; qemu-nbd also stops advertising multi-conn there."""
    image = make_image(tmp_path)
    env = {**os.environ, "PATH": "/usr/bin:" + os.environ.get("PATH", "")}
    single = nbd_server("-e", "1", image)
    assert run(["nbdinfo", "--can", "multi-conn", single.uri()], check=False, env=env).returncode == 2
    run(["nbdcopy", single.uri(), str(tmp_path / "copy.raw")], env=env)
    qemu_img("compare", "-U", "-f", "raw", "-F", "qed", tmp_path / "copy.raw", image)  # served: -U
    single.stop()
    unlimited = nbd_server(image)
    assert run(["nbdinfo", "--can", "multi-conn", unlimited.uri()], env=env).returncode == 0
