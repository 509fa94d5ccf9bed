"""A QEMU guest with the export as its virtio disk: ext4 written in one boot, verified in the next.

The guest kernel and tools are Debian packages fetched by the test setup (see guestkit.py).
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
    expected_sums_file,
    script_make_fs_and_write,
    script_verify,
    serving,
)

pytestmark = [pytest.mark.slow, pytest.mark.interop]

EXPORT = "guestdisk"


def virtio_disk(sock: Path) -> list[str]:
    return ["-drive", f"file=nbd+unix:///{EXPORT}?socket={sock},format=raw,if=virtio,cache=writeback"]


def test_ext4_survives_a_server_restart(guest_kit: GuestKit, tmp_path: Path, sock_dir: Path) -> None:
    image = tmp_path / "guest.qed"
    qemu_img("create", "-f", "qed", image, "64M")
    sock = sock_dir / "nbd.sock"

    with serving(image, sock, EXPORT) as server:
        first = boot(
            guest_kit,
            tmp_path,
            script_make_fs_and_write("/dev/vda"),
            virtio_disk(sock),
            label="boot1",
            server=server,
        )
    assert not read_features(image) & NEED_CHECK, "the server left the dirty bit set after SIGTERM"
    assert set(first.sums) == {name for name, _ in GUEST_FILES}, first.tail()
    print(f"boot 1: {first.seconds:.1f} s (kernel up after {first.boot_seconds} s)")

    with serving(image, sock, EXPORT) as server:
        second = boot(
            guest_kit,
            tmp_path,
            script_verify("/dev/vda"),
            virtio_disk(sock),
            files={"expected.sha256": expected_sums_file(first.sums)},
            label="boot2",
            server=server,
        )
    assert not read_features(image) & NEED_CHECK, "the server left the dirty bit set after SIGTERM"
    assert second.sums == first.sums, second.tail()
    print(f"boot 2: {second.seconds:.1f} s (kernel up after {second.boot_seconds} s)")

    check_image_on_host(image, first.sums, tmp_path)
