"""The container image, built and run for real: deploy/Containerfile with buildah, run with podman.

No registry is reachable here, so the base image is made on the spot: ``debootstrap
--variant=minbase bookworm`` from the Debian mirror this machine's apt uses, copied into
``buildah from scratch`` and committed. ``buildah bud --isolation chroot`` then builds the
Containerfile on it (``--build-arg BASE=...``; apt and pip inside the build reach the Debian
mirror and PyPI). Everything lives in a private containers-storage root under the test's
temporary directory, removed at the end, so nothing touches the machine's own images.

``podman run --runtime runc`` (crun fails in this container) needs explicit ``--ulimit``s: podman
asks for more open files and processes than this container's hard limits allow, and without
CAP_SYS_RESOURCE runc cannot raise a limit ("error setting rlimit type 7/6: operation not
permitted"). The values come from this process's own hard limits.

The run: a host directory at the volume, the image created in it by the StatefulSet's init
container command, the server on an ephemeral 127.0.0.1 port; clients write and read; the
health check reports healthy; the container stops cleanly on SIGTERM. A second container on the
same directory, now with the Kubernetes ConfigMap's config and a TLS Secret laid out as the pod
mounts it (read-only root, no capabilities), serves the same data over TLS only. qemu-img check
is clean at the end.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import random
import re
import resource
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from deploykit import DEPLOY, IMAGE_UID, tool
from helpers import REPO_ROOT, qemu_img, read_features
from tlskit import make_pki

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

SUITE = "bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
BUILD_TIMEOUT = 600  # seconds for debootstrap, and for the image build (both download packages)
START_TIMEOUT = 60.0  # seconds for a container's server to listen
QED_NEED_CHECK = 0x2  # the dirty bit in the QED header's features
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
_names = itertools.count()


def debian_sources() -> list[tuple[str, list[str]]]:
    """(URI, suites) of this machine's apt sources for Debian ``SUITE`` (deb822 and one-line)."""
    found: list[tuple[str, list[str]]] = []
    apt = Path("/etc/apt")
    files = [apt / "sources.list", *sorted((apt / "sources.list.d").glob("*.list"))]
    for path in files:
        if path.is_file():
            for line in path.read_text().splitlines():
                words = re.sub(r"\[[^]]*\]", "", line.split("#", 1)[0]).split()
                if len(words) >= 3 and words[0] == "deb":
                    found.append((words[1], [words[2]]))
    for path in sorted((apt / "sources.list.d").glob("*.sources")):
        for stanza in re.split(r"\n\s*\n", path.read_text()):
            fields: dict[str, str] = {}
            for line in stanza.splitlines():
                if ":" in line and not line.startswith("#"):
                    key, value = line.split(":", 1)
                    fields[key.strip().lower()] = value.strip()
            if "deb" in fields.get("types", "").split() and fields.get("enabled", "yes") != "no":
                for uri in fields.get("uris", "").split():
                    found.append((uri, fields.get("suites", "").split()))
    return [(uri.rstrip("/"), [s for s in suites if s.startswith(SUITE)]) for uri, suites in found]


def debian_mirror() -> str:
    """The Debian archive (not the security one) that this machine's apt reaches."""
    for uri, suites in debian_sources():
        if SUITE in suites:
            return uri
    return DEFAULT_MIRROR


def base_sources_stanzas() -> str:
    """deb822 sources for the base image, like Debian's own images: main, updates, security."""
    stanzas = []
    for uri, suites in debian_sources():
        if suites:
            stanzas.append(
                f"Types: deb\nURIs: {uri}\nSuites: {' '.join(suites)}\nComponents: main\n"
                "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
            )
    return "\n".join(stanzas) or (
        f"Types: deb\nURIs: {DEFAULT_MIRROR}\nSuites: {SUITE}\nComponents: main\n"
        "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
    )


def ulimit_args() -> list[str]:
    """``--ulimit`` values runc can set here: no higher than this process's hard limits."""
    out = []
    for name, limit, cap in (
        ("nofile", resource.RLIMIT_NOFILE, 65536),
        ("nproc", resource.RLIMIT_NPROC, 4096),
    ):
        hard = resource.getrlimit(limit)[1]
        value = cap if hard == resource.RLIM_INFINITY else min(hard, cap)
        out += ["--ulimit", f"{name}={value}:{value}"]
    return out


@dataclass
class Containers:
    """buildah and podman on a private storage root; every container and image made is removed."""

    top: Path
    timings: dict[str, float] = field(default_factory=dict)

    def _global(self) -> list[str]:
        return [
            f"--root={self.top / 'storage'}",
            f"--runroot={self.top / 'run'}",
            "--storage-driver=overlay",
        ]

    def buildah(
        self, *args: str, timeout: float = 120, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        return self._run([tool("buildah"), *self._global(), *args], timeout, check)

    def podman(
        self, *args: str, timeout: float = 120, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        podman_only = [f"--tmpdir={self.top / 'libpod'}", f"--volumepath={self.top / 'volumes'}"]
        return self._run([tool("podman"), *self._global(), *podman_only, *args], timeout, check)

    @staticmethod
    def _run(cmd: list[str], timeout: float, check: bool) -> subprocess.CompletedProcess[str]:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
        if check and r.returncode != 0:
            raise AssertionError(
                f"exit {r.returncode}: {' '.join(cmd)}\n--- stdout ---\n{r.stdout[-6000:]}"
                f"--- stderr ---\n{r.stderr[-6000:]}"
            )
        return r

    def cleanup(self) -> None:
        with contextlib.suppress(Exception):
            self.podman("rm", "--all", "--force", "--time=0", timeout=120, check=False)
        with contextlib.suppress(Exception):
            self.buildah("rm", "--all", timeout=120, check=False)
        with contextlib.suppress(Exception):
            self.podman("rmi", "--all", "--force", timeout=120, check=False)
        # Anything still mounted under the storage root (an interrupted build) goes too.
        mounts = Path("/proc/self/mountinfo").read_text().splitlines()
        points = [line.split()[4] for line in mounts if line.split()[4].startswith(f"{self.top}/")]
        for point in sorted(points, key=len, reverse=True):
            subprocess.run(["umount", "-l", point], capture_output=True, timeout=30, check=False)
        shutil.rmtree(self.top, ignore_errors=True)


@dataclass(frozen=True)
class Image:
    containers: Containers
    name: str


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Image]:
    """The image built from deploy/Containerfile on a debootstrapped Debian 12 base."""
    work = tmp_path_factory.mktemp("container")
    # podman wants its runroot path under 50 characters: a short directory of our own.
    containers = Containers(Path(tempfile.mkdtemp(prefix="qednbd-containers-")))
    tag = f"{os.getpid()}"
    try:
        base = f"localhost/qednbd-test-base:{tag}"
        started = time.monotonic()
        rootfs = work / "rootfs"
        debootstrap = [
            tool("debootstrap"),
            "--variant=minbase",
            SUITE,
            str(rootfs),
            debian_mirror(),
        ]
        Containers._run(debootstrap, BUILD_TIMEOUT, check=True)
        # As in Debian's -slim images: no package lists, caches, docs or translations.
        for pattern in (
            "var/lib/apt/lists/*_*",
            "var/cache/apt/*.bin",
            "var/cache/apt/archives/*.deb",
            "usr/share/doc/*",
            "usr/share/man/*",
            "usr/share/info/*",
            "usr/share/locale/*",
            "var/log/*.log",
            "var/log/apt/*",
        ):
            for path in rootfs.glob(pattern):
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink()
        (rootfs / "etc/apt/sources.list").unlink(missing_ok=True)
        (rootfs / "etc/apt/sources.list.d/debian.sources").write_text(base_sources_stanzas())
        containers.timings["debootstrap"] = time.monotonic() - started

        started = time.monotonic()
        ctr = containers.buildah("from", "scratch").stdout.strip()
        mount = containers.buildah("mount", ctr).stdout.strip()
        Containers._run(["cp", "-a", f"{rootfs}/.", mount], 300, check=True)
        containers.buildah("umount", ctr)
        containers.buildah("config", "--cmd", "/bin/bash", ctr)
        containers.buildah("commit", "--quiet", ctr, base)
        containers.buildah("rm", ctr)
        shutil.rmtree(rootfs)
        containers.timings["base image"] = time.monotonic() - started

        started = time.monotonic()
        name = f"localhost/qednbd-test:{tag}"
        build = [
            "bud",
            "--isolation=chroot",
            "--format=docker",  # keeps HEALTHCHECK
            "--pull=never",
            f"--build-arg=BASE={base}",
            f"--file={DEPLOY / 'Containerfile'}",
            f"--ignorefile={DEPLOY / 'Containerfile.dockerignore'}",
            f"--tag={name}",
        ]
        if CA_BUNDLE.is_file():  # this machine's CA bundle, for a TLS-inspecting gateway on the way to PyPI
            build += ["--build-arg=PIP_CERT=/run/host-ca.pem", f"--volume={CA_BUNDLE}:/run/host-ca.pem:ro"]
        containers.buildah(*build, str(REPO_ROOT), timeout=BUILD_TIMEOUT)
        containers.timings["image build"] = time.monotonic() - started
        yield Image(containers, name)
    finally:
        containers.cleanup()
        assert not containers.top.exists()


@contextlib.contextmanager
def running(image: Image, volume: Path, *extra: str) -> Iterator[tuple[str, str]]:
    """A detached container serving ``volume``; yields (name, "127.0.0.1:PORT"); always removed."""
    name = f"qednbd-test-{os.getpid()}-{next(_names)}"
    podman = image.containers.podman
    try:
        podman(
            "run",
            "--detach",
            f"--name={name}",
            "--runtime=runc",
            "--pull=never",
            *ulimit_args(),
            "--publish=127.0.0.1::10809",
            f"--volume={volume}:/var/lib/qednbd",
            *extra,
            image.name,
        )
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            logs = podman("logs", name).stderr
            if "listening on" in logs and "export 'disk'" in logs:
                break
            state = podman("inspect", "--format={{.State.Status}}", name).stdout.strip()
            if state != "running" or time.monotonic() > deadline:
                raise AssertionError(f"container {state}, not listening:\n{logs}")
            time.sleep(0.1)
        address = podman("port", name, "10809/tcp").stdout.strip()
        assert re.fullmatch(r"127\.0\.0\.1:\d+", address), address
        yield name, address
    finally:
        podman("rm", "--force", "--time=0", name, check=False)


def stop(image: Image, name: str) -> str:
    """``podman stop`` (SIGTERM); the server must exit 0. Returns its log."""
    podman = image.containers.podman
    podman("stop", "--time=30", name, timeout=60)
    logs = podman("logs", name).stderr
    assert podman("inspect", "--format={{.State.ExitCode}}", name).stdout.strip() == "0", logs
    assert "SIGTERM" in logs, logs
    return logs


def client(*cmd: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, check=False)
    assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stdout}{r.stderr}"
    return r


def test_image_metadata(image: Image) -> None:
    inspect = image.containers.podman("image", "inspect", "--format=json", image.name).stdout
    (info,) = yaml.safe_load(inspect)  # JSON is YAML
    config = info["Config"]
    assert config["User"] == f"{IMAGE_UID}:{IMAGE_UID}"
    assert config["Entrypoint"] == ["qednbd", "serve", "--config", "/etc/qednbd/qednbd.toml"]
    assert "/var/lib/qednbd" in config["Volumes"]
    assert "10809/tcp" in config["ExposedPorts"]
    assert config["StopSignal"] == "SIGTERM"
    assert info["Healthcheck"]["Test"][0] == "CMD"  # podman reports it beside Config
    assert "/usr/local/bin/qednbd-healthcheck" in info["Healthcheck"]["Test"]
    size_mb = info["Size"] / 1e6
    image.containers.timings["image size MB"] = size_mb
    assert size_mb < 250, f"image is {size_mb:.0f} MB"
    # Nothing but the runtime: no pip, no compiler, no sources.
    r = image.containers.podman(
        "run",
        "--rm",
        "--runtime=runc",
        "--pull=never",
        *ulimit_args(),
        "--entrypoint=/bin/sh",
        image.name,
        "-c",
        "id -u; qednbd --version; ls /opt/qednbd/bin; test ! -e /src && echo no-src",
    )
    lines = r.stdout.split()
    assert lines[0] == str(IMAGE_UID)
    assert "pip" not in lines and "no-src" in lines, r.stdout


def test_serve_write_restart_tls_and_data_survives(image: Image, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    podman = image.containers.podman
    volume = tmp_path / "images"
    volume.mkdir(mode=0o750)
    os.chown(volume, IMAGE_UID, IMAGE_UID)
    disk = volume / "disk.qed"
    started = time.monotonic()

    # The StatefulSet's init container creates the image on an empty volume, and only then.
    statefulset = yaml.safe_load((DEPLOY / "k8s/statefulset.yaml").read_text())
    (init,) = statefulset["spec"]["template"]["spec"]["initContainers"]
    init_run = [
        "run",
        "--rm",
        "--runtime=runc",
        "--pull=never",
        *ulimit_args(),
        f"--volume={volume}:/var/lib/qednbd",
        "--env=DISK_SIZE=64M",
        f"--entrypoint={init['command'][0]}",
        image.name,
        *init["command"][1:],
    ]
    podman(*init_run)
    assert qemu_img("info", "--output=json", disk).stdout.count('"virtual-size": 67108864') == 1
    before = disk.stat().st_mtime_ns
    podman(*init_run)
    assert disk.stat().st_mtime_ns == before  # an existing image is left alone
    assert disk.stat().st_uid == IMAGE_UID

    data = random.Random(6).randbytes(4 << 20)
    source = tmp_path / "source.raw"
    source.write_bytes(data)

    # 1. The image as built: its own config (plaintext), its own user, the volume.
    with running(image, volume) as (name, address):
        uri = f"nbd://{address}"
        info = client("nbdinfo", uri).stdout
        assert "export-size: 67108864" in info and "qednbd container volume" in info, info
        client("nbdcopy", str(source), uri)
        w = client("qemu-io", "-f", "raw", "-c", "write -P 0xc3 40M 1M", uri).stdout
        assert "wrote 1048576/1048576" in w, w
        # The health check, as podman runs it (no systemd here for its timer: run it by hand).
        hc = podman("healthcheck", "run", name, check=False)
        assert hc.returncode == 0 and "unhealthy" not in hc.stdout, hc.stdout + hc.stderr
        assert podman("inspect", "--format={{.State.Health.Status}}", name).stdout.strip() == "healthy"
        bad = podman(
            "exec",
            name,
            "/usr/bin/python3",
            "/usr/local/bin/qednbd-healthcheck",
            "--port=1",
            "--timeout=2",
            check=False,
        )
        assert bad.returncode == 1 and "unhealthy" in bad.stderr, bad.stderr
        assert podman("exec", name, "id", "-u").stdout.strip() == str(IMAGE_UID)
        logs = stop(image, name)
    assert "written" in logs  # a connection summary line came out
    assert not read_features(disk) & QED_NEED_CHECK  # closed cleanly
    assert "No errors were found" in qemu_img("check", disk).stdout

    # 2. A new container on the same volume, configured as the Kubernetes pod is: the ConfigMap's
    # config, the TLS Secret's files, a read-only root, no capabilities.
    config_map = yaml.safe_load((DEPLOY / "k8s/configmap.yaml").read_text())
    config = tmp_path / "qednbd.toml"
    config.write_text(config_map["data"]["qednbd.toml"])
    config.chmod(0o644)
    pki = make_pki(tmp_path / "pki")
    secret = tmp_path / "tls"
    secret.mkdir()
    for item in ("ca-cert.pem", "server-cert.pem", "server-key.pem"):
        shutil.copy(pki.server / item, secret / item)
        os.chown(secret / item, 0, IMAGE_UID)
        (secret / item).chmod(0o440)  # the pod's defaultMode with fsGroup
    pod_like = [
        f"--volume={config}:/etc/qednbd/qednbd.toml:ro",
        f"--volume={secret}:/etc/qednbd/tls:ro",
        "--read-only",
        "--cap-drop=ALL",
        "--security-opt=no-new-privileges",
    ]
    with running(image, volume, *pod_like) as (name, address):
        tls_uri = f"nbds://{address}/disk?tls-certificates={pki.anonymous}"
        copy = tmp_path / "copy.raw"
        client("nbdcopy", tls_uri, str(copy))
        back = copy.read_bytes()
        assert len(back) == 64 << 20
        assert back[: len(data)] == data
        assert back[40 << 20 : 41 << 20] == b"\xc3" * (1 << 20)
        assert back[len(data) : 40 << 20].count(0) == (40 << 20) - len(data)
        plain = subprocess.run(
            ["nbdinfo", f"nbd://{address}/disk"], capture_output=True, text=True, timeout=60, check=False
        )
        assert plain.returncode != 0, plain.stdout  # TLS is required
        hc = podman("healthcheck", "run", name, check=False)
        assert hc.returncode == 0, hc.stdout + hc.stderr  # NBD_OPT_ABORT is allowed before TLS
        probe = statefulset["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["exec"]["command"]
        podman("exec", name, *probe)  # the pod's readiness probe, as the kubelet would run it
        w = client(
            "qemu-io",
            "--image-opts",
            "--object",
            f"tls-creds-x509,id=tls0,dir={pki.client},endpoint=client",
            "-c",
            "write -P 0x7e 60M 64k",
            f"driver=nbd,host=127.0.0.1,port={address.split(':')[1]},export=disk,tls-creds=tls0",
        ).stdout
        assert "wrote 65536/65536" in w, w
        stop(image, name)
    assert not read_features(disk) & QED_NEED_CHECK
    check = qemu_img("check", disk)
    assert "No errors were found" in check.stdout, check.stdout
    image.containers.timings["two containers, clients"] = time.monotonic() - started
    with capsys.disabled():
        summary = ", ".join(f"{k} {v:.1f}" for k, v in image.containers.timings.items())
        print(f"\n[deploy container timings, s] {summary}")
