"""``qednbd serve`` configuration: flags and TOML merged by :func:`qednbd.config.build`, and the
start-up failures a bad configuration causes.

* Unit tests call :func:`~qednbd.config.build` directly: the defaults (127.0.0.1:10809, which no
  test binds), export names (basename, ``-x``), the default export, TOML exports with relative
  paths, read-only flags and descriptions, flags winning over the file.
* Process tests run ``qednbd serve`` with a bad configuration (unknown key, missing file, bad
  TOML, duplicate names, ``-x`` with two files, ...) and check what a user sees: exit status 1,
  exactly one ``qednbd:`` line naming the problem, no traceback, nothing listening (the
  requested Unix socket never appears) and no pid file.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from helpers import REPO_ROOT, qednbd, qemu_img

from qednbd import config as cfg
from qednbd.errors import ConfigError

pytestmark = pytest.mark.interop

CLEAN = REPO_ROOT / "tests" / "data" / "clean.qed"


# -- config.build(): defaults and merging ---------------------------------------------------


def test_defaults_are_loopback_and_nbd_port() -> None:
    conf = cfg.build(cfg.CommandLine(files=["dir/disk.qed"]))
    assert (conf.bind, conf.port) == ("127.0.0.1", 10809)
    assert conf.socket_path is None
    assert conf.max_clients == 0
    assert conf.pid_file is None
    assert conf.exports == (cfg.ExportConfig("disk.qed", "dir/disk.qed", False, ""),)
    assert conf.default_export == "disk.qed"  # a single FILE is also the default export


def test_help_states_the_defaults() -> None:
    proc = qednbd("serve", "--help")
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())  # argparse wraps lines
    assert "default 127.0.0.1" in text
    assert "default 10809" in text
    assert "0 picks a free one" in text


def test_name_and_description_flags() -> None:
    conf = cfg.build(cfg.CommandLine(files=["a.qed"], name="disk", description="the disk", read_only=True))
    assert conf.exports == (cfg.ExportConfig("disk", "a.qed", True, "the disk"),)
    assert conf.default_export == "disk"


def test_several_files_have_no_default_export() -> None:
    conf = cfg.build(cfg.CommandLine(files=["x/a.qed", "y/b.qed"]))
    assert [e.name for e in conf.exports] == ["a.qed", "b.qed"]
    assert conf.default_export is None


def _toml(tmp_path: Path, text: str, name: str = "serve.toml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return os.fspath(path)


def test_toml_exports_paths_flags_and_default(tmp_path: Path) -> None:
    sub = tmp_path / "conf"
    sub.mkdir()
    path = _toml(
        sub,
        """
        port = 12345
        max-clients = 3
        default = "two"

        [exports.one]
        file = "one.qed"
        read-only = true
        description = "first"

        [exports.two]
        file = "/abs/two.qed"
        """,
    )
    conf = cfg.build(cfg.CommandLine(config_file=path))
    assert conf.exports == (
        cfg.ExportConfig("one", os.path.join(sub, "one.qed"), True, "first"),  # relative to the file
        cfg.ExportConfig("two", "/abs/two.qed", False, ""),
    )
    assert conf.default_export == "two"
    assert (conf.bind, conf.port, conf.max_clients) == ("127.0.0.1", 12345, 3)


def test_flags_win_over_the_file(tmp_path: Path) -> None:
    path = _toml(tmp_path, 'bind = "::1"\nport = 1\nmax-clients = 9\n[exports.a]\nfile = "a.qed"\n')
    conf = cfg.build(cfg.CommandLine(config_file=path, bind="127.0.0.1", port=0, max_clients=2))
    assert (conf.bind, conf.port, conf.max_clients) == ("127.0.0.1", 0, 2)
    # one export in the file: it is the default export
    assert conf.default_export == "a"


def test_read_only_flag_applies_to_file_exports(tmp_path: Path) -> None:
    path = _toml(tmp_path, '[exports.a]\nfile = "a.qed"\n[exports.b]\nfile = "b.qed"\nread-only = false\n')
    conf = cfg.build(cfg.CommandLine(config_file=path, read_only=True))
    assert [e.read_only for e in conf.exports] == [True, True]
    assert conf.default_export is None


def test_file_socket_key_and_tcp_flags(tmp_path: Path) -> None:
    path = _toml(tmp_path, 'socket = "/run/x.sock"\n[exports.a]\nfile = "a.qed"\n')
    assert cfg.build(cfg.CommandLine(config_file=path)).socket_path == "/run/x.sock"
    # asking for TCP on the command line overrides the file's socket
    assert cfg.build(cfg.CommandLine(config_file=path, port=0)).socket_path is None


def test_config_plus_files(tmp_path: Path) -> None:
    path = _toml(tmp_path, '[exports.a]\nfile = "a.qed"\n')
    conf = cfg.build(cfg.CommandLine(config_file=path, files=["z/b.qed"]))
    assert [e.name for e in conf.exports] == ["a", "b.qed"]
    assert conf.default_export is None


BAD_CONFIGS = {
    "unknown server key": ('prot = 1\n[exports.a]\nfile = "a.qed"\n', "unknown key 'prot'"),
    "unknown export key": ('[exports.a]\nfile = "a.qed"\nreadonly = true\n', "unknown key 'readonly'"),
    "export without file": ("[exports.a]\ndescription = 'x'\n", "'file' is required"),
    "bad TOML": ("[exports.a\nfile = 1\n", "not valid TOML"),
    "wrong type": ('[exports.a]\nfile = "a.qed"\nread-only = "yes"\n', "'read-only' must be a bool"),
    "port as string": ('port = "10809"\n[exports.a]\nfile = "a.qed"\n', "'port' must be a int"),
    "port out of range": ('port = 70000\n[exports.a]\nfile = "a.qed"\n', "not in 0..65535"),
    "unknown default": ('default = "b"\n[exports.a]\nfile = "a.qed"\n', "default export 'b'"),
    "exports not a table": ('exports = "a.qed"\n', "'exports' must be a table"),
    "no exports": ("port = 1\n", "nothing to serve"),
    "bad tls mode": ('tls = "yes"\ntls-creds = "p"\n[exports.a]\nfile = "a.qed"\n', "tls must be one of"),
    "tls without creds": ('tls = "on"\n[exports.a]\nfile = "a.qed"\n', "needs --tls-creds"),
    "tls-only without tls": ('[exports.a]\nfile = "a.qed"\ntls-only = true\n', "tls-only but TLS is off"),
    "allow not a list": ('allow = "10.0.0.0/8"\n[exports.a]\nfile = "a.qed"\n', "list of strings"),
    "allow not a network": ('allow = ["10.0.0.0/33"]\n[exports.a]\nfile = "a.qed"\n', "not an address"),
}


def test_tls_and_allow_keys(tmp_path: Path) -> None:
    path = _toml(
        tmp_path,
        'tls = "on"\ntls-creds = "pki"\ntls-verify-peer = true\nallow = ["10.1.2.3", "fd00::/8"]\n'
        '[exports.a]\nfile = "a.qed"\ntls-only = true\n[exports.b]\nfile = "b.qed"\n',
    )
    conf = cfg.build(cfg.CommandLine(config_file=path))
    assert (conf.tls, conf.tls_creds, conf.tls_verify_peer) == ("on", str(tmp_path / "pki"), True)
    assert conf.allow == ("10.1.2.3/32", "fd00::/8")
    assert [e.tls_only for e in conf.exports] == [True, False]
    flags = cfg.build(cfg.CommandLine(config_file=path, tls="require", allow=["127.0.0.1/8"]))
    assert (flags.tls, flags.allow) == ("require", ("127.0.0.0/8",))  # flags win over the file
    creds_only = cfg.build(cfg.CommandLine(files=["a.qed"], tls_creds="/etc/pki/qednbd"))
    assert (creds_only.tls, creds_only.tls_creds) == ("require", "/etc/pki/qednbd")  # as qemu-nbd
    off = cfg.build(cfg.CommandLine(files=["a.qed"], tls="off", tls_creds="/etc/pki/qednbd"))
    assert (off.tls, off.tls_creds) == ("off", None)


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_build_rejects(tmp_path: Path, case: str) -> None:
    text, reason = BAD_CONFIGS[case]
    with pytest.raises(ConfigError, match=re.escape(reason)):
        cfg.build(cfg.CommandLine(config_file=_toml(tmp_path, text)))


def test_build_rejects_flag_misuse() -> None:
    with pytest.raises(ConfigError, match="-x and -D apply to exactly one FILE"):
        cfg.build(cfg.CommandLine(files=["a.qed", "b.qed"], name="x"))
    with pytest.raises(ConfigError, match="-x and -D apply to exactly one FILE"):
        cfg.build(cfg.CommandLine(files=["a.qed", "b.qed"], description="x"))
    with pytest.raises(ConfigError, match=re.escape("two exports are called 'a.qed'")):
        cfg.build(cfg.CommandLine(files=["x/a.qed", "y/a.qed"]))
    with pytest.raises(ConfigError, match="nothing to serve"):
        cfg.build(cfg.CommandLine())
    with pytest.raises(ConfigError, match="negative"):
        cfg.build(cfg.CommandLine(files=["a.qed"], max_clients=-1))


# -- start-up failures as a user sees them ---------------------------------------------------


def _fails_cleanly(proc: subprocess.CompletedProcess[str], sock: Path, pid_file: Path, *needles: str) -> str:
    """Exit 1, one ``qednbd:`` line containing every needle, no traceback, nothing listened."""
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "Traceback" not in out, out
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, out
    line = lines[0]
    assert line.startswith("qednbd: "), out
    for needle in needles:
        assert needle in line, out
    assert "listening" not in out, out
    assert not sock.exists(), "the server created its socket although it failed"
    assert not pid_file.exists(), "a failed start wrote the pid file"
    return line


def _serve(tmp_path: Path, *args: str | os.PathLike[str]) -> subprocess.CompletedProcess[str]:
    sock, pid_file = tmp_path / "s.sock", tmp_path / "pid"
    return qednbd("serve", "-k", sock, "--pid-file", pid_file, *args, timeout=30, cwd=tmp_path)


@pytest.fixture
def images(tmp_path: Path) -> tuple[Path, Path]:
    a = tmp_path / "a.qed"
    b = tmp_path / "b.qed"
    shutil.copyfile(CLEAN, a)
    qemu_img("create", "-q", "-f", "qed", b, "1M")
    return a, b


CLI_CASES = {
    "unknown key": ('prot = 1\n[exports.a]\nfile = "a.qed"\n', ("unknown key 'prot'",)),
    "unknown export key": ('[exports.a]\nfile = "a.qed"\nreadonly = true\n', ("unknown key 'readonly'",)),
    "bad TOML": ('[exports.a\nfile = "a.qed"\n', ("not valid TOML",)),
    "duplicate names": (
        '[exports."a.qed"]\nfile = "b.qed"\n',  # the FILE argument a.qed is called "a.qed" too
        ("two exports are called 'a.qed'",),
    ),
    "missing image": ('[exports.gone]\nfile = "gone.qed"\n', ("gone.qed", "No such file")),
    "unknown default": ('default = "nope"\n[exports.b]\nfile = "b.qed"\n', ("'nope'",)),
}


@pytest.mark.parametrize("case", sorted(CLI_CASES))
def test_serve_config_errors(tmp_path: Path, images: tuple[Path, Path], case: str) -> None:
    text, needles = CLI_CASES[case]
    conf = tmp_path / "serve.toml"
    conf.write_text(text)
    before = [p.read_bytes() for p in images]
    proc = _serve(tmp_path, "--config", conf, images[0])
    _fails_cleanly(proc, tmp_path / "s.sock", tmp_path / "pid", *needles)
    assert [p.read_bytes() for p in images] == before  # nothing was touched


def test_serve_missing_config_file(tmp_path: Path, images: tuple[Path, Path]) -> None:
    proc = _serve(tmp_path, "--config", tmp_path / "nope.toml", images[0])
    _fails_cleanly(proc, tmp_path / "s.sock", tmp_path / "pid", "cannot read config file", "nope.toml")


def test_serve_x_with_two_files(tmp_path: Path, images: tuple[Path, Path]) -> None:
    proc = _serve(tmp_path, "-x", "disk", *images)
    _fails_cleanly(proc, tmp_path / "s.sock", tmp_path / "pid", "-x and -D apply to exactly one FILE")


def test_serve_same_basename_twice(tmp_path: Path, images: tuple[Path, Path]) -> None:
    other = tmp_path / "other"
    other.mkdir()
    shutil.copyfile(images[0], other / "a.qed")
    proc = _serve(tmp_path, images[0], other / "a.qed")
    _fails_cleanly(proc, tmp_path / "s.sock", tmp_path / "pid", "two exports are called 'a.qed'")


def test_serve_same_image_twice_writable(tmp_path: Path, images: tuple[Path, Path]) -> None:
    conf = tmp_path / "serve.toml"
    conf.write_text('[exports.again]\nfile = "a.qed"\n')
    proc = _serve(tmp_path, "--config", conf, images[0])
    _fails_cleanly(proc, tmp_path / "s.sock", tmp_path / "pid", "exported twice")


def test_serve_missing_image(tmp_path: Path) -> None:
    proc = _serve(tmp_path, tmp_path / "absent.qed")
    _fails_cleanly(proc, tmp_path / "s.sock", tmp_path / "pid", "absent.qed", "No such file")


def test_serve_nothing_to_serve(tmp_path: Path) -> None:
    proc = _serve(tmp_path)
    _fails_cleanly(proc, tmp_path / "s.sock", tmp_path / "pid", "nothing to serve")


def test_second_image_bad_closes_the_first(tmp_path: Path, images: tuple[Path, Path]) -> None:
    """Every image is opened before listening; one failure closes the others, unchanged."""
    bad = tmp_path / "bad.qed"
    bad.write_bytes(b"not an image" * 100)
    before = images[0].read_bytes()
    proc = _serve(tmp_path, images[0], bad)
    _fails_cleanly(proc, tmp_path / "s.sock", tmp_path / "pid", "bad.qed", "not in QED format")
    assert images[0].read_bytes() == before
