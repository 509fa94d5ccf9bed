"""Support for the guest tests: a tiny Linux guest booted under QEMU (TCG) against our NBD server.

The guest's ingredients are Debian packages fetched by the test setup, never committed:

- ``linux-image-*-cloud-amd64`` (the concrete package ``linux-image-cloud-amd64`` depends on): the kernel
  and the few modules the guest loads (virtio, virtio_blk, virtio_console, nbd and what they need);
- ``busybox-static``: the shell, ``/init`` and every small tool in the guest;
- ``e2fsprogs``: ``mke2fs`` and ``/etc/mke2fs.conf``;
- ``nbd-client``: Debian's ``nbd-client`` for the kernel's NBD driver;
- ``socat`` (and ``libwrap0``, which the host lacks): the guest's loopback-to-virtio-serial relay.

``apt-get download`` fetches them at the candidate versions that ``apt-cache policy`` names (after one
``apt-get update`` if apt knows none), ``dpkg-deb -x`` unpacks them, and the pieces the guest needs are kept
in a cache directory named after those versions (``$QEDNBD_GUEST_CACHE``, else
``$XDG_CACHE_HOME/qednbd-guest``, else ``/var/tmp/qednbd-guest``; the newest two package sets are kept), so
a second run downloads nothing. The other shared libraries of ``mke2fs``, ``nbd-client`` and ``socat`` are
copied from the host (Debian 12 too) as ``ldd`` resolves them. The initramfs (cpio "newc") is written here
in Python: busybox with ``/init`` as a shell script, the modules (loaded with ``insmod`` in dependency
order, read from each module's ``.modinfo``, since the package ships no ``modules.dep``), the binaries and
their libraries. Each boot appends a second small gzipped archive holding its own ``/test.sh``, which
``/init`` sources. Only when apt cannot reach the mirror (and nothing is cached) do the tests skip.

QEMU runs with ``-cpu max``: its RDRAND lets the kernel's random pool be ready at once; under ``qemu64``
every ``getrandom`` caller (mke2fs, gnutls in nbd-client) waited seconds for jitter entropy.

The guest reports through the serial console with lines ``QEDNBD-GUEST: <WORD> ...`` (``SUM <sha256>
<name>``, ``OK``, ``FAIL <reason>``) and powers off with ``poweroff -f``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import gzip
import hashlib
import io
import itertools
import json
import lzma
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

from helpers import REPO_ROOT

MARK = "QEDNBD-GUEST:"
NEED_CHECK = 0x02  # the QED header's dirty bit, in its features field
KERNEL_META_PACKAGE = "linux-image-cloud-amd64"
# socat relays the guest's 127.0.0.1:10809 to the virtio-serial port with TCP_NODELAY (busybox nc does not
# set it, which costs a 40 ms delayed ACK per request); libwrap0 is the one library of it the host lacks.
PACKAGES = ("busybox-static", "e2fsprogs", "nbd-client", "socat", "libwrap0")
# Modules the guest loads when they are not built in; their dependencies come along.
WANTED_MODULES = ("virtio_pci", "virtio_blk", "virtio_console", "nbd")
# Binaries copied from the unpacked packages into the guest, with the host libraries ldd names for them.
GUEST_BINARIES = {
    "sbin/mke2fs": "sbin/mke2fs",
    "sbin/nbd-client": "sbin/nbd-client",
    "sbin/socat": "bin/socat",
}
APT_TIMEOUT_S = 300.0
LAYOUT_VERSION = "2"  # bump when the cached layout changes
KEEP_CACHED = 2  # package sets kept in the cache

# apt's words for "the mirror cannot be reached"; anything else that goes wrong is a failure, not a skip.
_NETWORK_ERRORS = re.compile(
    r"Could not resolve|Temporary failure resolving|Unable to connect|Could not connect|"
    r"Connection failed|Network is unreachable|Connection timed out|No route to host",
    re.IGNORECASE,
)


class GuestUnavailable(Exception):
    """The guest cannot be built because the package mirror cannot be reached (the tests skip)."""


class GuestSetupError(AssertionError):
    """Building the guest failed for a reason other than the network (the tests fail)."""


class _StaleLists(Exception):
    """apt's lists name versions the mirror no longer has (404): update them and try again."""


# -- fetching and caching the packages ------------------------------------------------------------


def cache_root() -> Path:
    if os.environ.get("QEDNBD_GUEST_CACHE"):
        return Path(os.environ["QEDNBD_GUEST_CACHE"])
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "qednbd-guest"
    return Path("/var/tmp/qednbd-guest")


def _run(
    cmd: Sequence[str], timeout: float = APT_TIMEOUT_S, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, LC_ALL="C", DEBIAN_FRONTEND="noninteractive")
    return subprocess.run(
        list(cmd), capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env, check=False
    )


def _candidates(packages: Sequence[str]) -> dict[str, str]:
    """The versions ``apt-get download`` would fetch, from one ``apt-cache policy``; packages apt does not
    know are missing from the result."""
    proc = _run(["apt-cache", "policy", *packages], timeout=60)
    found: dict[str, str] = {}
    for m in re.finditer(r"^(\S+):\n\s+Installed:.*\n\s+Candidate:\s*(\S+)", proc.stdout, re.MULTILINE):
        if m.group(2) != "(none)":
            found[m.group(1)] = m.group(2)
    return found


def _kernel_package() -> str | None:
    """The concrete package behind ``linux-image-cloud-amd64`` (``linux-image-6.1.0-N-cloud-amd64``)."""
    proc = _run(["apt-cache", "depends", KERNEL_META_PACKAGE], timeout=60)
    m = re.search(r"Depends:\s*(linux-image-\S+-cloud-amd64)\b", proc.stdout)
    return m.group(1) if m else None


def _resolve_versions() -> dict[str, str] | None:
    kernel = _kernel_package()
    if kernel is None:
        return None
    versions = _candidates([kernel, *PACKAGES])
    return versions if len(versions) == 1 + len(PACKAGES) else None


_apt_updated = False


def _apt_update() -> None:
    """``apt-get update`` once per process, when apt's lists do not know our packages (a fresh machine)."""
    global _apt_updated
    if _apt_updated:
        return
    _apt_updated = True
    if os.geteuid() != 0:
        raise GuestSetupError(
            f"apt knows no candidate for {KERNEL_META_PACKAGE} / {', '.join(PACKAGES)} and we are not root: "
            "run `apt-get update` first"
        )
    proc = _run(["apt-get", "update", "-qq"])
    text = proc.stdout + proc.stderr
    if _NETWORK_ERRORS.search(text):
        raise GuestUnavailable(f"apt-get update cannot reach the Debian mirror: {text.strip()[-600:]}")
    if proc.returncode != 0:
        raise GuestSetupError(f"apt-get update failed (exit {proc.returncode}): {text.strip()[-2000:]}")


def _key(versions: dict[str, str]) -> str:
    text = LAYOUT_VERSION + "\n" + "\n".join(f"{p}={v}" for p, v in sorted(versions.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _read_modinfo(path: Path) -> dict[str, list[str]]:
    """The ``key=value`` strings of an ELF64 module's ``.modinfo`` section."""
    data = path.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2:
        raise GuestSetupError(f"{path}: not an ELF64 module")
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)

    def section(i: int) -> tuple[int, int, int]:
        base = shoff + i * shentsize
        (name,) = struct.unpack_from("<I", data, base)
        offset, size = struct.unpack_from("<QQ", data, base + 0x18)
        return name, offset, size

    _, str_off, _ = section(shstrndx)
    info: dict[str, list[str]] = {}
    for i in range(shnum):
        name_off, offset, size = section(i)
        end = data.index(b"\0", str_off + name_off)
        if data[str_off + name_off : end] != b".modinfo":
            continue
        for item in data[offset : offset + size].split(b"\0"):
            if b"=" in item:
                k, _, v = item.decode(errors="replace").partition("=")
                info.setdefault(k, []).append(v)
    return info


def _module_closure(modules_dir: Path, wanted: Iterable[str]) -> list[Path]:
    """The ``.ko`` files to insmod, dependencies first; built-in modules are left out."""
    builtin_file = modules_dir / "modules.builtin"
    builtin = set()
    if builtin_file.exists():
        for line in builtin_file.read_text().splitlines():
            builtin.add(Path(line).name.removesuffix(".ko").replace("-", "_"))
    by_name: dict[str, Path] = {}
    for ko in (modules_dir / "kernel").rglob("*.ko*"):
        stem = ko.name.split(".ko")[0].replace("-", "_")
        by_name[stem] = ko
    order: list[Path] = []
    seen: set[str] = set()

    def visit(name: str, chain: tuple[str, ...]) -> None:
        name = name.replace("-", "_")
        if name in seen or name in builtin:
            return
        if name in chain:
            raise GuestSetupError(f"module dependency cycle: {' -> '.join((*chain, name))}")
        ko = by_name.get(name)
        if ko is None:
            raise GuestSetupError(f"module {name} is neither built in nor in {modules_dir}")
        for deps in _read_modinfo(ko).get("depends", []):
            for dep in filter(None, deps.split(",")):
                visit(dep, (*chain, name))
        seen.add(name)
        order.append(ko)

    for name in wanted:
        visit(name, ())
    return order


def _unpack(versions: dict[str, str], dest: Path, workdir: Path) -> None:
    """Download the packages at ``versions`` into ``workdir`` and keep what the guest needs in ``dest``."""
    debs = workdir / "debs"
    debs.mkdir()
    proc = _run(["apt-get", "download", "-q", *(f"{p}={v}" for p, v in versions.items())], cwd=debs)
    text = proc.stdout + proc.stderr
    if proc.returncode != 0:
        if _NETWORK_ERRORS.search(text):
            raise GuestUnavailable(f"apt-get download cannot reach the Debian mirror: {text.strip()[-600:]}")
        if re.search(r"\b404\b", text):
            raise _StaleLists(text)
        raise GuestSetupError(f"apt-get download failed (exit {proc.returncode}): {text.strip()[-2000:]}")
    tree = workdir / "tree"
    tree.mkdir()
    for deb in sorted(debs.glob("*.deb")):
        proc = _run(["dpkg-deb", "-x", str(deb), str(tree)], timeout=120)
        if proc.returncode != 0:
            raise GuestSetupError(f"dpkg-deb -x {deb.name} failed: {proc.stderr.strip()}")

    vmlinuz = sorted((tree / "boot").glob("vmlinuz-*"))
    if len(vmlinuz) != 1:
        raise GuestSetupError(f"expected one kernel in the package, found {[p.name for p in vmlinuz]}")
    kver = vmlinuz[0].name.removeprefix("vmlinuz-")
    shutil.copy2(vmlinuz[0], dest / "vmlinuz")
    modules_dir = tree / "lib" / "modules" / kver
    mods = dest / "modules"
    mods.mkdir()
    names = []
    for ko in _module_closure(modules_dir, WANTED_MODULES):
        raw = ko.read_bytes()
        if ko.name.endswith(".xz"):
            raw = lzma.decompress(raw)
        elif ko.name.endswith(".gz"):
            raw = gzip.decompress(raw)
        elif not ko.name.endswith(".ko"):
            raise GuestSetupError(f"{ko.name}: module compression not handled")
        name = ko.name.split(".ko")[0] + ".ko"
        (mods / name).write_bytes(raw)
        names.append(name)
    (dest / "modules.order").write_text("".join(n + "\n" for n in names))
    for rel in ("bin/busybox", "sbin/mke2fs", "sbin/nbd-client", "bin/socat", "etc/mke2fs.conf"):
        src = tree / rel
        if not src.exists():
            src = tree / "usr" / rel
        if not src.exists():
            raise GuestSetupError(f"{rel} is in none of the unpacked packages")
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest / rel)
    # Libraries from the library packages (those the host may lack); ldd looks here before the host.
    (dest / "lib").mkdir()
    for lib_dir in (tree / "lib" / "x86_64-linux-gnu", tree / "usr" / "lib" / "x86_64-linux-gnu"):
        for so in sorted(lib_dir.glob("*.so*")) if lib_dir.is_dir() else ():
            shutil.copy2(so, dest / "lib" / so.name)
    manifest = {"versions": versions, "kernel_release": kver, "modules": names}
    (dest / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


def _cached_entries(root: Path) -> list[Path]:
    entries = [p for p in root.glob("*/manifest.json") if p.parent.name.startswith("pkgs-")]
    return sorted((p.parent for p in entries), key=lambda p: p.stat().st_mtime, reverse=True)


def fetch_packages() -> Path:
    """The cache directory holding the unpacked guest ingredients, downloading them when absent.

    Raises GuestUnavailable only when apt cannot reach the mirror and nothing usable is cached.
    """
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            return _fetch_locked(root)
        except GuestUnavailable:
            cached = _cached_entries(root)
            if cached:  # offline, but an earlier run left a guest: use the newest one
                return cached[0]
            raise


def _fetch_locked(root: Path) -> Path:
    """fetch_packages() under its lock: resolve, reuse or download (updating apt's lists once if they are
    missing or name versions the mirror no longer has)."""
    for attempt in range(2):
        versions = _resolve_versions()
        if versions is None or attempt > 0:
            _apt_update()
            versions = _resolve_versions()
        if versions is None:
            raise GuestSetupError(
                f"apt has no candidate for {KERNEL_META_PACKAGE}'s kernel or one of {', '.join(PACKAGES)}"
            )
        dest = root / f"pkgs-{_key(versions)}"
        if (dest / "manifest.json").exists():
            return dest
        with tempfile.TemporaryDirectory(dir=root, prefix="tmp-") as tmp:
            staging = Path(tmp) / "staging"
            staging.mkdir()
            try:
                _unpack(versions, staging, Path(tmp))
            except _StaleLists as exc:
                if attempt > 0:
                    raise GuestSetupError(f"apt-get download: 404 after apt-get update: {exc}") from None
                continue
            staging.rename(dest)
        for old in _cached_entries(root)[KEEP_CACHED:]:  # older package versions
            shutil.rmtree(old, ignore_errors=True)
        return dest
    raise AssertionError("unreachable")


# -- the initramfs ----------------------------------------------------------------------------------


class Cpio:
    """A cpio archive in the "newc" format, as the kernel's initramfs unpacker reads it."""

    def __init__(self) -> None:
        self._buf = io.BytesIO()
        self._ino = 1
        self._dirs: set[str] = set()

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        fields = (self._ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(name) + 1, 0)
        self._ino += 1
        head = b"070701" + b"".join(b"%08X" % f for f in fields) + name.encode() + b"\0"
        self._buf.write(head + b"\0" * (-len(head) % 4))
        self._buf.write(data + b"\0" * (-len(data) % 4))

    def directory(self, name: str) -> None:
        name = name.strip("/")
        if not name or name in self._dirs:
            return
        self.directory(os.path.dirname(name))
        self._dirs.add(name)
        self._entry(name, 0o040755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        name = name.strip("/")
        self.directory(os.path.dirname(name))
        self._entry(name, 0o100000 | mode, data)

    def symlink(self, name: str, target: str) -> None:
        name = name.strip("/")
        self.directory(os.path.dirname(name))
        self._entry(name, 0o120777, target.encode())

    def chardev(self, name: str, major: int, minor: int) -> None:
        name = name.strip("/")
        self.directory(os.path.dirname(name))
        self._entry(name, 0o020600, rdev=(major, minor))

    def finish(self) -> bytes:
        """The archive with its trailer, padded to 512 bytes (the kernel reads concatenated archives)."""
        self._entry("TRAILER!!!", 0)
        raw = self._buf.getvalue()
        return raw + b"\0" * (-len(raw) % 512)

    def gzipped(self) -> bytes:
        return gzip.compress(self.finish(), compresslevel=6, mtime=0)


INIT_SCRIPT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /tmp /mnt
mount -t tmpfs tmpfs /tmp
ln -sf /proc/mounts /etc/mtab
fail() { echo "QEDNBD-GUEST: FAIL $*"; sync; poweroff -f; sleep 30; }
step() { echo "QEDNBD-GUEST: STEP $(cut -d' ' -f1 /proc/uptime) $*"; }
# wait_for PATH SECONDS: a device node may appear a moment after its driver loads
wait_for() {
    i=0
    while [ ! -e "$1" ]; do
        i=$((i + 1))
        [ "$i" -gt $(($2 * 10)) ] && return 1
        usleep 100000
    done
}
for m in $(cat /lib/modules/order); do
    insmod "/lib/modules/$m" || fail "insmod $m"
done
echo "QEDNBD-GUEST: BOOTED $(cut -d' ' -f1 /proc/uptime)"
[ -f /test.sh ] || fail "no /test.sh in the initramfs"
. /test.sh
echo "QEDNBD-GUEST: OK"
sync
poweroff -f
sleep 30
"""


def _libraries(binaries: Iterable[Path], extra_lib_dir: Path) -> dict[str, Path]:
    """Guest path -> file for every library (and the loader) that ``ldd`` names for ``binaries``: from
    ``extra_lib_dir`` (unpacked library packages) if there, else the host's."""
    libs: dict[str, Path] = {}
    env = dict(os.environ, LD_LIBRARY_PATH=str(extra_lib_dir))
    for binary in binaries:
        proc = subprocess.run(
            ["ldd", str(binary)], capture_output=True, text=True, timeout=30, env=env, check=False
        )
        if proc.returncode != 0:
            raise GuestSetupError(f"ldd {binary} failed: {proc.stdout}{proc.stderr}")
        for line in proc.stdout.splitlines():
            line = line.strip()
            if "not found" in line:
                raise GuestSetupError(
                    f"{binary.name} needs a library the host lacks ({line}); "
                    "install the host's e2fsprogs and nbd-client packages"
                )
            m = re.match(r"(?:\S+\s+=>\s+)?(/\S+)\s+\(0x", line)
            if m:
                found = Path(m.group(1))
                guest_path = str(found)
                if found.parent == extra_lib_dir:
                    guest_path = f"/lib/x86_64-linux-gnu/{found.name}"
                libs[guest_path] = found.resolve()
    return libs


@dataclasses.dataclass(frozen=True)
class GuestKit:
    """What a boot needs: the kernel and the base initramfs (gzip cpio) every boot starts from."""

    kernel: Path
    base_initrd: Path
    versions: dict[str, str]
    kernel_release: str


def build_kit() -> GuestKit:
    """Fetch (or reuse) the packages and build (or reuse) the base initramfs."""
    pkgs = fetch_packages()
    manifest = json.loads((pkgs / "manifest.json").read_text())
    libs = _libraries((pkgs / rel for rel in GUEST_BINARIES.values()), pkgs / "lib")
    # The base initramfs depends on the host libraries too: key it by their identity as well.
    ident = hashlib.sha256(INIT_SCRIPT.encode())
    for guest_path, host in sorted(libs.items()):
        st = host.stat()
        ident.update(f"{guest_path}={host}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    # Uncompressed: the kernel unpacks it ~0.4 s faster under TCG than the gzipped one (20 MB vs 8.5 MB).
    initrd = pkgs / f"base-{ident.hexdigest()[:16]}.cpio"
    if not initrd.exists():
        for old in pkgs.glob("base-*"):
            old.unlink(missing_ok=True)
        cpio = Cpio()
        for d in ("dev", "proc", "sys", "tmp", "mnt", "etc", "sbin", "bin", "lib/modules"):
            cpio.directory(d)
        cpio.chardev("dev/console", 5, 1)
        cpio.file("bin/busybox", (pkgs / "bin/busybox").read_bytes(), 0o755)
        cpio.file("init", INIT_SCRIPT.encode(), 0o755)
        cpio.file("etc/mke2fs.conf", (pkgs / "etc/mke2fs.conf").read_bytes())
        for guest_rel, rel in GUEST_BINARIES.items():
            cpio.file(guest_rel, (pkgs / rel).read_bytes(), 0o755)
        for guest_path, host in sorted(libs.items()):
            cpio.file(guest_path, host.read_bytes(), 0o755)
        cpio.file("lib/modules/order", "".join(m + "\n" for m in manifest["modules"]).encode())
        for name in manifest["modules"]:
            cpio.file(f"lib/modules/{name}", (pkgs / "modules" / name).read_bytes())
        tmp = initrd.with_suffix(f".tmp{os.getpid()}")
        tmp.write_bytes(cpio.finish())
        tmp.rename(initrd)
    return GuestKit(
        kernel=pkgs / "vmlinuz",
        base_initrd=initrd,
        versions=dict(manifest["versions"]),
        kernel_release=str(manifest["kernel_release"]),
    )


# -- booting --------------------------------------------------------------------------------------


@dataclasses.dataclass
class GuestRun:
    console: str
    seconds: float
    boot_seconds: float | None  # guest uptime when /init had loaded its modules
    sums: dict[str, str]  # file name -> sha256 reported by the guest
    markers: list[tuple[str, str]]

    def tail(self, n: int = 60) -> str:
        return "\n".join(self.console.splitlines()[-n:])


class GuestFailed(AssertionError):
    pass


def parse_console(console: str) -> list[tuple[str, str]]:
    """The ``QEDNBD-GUEST: WORD rest`` markers of a console log, in order."""
    markers = []
    for line in console.splitlines():
        idx = line.find(MARK)
        if idx < 0:
            continue
        word, _, rest = line[idx + len(MARK) :].strip().partition(" ")
        markers.append((word, rest.strip()))
    return markers


def boot(
    kit: GuestKit,
    workdir: Path,
    script: str,
    qemu_args: Sequence[str],
    files: dict[str, bytes] | None = None,
    timeout_s: float = 120.0,
    label: str = "guest",
    server: Server | None = None,
    on_marker: dict[str, Callable[[], object]] | None = None,
) -> GuestRun:
    """Boot the guest with ``script`` as its ``/test.sh`` (and ``files`` beside it); return its report.

    Raises GuestFailed, with the console's tail (and ``server``'s log), unless the guest printed ``OK`` and
    no ``FAIL``. qemu is killed if it has not powered off after ``timeout_s``. ``on_marker`` maps a marker
    word to a function called (once) while the guest runs, as soon as the console shows that marker.
    """
    extra = Cpio()
    extra.file("test.sh", script.encode(), 0o755)
    for name, data in (files or {}).items():
        extra.file(name, data)
    initrd = workdir / f"{label}-initrd.img"
    initrd.write_bytes(kit.base_initrd.read_bytes() + extra.gzipped())
    log_path = workdir / f"{label}-console.log"
    cmd = [
        "qemu-system-x86_64",
        "-machine", "q35",
        "-accel", "tcg",
        "-m", "512",
        "-smp", "1",
        "-cpu", "max",
        "-nographic",
        "-no-reboot",
        "-nic", "none",
        "-kernel", str(kit.kernel),
        "-initrd", str(initrd),
        "-append", "console=ttyS0 panic=-1 quiet",
        *qemu_args,
    ]  # fmt: skip
    start = time.monotonic()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        timed_out = False
        pending = dict(on_marker or {})
        try:
            deadline = start + timeout_s
            while proc.poll() is None:
                if time.monotonic() > deadline:
                    timed_out = True
                    break
                if pending:  # fire each hook once, as soon as its marker shows on the console
                    text = log_path.read_bytes().decode(errors="replace")
                    for word in [w for w, _ in parse_console(text) if w in pending]:
                        pending.pop(word)()
                time.sleep(0.05)
        finally:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
    seconds = time.monotonic() - start
    console = log_path.read_bytes().decode(errors="replace").replace("\r\n", "\n")
    markers = parse_console(console)
    sums: dict[str, str] = {}
    boot_seconds = None
    for word, rest in markers:
        if word == "SUM":
            digest, _, name = rest.partition(" ")
            sums[name.strip()] = digest
        elif word == "BOOTED":
            with contextlib.suppress(ValueError):
                boot_seconds = float(rest)
    run = GuestRun(console=console, seconds=seconds, boot_seconds=boot_seconds, sums=sums, markers=markers)
    words = [w for w, _ in markers]
    problem = None
    if timed_out:
        problem = f"did not power off within {timeout_s:.0f} s"
    elif "FAIL" in words:
        problem = "reported " + "; ".join(rest for w, rest in markers if w == "FAIL")
    elif "OK" not in words:
        problem = f"powered off without an OK marker (qemu exit status {proc.returncode})"
    elif proc.returncode != 0:
        problem = f"qemu exited with status {proc.returncode}"
    if problem:
        raise GuestFailed(
            f"{label} {problem} after {seconds:.1f} s\nqemu: {' '.join(cmd)}\n"
            f"--- console tail ({log_path}) ---\n{run.tail()}"
            + (f"\n--- server log ({server.log_path}) ---\n{server.log()[-4000:]}" if server else "")
        )
    return run


# -- the NBD server ---------------------------------------------------------------------------------

# The one switch between the reference server and ours: "qemu-nbd" or "qednbd".
SERVER = os.environ.get("QEDNBD_GUEST_SERVER", "qednbd")


class Server:
    """An NBD server on a Unix socket, started by start_server(); stop() ends it (also on exit)."""

    def __init__(self, proc: subprocess.Popen[bytes], socket_path: Path, log_path: Path, cmd: list[str]):
        self.proc = proc
        self.socket_path = socket_path
        self.log_path = log_path
        self.cmd = cmd

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout_s: float = 20.0) -> int:
        """SIGTERM, then SIGKILL if it lingers; the exit status (negative for a signal)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
                raise AssertionError(
                    f"server ignored SIGTERM for {timeout_s:.0f} s; killed\n--- server log ---\n{self.log()}"
                ) from None
        return self.proc.returncode

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)


_server_count = itertools.count(1)


def start_server(image: Path, socket_path: Path, name: str, timeout_s: float = 20.0) -> Server:
    """Serve ``image`` read-write as export ``name`` on the Unix socket ``socket_path``; ready on return."""
    if SERVER == "qemu-nbd":
        cmd = ["qemu-nbd", "-f", "qed", "-t", "-e", "0", "-x", name, "-k", str(socket_path), str(image)]
        env = None
    else:
        cmd = [sys.executable, "-m", "qednbd", "serve", "-k", str(socket_path), "-x", name, str(image)]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    log_path = socket_path.with_name(f"{socket_path.name}.{next(_server_count)}.log")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env)
    server = Server(proc, socket_path, log_path, cmd)
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            if proc.poll() is not None:
                raise AssertionError(
                    f"server exited with status {proc.returncode} before listening: {' '.join(cmd)}\n"
                    f"--- server log ---\n{server.log()}"
                )
            if _listening(server):
                return server
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"server not listening on {socket_path} after {timeout_s:.0f} s: {' '.join(cmd)}\n"
                    f"--- server log ---\n{server.log()}"
                )
            time.sleep(0.05)
    except BaseException:
        server.__exit__()
        raise


def _listening(server: Server) -> bool:
    if SERVER != "qemu-nbd":
        # qednbd says so on stderr once it accepts connections; no probe connection needed.
        return "qednbd: listening on nbd+unix://" in server.log()
    if not server.socket_path.exists():
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(2)
        try:
            s.connect(str(server.socket_path))
        except OSError:
            return False
    return True


@contextlib.contextmanager
def serving(image: Path, socket_path: Path, name: str) -> Iterator[Server]:
    """start_server() as a context: the server is stopped with SIGTERM at the end and must exit 0."""
    server = start_server(image, socket_path, name)
    with server:
        yield server
        status = server.stop()
        if status != 0:
            raise AssertionError(
                f"server exited with status {status} on SIGTERM\n--- log ---\n{server.log()}"
            )


# -- what the guests do, and what the host checks afterwards ----------------------------------------

# Files the guests write: (path under the mount point, shell command writing it to "$f").
GUEST_FILES = (
    ("random-4m", 'dd if=/dev/urandom of="$f" bs=1M count=4 2>/dev/null'),
    ("random-odd", 'head -c 1234567 /dev/urandom > "$f"'),
    ("dir/random-2m", 'dd if=/dev/urandom of="$f" bs=64k count=32 2>/dev/null'),
    ("dir/deeper/random-300k", 'head -c 307200 /dev/urandom > "$f"'),
    ("hello.txt", 'echo "hello from the guest" > "$f"'),
)


def script_make_fs_and_write(device: str) -> str:
    """Shell lines: make ext4 on ``device``, write GUEST_FILES, sync, print their sums, read them back
    after a remount with the caches dropped, unmount."""
    lines = [
        f'wait_for {device} 20 || fail "{device} did not appear"',
        f'/sbin/mke2fs -q -F -t ext4 -L qednbd {device} || fail "mke2fs -t ext4 {device}"',
        "step mke2fs done",
        f'mount -t ext4 {device} /mnt || fail "mount {device}"',
    ]
    for name, write in GUEST_FILES:
        lines += [f'f=/mnt/{name}; mkdir -p "${{f%/*}}"', f'{write} || fail "writing {name}"']
    lines += [
        "step files written",
        'sync || fail "sync"',
        "step synced",
        "cd /mnt",
        f"sha256sum {' '.join(n for n, _ in GUEST_FILES)} > /tmp/sums || fail sha256sum",
        'while read -r sum name; do echo "QEDNBD-GUEST: SUM $sum $name"; done < /tmp/sums',
        "cd /",
        f'umount /mnt || fail "umount {device}"',
        "echo 3 > /proc/sys/vm/drop_caches",
        f'mount -t ext4 -o ro {device} /mnt || fail "second mount {device}"',
        '(cd /mnt && sha256sum -c -s /tmp/sums) || fail "files differ after a remount"',
        f'umount /mnt || fail "umount {device}"',
        "step files read back",
    ]
    return "\n".join(lines) + "\n"


def script_verify(device: str) -> str:
    """Shell lines: mount ``device`` and check the files against ``/expected.sha256``; print their sums."""
    return (
        "\n".join(
            [
                f'wait_for {device} 20 || fail "{device} did not appear"',
                f'mount -t ext4 {device} /mnt || fail "mount {device}"',
                "cd /mnt",
                "sha256sum -c /expected.sha256 > /tmp/check 2>&1 ||",
                '    { cat /tmp/check; fail "checksums differ after the server restart"; }',
                "sha256sum $(cut -d' ' -f3 /expected.sha256) > /tmp/sums || fail sha256sum",
                'while read -r sum name; do echo "QEDNBD-GUEST: SUM $sum $name"; done < /tmp/sums',
                "cd /",
                f'umount /mnt || fail "umount {device}"',
            ]
        )
        + "\n"
    )


def expected_sums_file(sums: dict[str, str]) -> bytes:
    return "".join(f"{digest}  {name}\n" for name, digest in sorted(sums.items())).encode()


def check_image_on_host(image: Path, sums: dict[str, str], workdir: Path) -> None:
    """``qemu-img check`` is clean, and a raw copy holds a clean ext4 whose files have ``sums``."""
    check = _run(["qemu-img", "check", "-f", "qed", str(image)], timeout=120)
    assert check.returncode == 0 and "No errors were found" in check.stdout, (
        f"qemu-img check {image}: exit {check.returncode}\n{check.stdout}{check.stderr}"
    )
    raw = workdir / (image.name + ".raw")
    conv = _run(["qemu-img", "convert", "-f", "qed", "-O", "raw", str(image), str(raw)], timeout=120)
    assert conv.returncode == 0, f"qemu-img convert: {conv.stdout}{conv.stderr}"
    try:
        with open(raw, "rb") as f:
            f.seek(0x438)
            magic = f.read(2)
        assert magic == b"\x53\xef", f"no ext2/3/4 superblock magic at 0x438 of the raw copy: {magic!r}"
        fsck = _run(["e2fsck", "-f", "-n", str(raw)], timeout=120)
        assert fsck.returncode == 0, (
            f"e2fsck -fn on the raw copy: exit {fsck.returncode}\n{fsck.stdout}{fsck.stderr}"
        )
        for name, digest in sums.items():
            proc = subprocess.run(
                ["debugfs", "-R", f"cat /{name}", str(raw)], capture_output=True, timeout=120, check=False
            )
            got = hashlib.sha256(proc.stdout).hexdigest()
            assert got == digest, (
                f"/{name} read from the image on the host has sha256 {got}, the guest wrote {digest}; "
                f"debugfs: {proc.stderr.decode(errors='replace')}"
            )
    finally:
        raw.unlink(missing_ok=True)
