"""config.build: flags and TOML merged into one checked ServerConfig; every mistake is a ConfigError."""

from __future__ import annotations

from pathlib import Path

import pytest

from qednbd.config import DEFAULT_BIND, DEFAULT_PORT, CommandLine, build
from qednbd.errors import ConfigError


def test_defaults_for_one_file() -> None:
    conf = build(CommandLine(files=["/images/disk.qed"]))
    assert (conf.bind, conf.port, conf.socket_path, conf.max_clients) == (DEFAULT_BIND, DEFAULT_PORT, None, 0)
    assert DEFAULT_BIND == "127.0.0.1" and DEFAULT_PORT == 10809
    assert [e.name for e in conf.exports] == ["disk.qed"]
    assert conf.default_export == "disk.qed"


def test_name_description_read_only() -> None:
    conf = build(CommandLine(files=["a.qed"], name="vm", description="the vm", read_only=True))
    (export,) = conf.exports
    assert (export.name, export.description, export.read_only) == ("vm", "the vm", True)


def test_several_files_have_no_default() -> None:
    conf = build(CommandLine(files=["a.qed", "b.qed"]))
    assert [e.name for e in conf.exports] == ["a.qed", "b.qed"]
    assert conf.default_export is None


@pytest.mark.parametrize(
    ("cmd", "message"),
    [
        (CommandLine(), "nothing to serve"),
        (CommandLine(files=["a.qed", "b.qed"], name="x"), "exactly one FILE"),
        (CommandLine(files=["d1/a.qed", "d2/a.qed"]), "two exports are called 'a.qed'"),
        (CommandLine(files=["a.qed"], port=70000), "port 70000"),
        (CommandLine(files=["a.qed"], max_clients=-1), "negative"),
    ],
)
def test_flag_errors(cmd: CommandLine, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build(cmd)


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "qednbd.toml"
    path.write_text(text)
    return str(path)


def test_toml_file(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        'port = 10900\nmax-clients = 4\ndefault = "b"\n'
        '[exports.a]\nfile = "a.qed"\nread-only = true\ndescription = "A"\n'
        '[exports.b]\nfile = "/abs/b.qed"\n',
    )
    conf = build(CommandLine(config_file=path))
    assert (conf.port, conf.max_clients, conf.default_export) == (10900, 4, "b")
    a, b = conf.exports
    assert (a.name, a.path, a.read_only, a.description) == ("a", str(tmp_path / "a.qed"), True, "A")
    assert (b.name, b.path, b.read_only) == ("b", "/abs/b.qed", False)


def test_flags_win_over_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, 'port = 10900\nsocket = "/run/x.sock"\n[exports.a]\nfile = "a.qed"\n')
    conf = build(CommandLine(config_file=path, port=0, max_clients=2))
    assert (conf.port, conf.socket_path, conf.max_clients) == (0, None, 2)
    assert build(CommandLine(config_file=path)).socket_path == "/run/x.sock"


def test_files_add_to_the_config(tmp_path: Path) -> None:
    path = write(tmp_path, '[exports.a]\nfile = "a.qed"\n')
    conf = build(CommandLine(config_file=path, files=["c.qed"]))
    assert [e.name for e in conf.exports] == ["a", "c.qed"]
    assert conf.default_export is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("prot = 1\n", "unknown key 'prot'"),
        ("[exports.a]\nfiel = 'a'\n", r"unknown key 'fiel'"),
        ("[exports.a]\nread-only = true\n", "'file' is required"),
        ("port = 'x'\n[exports.a]\nfile = 'a'\n", "'port' must be a int"),
        ("port = true\n[exports.a]\nfile = 'a'\n", "'port' must be a int"),
        ("[exports.a]\nfile = 'a'\nread-only = 1\n", "'read-only' must be a bool"),
        ("default = 'z'\n[exports.a]\nfile = 'a'\n", "default export 'z'"),
        ("exports = 3\n", "must be a table"),
        ("this is not toml", "not valid TOML"),
    ],
)
def test_file_errors(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build(CommandLine(config_file=write(tmp_path, text)))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        build(CommandLine(config_file=str(tmp_path / "none.toml")))
