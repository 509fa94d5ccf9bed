"""``qednbd serve`` seen by ``nbdinfo`` (libnbd 1.14) and ``nbd-client -l``: what a client learns in
the handshake — size, flags, block sizes, meta contexts, descriptions, the export list."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import qemu_img, qemu_io, run

pytestmark = pytest.mark.interop

M = 1 << 20
CAN_FLAGS = (
    "can_cache",
    "can_df",
    "can_fast_zero",
    "can_flush",
    "can_fua",
    "can_multi_conn",
    "can_trim",
    "can_zero",
)


def make_qed(path: Path, size: str, *ops: str) -> Path:
    qemu_img("create", "-f", "qed", path, size)
    if ops:
        qemu_io(path, *ops)
    return path


def nbdinfo_json(*args: str) -> dict[str, object]:
    return json.loads(run(["nbdinfo", "--json", *args]).stdout)


def exports_by_name(doc: dict[str, object]) -> dict[str, dict[str, object]]:
    exports = doc["exports"]
    assert isinstance(exports, list)
    return {e["export-name"]: e for e in exports}


def test_plain_and_json(tmp_path: Path, nbd_server) -> None:  # type: ignore[no-untyped-def]
    image = make_qed(tmp_path / "disk.qed", "64M", "write -P 0x11 0 1M")
    server = nbd_server(image, "-D", "the demo disk")

    text = run(["nbdinfo", server.uri()]).stdout
    assert "protocol: newstyle-fixed without TLS, using structured packets" in text
    assert "export-size: 67108864 (64M)" in text
    assert "description: the demo disk" in text
    assert "is_read_only: false" in text

    doc = nbdinfo_json(server.uri("disk.qed"))
    assert doc["protocol"] == "newstyle-fixed" and doc["structured"] is True and doc["TLS"] is False
    (export,) = doc["exports"]  # type: ignore[misc]
    assert export["export-name"] == "disk.qed"
    assert export["export-size"] == 64 * M
    assert export["description"] == "the demo disk"
    assert export["is_read_only"] is False
    assert {flag: export[flag] for flag in CAN_FLAGS} == dict.fromkeys(CAN_FLAGS, True)
    # Minimum 1 (qemu-nbd says 512): qednbd serves byte-granular requests itself, so a client
    # need not read-modify-write; preferred is the page size, maximum the 32 MiB NBD advises.
    assert (export["block_size_minimum"], export["block_size_preferred"], export["block_size_maximum"]) == (
        1,
        4096,
        32 * M,
    )
    assert {"base:allocation", "qemu:allocation-depth"} <= set(export["contexts"])

    # The default export "" is the same export.
    default = nbdinfo_json(server.uri())["exports"][0]  # type: ignore[index]
    assert default["export-size"] == 64 * M and default["description"] == "the demo disk"


def test_size_can_is(tmp_path: Path, nbd_server) -> None:  # type: ignore[no-untyped-def]
    image = make_qed(tmp_path / "disk.qed", "100M")
    rw = nbd_server(image, unix=True)
    assert run(["nbdinfo", "--size", rw.uri()]).stdout.strip() == str(100 * M)
    for flag in ("multi-conn", "flush", "fua", "trim", "zero", "fast-zero", "cache", "df"):
        assert run(["nbdinfo", "--can", flag, rw.uri()], check=False).returncode == 0, flag
    assert run(["nbdinfo", "--is", "read-only", rw.uri()], check=False).returncode == 2
    assert rw.stop() == 0

    ro = nbd_server(image, "-r")
    assert run(["nbdinfo", "--is", "read-only", ro.uri()], check=False).returncode == 0
    assert run(["nbdinfo", "--can", "multi-conn", ro.uri()], check=False).returncode == 0
    # A read-only export offers no command it would refuse (as qemu-nbd -r): no trim, no zero.
    for flag, offered in (("trim", 2), ("zero", 2), ("fast-zero", 2), ("flush", 0), ("cache", 0), ("df", 0)):
        assert run(["nbdinfo", "--can", flag, ro.uri()], check=False).returncode == offered, flag
    assert nbdinfo_json(ro.uri())["exports"][0]["is_read_only"] is True  # type: ignore[index]


def test_list_several_files(tmp_path: Path, nbd_server) -> None:  # type: ignore[no-untyped-def]
    a = make_qed(tmp_path / "a.qed", "64M", "write -P 0xa 0 64k")
    b = make_qed(tmp_path / "b.qed", "1G")
    c = make_qed(tmp_path / "c.qed", "1000000")
    server = nbd_server(a, b, c, "-r")
    listed = exports_by_name(nbdinfo_json("--list", server.base_uri))
    assert {name: e["export-size"] for name, e in listed.items()} == {
        "a.qed": 64 * M,
        "b.qed": 1 << 30,
        "c.qed": 1000448,  # qemu-img rounds a size up to whole sectors
    }
    assert all(e["is_read_only"] is True for e in listed.values())
    # Several exports and no `default`: the empty name is unknown, and nbdinfo says so.
    proc = run(["nbdinfo", server.base_uri], check=False)
    assert proc.returncode != 0 and "--list" in proc.stderr
    assert run(["nbdinfo", "--size", server.uri("c.qed")]).stdout.strip() == "1000448"

    names = nbd_client_list(server.port)
    assert names == ["a.qed", "b.qed", "c.qed"]


def test_list_config_file(tmp_path: Path, nbd_server) -> None:  # type: ignore[no-untyped-def]
    images = tmp_path / "images"
    images.mkdir()
    make_qed(images / "disk.qed", "64M")
    make_qed(images / "golden.qed", "32M", "write -P 0x60 0 64k")
    extra = make_qed(tmp_path / "extra.qed", "16M")
    config = tmp_path / "exports.toml"
    config.write_text(
        'default = "disk"\n'
        "max-clients = 8\n"
        "[exports.disk]\n"
        'file = "images/disk.qed"\n'
        'description = "the demo disk"\n'
        "[exports.golden]\n"
        f'file = "{images / "golden.qed"}"\n'
        "read-only = true\n"
        'description = "golden master"\n'
    )
    server = nbd_server("--config", config, extra)  # a FILE argument adds an export

    listed = exports_by_name(nbdinfo_json("--list", server.base_uri))
    assert sorted(listed) == ["disk", "extra.qed", "golden"]
    assert listed["disk"]["export-size"] == 64 * M and listed["disk"]["is_read_only"] is False
    assert listed["disk"]["description"] == "the demo disk"
    assert listed["golden"]["export-size"] == 32 * M and listed["golden"]["is_read_only"] is True
    assert listed["golden"]["description"] == "golden master"
    assert listed["extra.qed"]["export-size"] == 16 * M and "description" not in listed["extra.qed"]

    # `default = "disk"`: the empty name selects it.
    assert run(["nbdinfo", "--size", server.uri()]).stdout.strip() == str(64 * M)
    assert run(["nbdinfo", "--is", "read-only", server.uri("golden")], check=False).returncode == 0
    assert run(["nbdinfo", "--is", "read-only", server.uri("disk")], check=False).returncode == 2

    text = run(["nbdinfo", "--list", server.base_uri]).stdout
    assert 'export="golden":' in text and "description: golden master" in text

    assert sorted(nbd_client_list(server.port)) == ["disk", "extra.qed", "golden"]


def nbd_client_list(port: int) -> list[str]:
    """``nbd-client -l 127.0.0.1 PORT``: one export per line after "Negotiation: ..", as
    ``NAME`` or ``NAME: DESCRIPTION``. No kernel module is needed to list."""
    out = run(["nbd-client", "-l", "127.0.0.1", str(port)], timeout=30).stdout
    lines = [line for line in out.splitlines() if line.strip()]
    assert lines[0].startswith("Negotiation:"), out
    return [line.split(": ", 1)[0] for line in lines[1:]]


def test_nbd_client_list_descriptions(tmp_path: Path, nbd_server) -> None:  # type: ignore[no-untyped-def]
    image = make_qed(tmp_path / "disk.qed", "8M")
    server = nbd_server(image, "-x", "vm-disk", "-D", "my VM")
    out = run(["nbd-client", "-l", "127.0.0.1", str(server.port)], timeout=30).stdout
    assert out.splitlines()[1:] == ["vm-disk: my VM"], out
    assert server.alive()
