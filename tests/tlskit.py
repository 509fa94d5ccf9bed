"""A throwaway X.509 PKI for TLS tests, made with the openssl command.

``make_pki(root)`` writes a CA and, signed by it, a server certificate for ``127.0.0.1`` and
``localhost`` and a client certificate, laid out the way the three programs want them:

* ``root/server``: ``ca-cert.pem server-cert.pem server-key.pem`` (qednbd ``--tls-creds``,
  qemu-nbd's ``tls-creds-x509,endpoint=server``);
* ``root/client``: ``ca-cert.pem client-cert.pem client-key.pem`` (libnbd's
  ``tls-certificates=``, QEMU's ``tls-creds-x509,endpoint=client``);
* ``root/anonymous``: only ``ca-cert.pem`` (a client that verifies the server but has no
  certificate of its own);
* ``root/stranger``: a client certificate from a different CA.

GnuTLS (libnbd, QEMU) insists on the CA's basicConstraints/keyUsage and on the leaf's
subjectAltName and extendedKeyUsage, so they are all spelled out.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Pki:
    server: Path
    client: Path
    anonymous: Path
    stranger: Path


def _openssl(*args: object, cwd: Path) -> None:
    subprocess.run(["openssl", *map(str, args)], cwd=cwd, check=True, capture_output=True, timeout=60)


def _ca(work: Path, name: str) -> None:
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", f"{name}-key.pem", "-out", f"{name}-cert.pem", "-days", "3", "-subj", f"/CN={name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=work,
    )  # fmt: skip


def _leaf(work: Path, ca: str, name: str, cn: str, extensions: str) -> None:
    (work / f"{name}.ext").write_text(extensions)
    _openssl(
        "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", f"{name}-key.pem", "-out", f"{name}.csr", "-subj", f"/CN={cn}",
        cwd=work,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}-cert.pem", "-CAkey", f"{ca}-key.pem",
        "-CAcreateserial", "-out", f"{name}-cert.pem", "-days", "2", "-extfile", f"{name}.ext",
        cwd=work,
    )  # fmt: skip


def make_pki(root: Path) -> Pki:
    work = root / "work"
    work.mkdir(parents=True)
    _ca(work, "ca")
    _ca(work, "other-ca")
    usage = "keyUsage=critical,digitalSignature,keyEncipherment\n"
    server_ext = "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n" + usage
    _leaf(work, "ca", "server", "localhost", server_ext)
    _leaf(work, "ca", "client", "qednbd-test-client", "extendedKeyUsage=clientAuth\n" + usage)
    _leaf(work, "other-ca", "stranger", "stranger", "extendedKeyUsage=clientAuth\n" + usage)
    pki = Pki(root / "server", root / "client", root / "anonymous", root / "stranger")
    for d in (pki.server, pki.client, pki.anonymous, pki.stranger):
        d.mkdir()
        shutil.copy(work / "ca-cert.pem", d / "ca-cert.pem")
    for leaf, target in (("server", pki.server), ("client", pki.client)):
        shutil.copy(work / f"{leaf}-cert.pem", target / f"{leaf}-cert.pem")
        shutil.copy(work / f"{leaf}-key.pem", target / f"{leaf}-key.pem")
    shutil.copy(work / "stranger-cert.pem", pki.stranger / "client-cert.pem")
    shutil.copy(work / "stranger-key.pem", pki.stranger / "client-key.pem")
    return pki
