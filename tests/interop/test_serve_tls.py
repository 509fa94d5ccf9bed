"""TLS (STARTTLS with X.509) and --allow, with the real clients: nbdinfo/nbdcopy on nbds:// URIs
(libnbd, GnuTLS), qemu-img/qemu-io with a tls-creds-x509 object, and the raw client for what they
cannot show (a plaintext client against --tls require, EXPORT_NAME before TLS).

The PKI is made by the tests (tests/tlskit.py). Every server listens on 127.0.0.1 with an
ephemeral port, or a Unix socket in the test's directory.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from helpers import qednbd, qemu_img, qemu_io, run
from server.rawclient import RawClient
from tlskit import Pki, make_pki

from qednbd.nbd.constants import Option, OptionReply

pytestmark = pytest.mark.interop

LIBNBD_ENV = {**os.environ, "PATH": "/usr/bin:" + os.environ.get("PATH", "")}


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.qed"
    qemu_img("create", "-f", "qed", path, "64M")
    qemu_io(path, "write -P 0x61 0 1M", "write -P 0x62 5M 3M")
    return path


def nbds(base_uri: str, certs: Path, export: str = "") -> str:
    """The TLS form of a server's nbd:// URI, with libnbd's certificate directory."""
    assert base_uri.startswith("nbd://"), base_uri
    return f"nbds://{base_uri[len('nbd://') :]}/{export}?tls-certificates={certs}"


def nbdinfo(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["nbdinfo", *args], env=LIBNBD_ENV, capture_output=True, text=True, timeout=60, check=check
    )


def qemu_tls_opts(certs: Path, port: int, export: str) -> list[str]:
    return [
        "--object",
        f"tls-creds-x509,id=tls0,dir={certs},endpoint=client",
        "--image-opts",
        f"driver=nbd,host=127.0.0.1,port={port},export={export},tls-creds=tls0",
    ]


def test_require_serves_nbds_and_refuses_plaintext(nbd_server, pki: Pki, image: Path) -> None:
    server = nbd_server("--tls-creds", pki.server, image)
    info = json.loads(nbdinfo("--json", nbds(server.base_uri, pki.client)).stdout)
    assert info["TLS"] is True and info["exports"][0]["export-size"] == 64 << 20
    plain = nbdinfo(server.uri(), check=False)
    assert plain.returncode != 0 and "opt_go" in plain.stderr  # NBD_REP_ERR_TLS_REQD
    listing = nbdinfo("--list", server.uri(), check=False)
    assert listing.returncode != 0  # nothing, not even the list, without TLS
    assert "TLS" in server.log() and server.alive()


def test_nbdcopy_both_ways_over_tls(nbd_server, pki: Pki, image: Path, tmp_path: Path) -> None:
    server = nbd_server("--tls-creds", pki.server, image)
    uri = nbds(server.base_uri, pki.client)
    out = tmp_path / "out.raw"
    run(["nbdcopy", uri, str(out)], env=LIBNBD_ENV)  # READs of 64 KiB+ would be sendfile without TLS
    qemu_img("compare", "-U", "-f", "raw", "-F", "qed", out, image)  # -U: the server holds it
    src = tmp_path / "src.raw"
    src.write_bytes(os.urandom(3 << 20) + bytes(61 << 20))
    run(["nbdcopy", str(src), uri], env=LIBNBD_ENV)
    server.stop()
    qemu_img("compare", "-f", "raw", "-F", "qed", src, image)
    qemu_img("check", image)


def test_qemu_tools_over_tls(nbd_server, pki: Pki, image: Path) -> None:
    server = nbd_server("--tls-creds", pki.server, image)
    opts = qemu_tls_opts(pki.client, server.port, image.name)
    assert "virtual size: 64 MiB" in qemu_img("info", *opts).stdout
    io = run(["qemu-io", *opts, "-c", "write -P 0x5c 7M 1M", "-c", "read -P 0x5c 7M 1M"])
    assert "Pattern verification failed" not in io.stdout + io.stderr
    server.stop()
    qemu_io(image, "read -P 0x5c 7M 1M", "read -P 0x61 0 1M")


def test_verify_peer_wants_a_client_certificate_from_the_ca(nbd_server, pki: Pki, image: Path) -> None:
    server = nbd_server("--tls-creds", pki.server, "--tls-verify-peer", image)
    assert nbdinfo("--size", nbds(server.base_uri, pki.client)).stdout.strip() == str(64 << 20)
    for certs in (pki.anonymous, pki.stranger):
        failed = nbdinfo("--size", nbds(server.base_uri, certs), check=False)
        assert failed.returncode != 0, certs
    assert server.alive()
    assert nbdinfo("--size", nbds(server.base_uri, pki.client)).returncode == 0  # others go on


def test_tls_on_with_a_tls_only_export(nbd_server, pki: Pki, image: Path, tmp_path: Path) -> None:
    secret = tmp_path / "secret.qed"
    qemu_img("create", "-f", "qed", secret, "16M")
    config = tmp_path / "q.toml"
    config.write_text(
        f'tls = "on"\ntls-creds = "{pki.server}"\n'
        f'[exports.open]\nfile = "{image}"\n[exports.secret]\nfile = "{secret}"\ntls-only = true\n'
    )
    server = nbd_server("--config", config)
    assert nbdinfo("--size", server.uri("open")).stdout.strip() == str(64 << 20)  # plaintext
    refused = nbdinfo("--size", server.uri("secret"), check=False)
    assert refused.returncode != 0
    plain_list = nbdinfo("--list", "--json", server.uri(), check=False)
    listed = [e["export-name"] for e in json.loads(plain_list.stdout)["exports"]]
    assert listed == ["open"]
    assert nbdinfo("--size", nbds(server.base_uri, pki.client, "secret")).stdout.strip() == str(16 << 20)
    tls_list = json.loads(nbdinfo("--list", "--json", nbds(server.base_uri, pki.client)).stdout)
    assert sorted(e["export-name"] for e in tls_list["exports"]) == ["open", "secret"]


def test_raw_client_before_tls(nbd_server, pki: Pki, image: Path) -> None:
    server = nbd_server("--tls-creds", pki.server, image)
    with RawClient.tcp("127.0.0.1", server.port) as c:
        c.read_greeting()
        c.send_client_flags()
        for option in (Option.LIST, Option.STRUCTURED_REPLY):
            replies = c.option(option)
            assert [r.type for r in replies] == [OptionReply.ERR_TLS_REQD]
        c.send_option(Option.EXPORT_NAME, b"")
        c.wait_closed()  # EXPORT_NAME cannot carry the error: the server hangs up
    assert server.alive()


def test_tls_config_errors_are_one_line(nbd_server, pki: Pki, image: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        (["--tls", "require"], "needs --tls-creds"),
        (["--tls-verify-peer"], "needs TLS"),
        (["--tls-creds", empty], "server-cert.pem is missing"),
        (["--tls-creds", pki.client], "server-cert.pem is missing"),
        (["--tls-psk", tmp_path / "keys.psk"], "--tls-psk"),
        (["--allow", "10.0.0.300/8"], "not an address or network"),
    ]
    for args, reason in cases:
        proc = qednbd("serve", "-p", "0", *args, image)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 1 and len(lines) == 1 and reason in lines[0], (args, proc.stderr)
        assert "listening" not in proc.stderr


def test_allow_admits_only_listed_networks(nbd_server, image: Path) -> None:
    refused = nbd_server("--allow", "10.0.0.0/8", "--allow", "192.168.1.1", "-r", image)
    failed = nbdinfo("--size", refused.uri(), check=False)
    assert failed.returncode != 0 and "not in --allow" in refused.log()
    admitted = nbd_server("--allow", "10.0.0.0/8", "--allow", "127.0.0.0/8", "-r", image)
    assert nbdinfo("--size", admitted.uri()).stdout.strip() == str(64 << 20)
    unix = nbd_server("--allow", "10.0.0.0/8", "-r", image, unix=True)  # only TCP clients are checked
    assert nbdinfo("--size", unix.uri()).stdout.strip() == str(64 << 20)
