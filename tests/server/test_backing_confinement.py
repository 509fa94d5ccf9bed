"""Backing files stay inside the directory of their image (or one the operator allows with
--allow-backing): otherwise `qednbd serve` refuses to start, with one line naming the file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import qednbd, qemu_img, qemu_io

pytestmark = pytest.mark.interop


def make_chain(top_dir: Path, base: Path, *, relative: bool = False) -> Path:
    """``top_dir/top.qed`` over ``base`` (a QED image with a pattern)."""
    base.parent.mkdir(parents=True, exist_ok=True)
    qemu_img("create", "-f", "qed", base, "8M")
    qemu_io(base, "write -P 0x42 0 64k")
    top_dir.mkdir(parents=True, exist_ok=True)
    top = top_dir / "top.qed"
    name = os.path.relpath(base, top_dir) if relative else str(base)
    qemu_img("create", "-f", "qed", "-b", name, "-F", "qed", top, "8M")
    return top


def refused(*args: object) -> str:
    proc = qednbd("serve", "-p", "0", *args)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr
    assert "listening" not in proc.stderr and "Traceback" not in proc.stderr
    return lines[0]


def test_backing_in_the_same_directory_is_served(nbd_server, tmp_path: Path) -> None:
    top = make_chain(tmp_path / "a", tmp_path / "a" / "sub" / "base.qed", relative=True)
    server = nbd_server(top)
    qemu_io(server.uri(), "read -P 0x42 0 64k", fmt="raw")


@pytest.mark.parametrize("relative", [False, True], ids=["absolute", "dot-dot"])
def test_backing_elsewhere_is_refused_unless_allowed(nbd_server, tmp_path: Path, relative: bool) -> None:
    top = make_chain(tmp_path / "a", tmp_path / "b" / "base.qed", relative=relative)
    line = refused(top)
    assert "base.qed" in line and "outside the image's directory" in line and "--allow-backing" in line
    server = nbd_server("--allow-backing", tmp_path / "b", top)
    qemu_io(server.uri(), "read -P 0x42 0 64k", fmt="raw")


def test_a_symlink_does_not_get_out(tmp_path: Path) -> None:
    outside = tmp_path / "b" / "base.qed"
    top = make_chain(tmp_path / "a", outside)
    (tmp_path / "a" / "link.qed").symlink_to(outside)
    qemu_img("rebase", "-u", "-b", "link.qed", "-F", "qed", "-f", "qed", top)
    assert "outside the image's directory" in refused(top)


def test_the_whole_chain_is_checked(nbd_server, tmp_path: Path) -> None:
    lowest = tmp_path / "b" / "lowest.qed"
    make_chain(tmp_path / "a" / "mid", lowest)  # a/mid/top.qed -> b/lowest.qed (absolute)
    top = tmp_path / "a" / "top.qed"
    qemu_img("create", "-f", "qed", "-b", "mid/top.qed", "-F", "qed", top, "8M")
    assert "lowest.qed" in refused(top)  # the first level is inside; the second is not
    config = tmp_path / "q.toml"
    config.write_text(f'allow-backing = ["b"]\n[exports.t]\nfile = "{top}"\n')  # relative to the file
    server = nbd_server("--config", config)
    qemu_io(server.uri(), "read -P 0x42 0 64k", fmt="raw")
    assert "not a directory" in refused("--allow-backing", tmp_path / "nope", top)
