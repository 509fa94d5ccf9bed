"""The kernel's own NBD client: Debian's nbd-client inside a QEMU guest attaches the export as /dev/nbd0.

The guest has no network but loopback. Its way to the server is a virtio-serial port whose host side is a
QEMU chardev dialling the server's Unix socket; inside the guest, Debian's ``socat`` listens on
127.0.0.1:10809 and relays the one connection nbd-client makes to that port.

Order matters. The server drops a handshake not finished within 10 s, and a guest under TCG needs ~4 s
(more on a busy machine) from QEMU's start to nbd-client, so the chardev must not connect at QEMU's start.
It dials, once a second (``reconnect=1``), a symlink to the server's socket that the test creates only when
the guest says its relay listens; nbd-client is then already connected to socat and waiting for the
greeting. While the host side is not connected the guest reads EOF from the port, which socat's
``ignoreeof`` turns into "wait for data". (Busybox ``nc -l -e`` with ``nc -f PORT`` can relay too, but
without TCP_NODELAY every request then waits for a 40 ms delayed ACK: mkfs took 10 s instead of 1.)
"""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import qemu_img, read_features

from guest.guestkit import (
    GUEST_FILES,
    NEED_CHECK,
    GuestKit,
    boot,
    check_image_on_host,
    script_make_fs_and_write,
    serving,
)

pytestmark = [pytest.mark.slow, pytest.mark.interop]

EXPORT = "kerneldisk"
PORT_NAME = "qednbd"
GUEST_PORT = 10809


def nbd_client_script(export: str) -> str:
    attach = f"""
ip link set lo up || fail "ip link set lo up"
port=""
for p in /sys/class/virtio-ports/*; do
    [ "$(cat "$p/name" 2>/dev/null)" = {PORT_NAME} ] && port=/dev/${{p##*/}}
done
[ -n "$port" ] || fail "no virtio-serial port named {PORT_NAME}"
wait_for "$port" 20 || fail "$port did not appear"
/sbin/socat TCP-LISTEN:{GUEST_PORT},bind=127.0.0.1,reuseaddr,nodelay "OPEN:$port,ignoreeof" &
i=0
until netstat -ltn | grep -q ':{GUEST_PORT} '; do
    i=$((i + 1)); [ "$i" -gt 100 ] && fail "the relay does not listen on port {GUEST_PORT}"; usleep 100000
done
echo "QEDNBD-GUEST: RELAY-READY"
/sbin/nbd-client 127.0.0.1 {GUEST_PORT} /dev/nbd0 -N {export} || fail "nbd-client -N {export}"
i=0
until [ "$(cat /sys/block/nbd0/size)" -gt 0 ]; do
    i=$((i + 1)); [ "$i" -gt 100 ] && fail "/dev/nbd0 has no size after nbd-client"; usleep 100000
done
echo "QEDNBD-GUEST: ATTACHED $(cat /sys/block/nbd0/size) sectors"
"""
    detach = """
/sbin/nbd-client -d /dev/nbd0 || fail "nbd-client -d /dev/nbd0"
i=0
while [ "$(cat /sys/block/nbd0/size)" -gt 0 ] || [ -e /sys/block/nbd0/pid ]; do
    i=$((i + 1)); [ "$i" -gt 100 ] && fail "/dev/nbd0 still attached after nbd-client -d"; usleep 100000
done
echo "QEDNBD-GUEST: DETACHED"
"""
    return attach + script_make_fs_and_write("/dev/nbd0") + detach


def relayed_serial_port(path: Path) -> list[str]:
    """QEMU arguments: a virtio-serial port named PORT_NAME whose host side dials the Unix socket ``path``,
    retrying every second until it exists."""
    return [
        "-chardev", f"socket,id=nbd0,path={path},reconnect=1",
        "-device", "virtio-serial-pci",
        "-device", f"virtserialport,chardev=nbd0,name={PORT_NAME}",
    ]  # fmt: skip


def test_kernel_nbd_client_writes_ext4(guest_kit: GuestKit, tmp_path: Path, sock_dir: Path) -> None:
    image = tmp_path / "kernel.qed"
    qemu_img("create", "-f", "qed", image, "64M")
    sock = sock_dir / "nbd.sock"
    # QEMU's chardev dials this path, which exists only once the guest's relay listens (see the docstring).
    late_link = sock_dir / "late.sock"

    with serving(image, sock, EXPORT) as server:
        run = boot(
            guest_kit,
            tmp_path,
            nbd_client_script(EXPORT),
            relayed_serial_port(late_link),
            label="nbd-client",
            server=server,
            on_marker={"RELAY-READY": lambda: late_link.symlink_to(sock)},
        )
    assert not read_features(image) & NEED_CHECK, "the server left the dirty bit set after SIGTERM"
    words = [w for w, _ in run.markers]
    assert "ATTACHED" in words and "DETACHED" in words, run.tail()
    assert dict(run.markers)["ATTACHED"] == f"{64 * 1024 * 2} sectors", run.tail()
    assert set(run.sums) == {name for name, _ in GUEST_FILES}, run.tail()
    print(f"nbd-client guest: {run.seconds:.1f} s (kernel up after {run.boot_seconds} s)")

    check_image_on_host(image, run.sums, tmp_path)
