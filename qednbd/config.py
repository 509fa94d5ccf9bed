"""The server's configuration: command-line flags and an optional TOML file, frozen.

A TOML file (``--config``) looks like this; every key is optional except ``file``::

    bind = "127.0.0.1"          # ignored when socket is set
    port = 10809
    socket = "/run/qednbd.sock"  # serve a Unix socket instead of TCP
    max-clients = 16             # 0 = no limit
    default = "disk"             # the export the empty name selects
    tls = "require"              # off | on | require (require when tls-creds is set)
    tls-creds = "pki"            # ca-cert.pem, server-cert.pem, server-key.pem
    tls-verify-peer = false      # clients must show a certificate signed by ca-cert.pem
    allow = ["10.0.0.0/8"]       # TCP clients from these networks only (default: everyone)
    metrics = "127.0.0.1:9810"   # Prometheus metrics at http://127.0.0.1:9810/metrics
    allow-backing = ["/srv/golden"]  # backing files may also live here (default: the image's directory)

    [exports.disk]
    file = "disk.qed"            # relative paths are relative to the config file
    read-only = false
    description = "the demo disk"
    tls-only = false             # with tls = "on": only clients that did STARTTLS see it
    force-share = false          # with read-only: serve it while another program writes it (-U)

Command-line flags win over the file's server keys; FILE arguments add exports. Unknown keys
are errors (a typo must not silently serve something else). With exactly one export, it is
also the default export.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Final

from qednbd.errors import ConfigError

DEFAULT_BIND: Final = "127.0.0.1"
DEFAULT_PORT: Final = 10809  # the IANA port for NBD
_SERVER_KEYS: Final = frozenset(
    {"bind", "port", "socket", "max-clients", "default", "exports"}
    | {"tls", "tls-creds", "tls-verify-peer", "allow", "metrics", "allow-backing"}
)
_EXPORT_KEYS: Final = frozenset({"file", "read-only", "description", "tls-only", "force-share"})
TLS_MODES: Final = ("off", "on", "require")


@dataclass(frozen=True, slots=True)
class ExportConfig:
    name: str
    path: str
    read_only: bool = False
    description: str = ""
    tls_only: bool = False
    force_share: bool = False  # lock as a -U reader: another program may be writing the image


@dataclass(frozen=True, slots=True)
class ServerConfig:
    exports: tuple[ExportConfig, ...]
    default_export: str | None  # the name "" selects, or None: "" is unknown
    bind: str = DEFAULT_BIND
    port: int = DEFAULT_PORT
    socket_path: str | None = None  # a Unix socket instead of TCP
    max_clients: int = 0  # 0 = no limit
    pid_file: str | None = None
    tls: str = "off"  # one of TLS_MODES
    tls_creds: str | None = None  # directory with ca-cert.pem, server-cert.pem, server-key.pem
    tls_verify_peer: bool = False
    allow: tuple[str, ...] = ()  # networks (CIDR) TCP clients may come from; () = any
    metrics: tuple[str, int] | None = None  # where to serve Prometheus metrics
    allow_backing: tuple[str, ...] = ()  # directories backing files may be in, besides the image's own


@dataclass(frozen=True, slots=True)
class CommandLine:
    """What ``qednbd serve`` was given; None means "not given" so the file's value applies."""

    files: Sequence[str] = ()
    bind: str | None = None
    port: int | None = None
    socket_path: str | None = None
    name: str | None = None
    description: str | None = None
    read_only: bool = False
    force_share: bool = False
    max_clients: int | None = None
    config_file: str | None = None
    pid_file: str | None = None
    tls: str | None = None
    tls_creds: str | None = None
    tls_verify_peer: bool = False
    allow: Sequence[str] = ()
    metrics: str | None = None
    allow_backing: Sequence[str] = ()


def _typed(table: Mapping[str, object], key: str, kind: type, where: str) -> object:
    value = table[key]
    if (kind is int and isinstance(value, bool)) or not isinstance(value, kind):
        raise ConfigError(f"{where}: '{key}' must be a {kind.__name__}, not {value!r}")
    return value


def _str(table: Mapping[str, object], key: str, where: str) -> str | None:
    return str(_typed(table, key, str, where)) if key in table else None


def _int(table: Mapping[str, object], key: str, where: str) -> int | None:
    value = _typed(table, key, int, where) if key in table else None
    return value if isinstance(value, int) else None


def _bool(table: Mapping[str, object], key: str, where: str) -> bool:
    return bool(_typed(table, key, bool, where)) if key in table else False


def _load_file(path: str) -> dict[str, object]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


def _file_exports(path: str, data: Mapping[str, object]) -> list[ExportConfig]:
    tables = data.get("exports", {})
    if not isinstance(tables, dict):
        raise ConfigError(f"{path}: 'exports' must be a table of tables ([exports.NAME])")
    base = os.path.dirname(os.path.abspath(path))
    out = []
    for name, table in tables.items():
        where = f"{path}: [exports.{name}]"
        if not isinstance(table, dict):
            raise ConfigError(f"{where} must be a table")
        unknown = sorted(set(table) - _EXPORT_KEYS)
        if unknown:
            known = ", ".join(sorted(_EXPORT_KEYS))
            raise ConfigError(f"{where}: unknown key {unknown[0]!r} (known: {known})")
        if "file" not in table:
            raise ConfigError(f"{where}: 'file' is required")
        file = str(_typed(table, "file", str, where))
        out.append(
            ExportConfig(
                name=name,
                path=os.path.join(base, file),
                read_only=_bool(table, "read-only", where),
                description=_str(table, "description", where) or "",
                tls_only=_bool(table, "tls-only", where),
                force_share=_bool(table, "force-share", where),
            )
        )
    return out


def build(cmd: CommandLine) -> ServerConfig:
    """Merge the flags and the optional file into one checked :class:`ServerConfig`."""
    data: dict[str, object] = {}
    exports: list[ExportConfig] = []
    if cmd.config_file is not None:
        data = _load_file(cmd.config_file)
        unknown = sorted(set(data) - _SERVER_KEYS)
        if unknown:
            raise ConfigError(f"{cmd.config_file}: unknown key {unknown[0]!r}")
        exports = _file_exports(cmd.config_file, data)
    if (cmd.name is not None or cmd.description is not None) and len(cmd.files) != 1:
        raise ConfigError("-x and -D apply to exactly one FILE")
    for file in cmd.files:
        exports.append(
            ExportConfig(
                name=cmd.name if cmd.name is not None else os.path.basename(file),
                path=file,
                read_only=cmd.read_only,
                description=cmd.description or "",
            )
        )
    if cmd.read_only:
        exports = [replace(e, read_only=True) for e in exports]
    if cmd.force_share:
        exports = [replace(e, force_share=True) for e in exports]
    for e in exports:
        if e.force_share and not e.read_only:
            raise ConfigError(f"export {e.name!r}: force-share needs a read-only export (-r)")
    if not exports:
        raise ConfigError("nothing to serve: give an image FILE or a --config file with [exports.NAME]")
    names = [e.name for e in exports]
    for name in names:
        if names.count(name) > 1:
            raise ConfigError(f"two exports are called {name!r} (use -x or the config file to rename one)")
    where = cmd.config_file or "config"
    default: str | None = None
    if "default" in data:
        default = _str(data, "default", where)
        if default not in names:
            raise ConfigError(f"{where}: default export {default!r} is not among the exports")
    elif len(exports) == 1:
        default = exports[0].name
    port = cmd.port if cmd.port is not None else _int(data, "port", where)
    if port is not None and not 0 <= port <= 65535:
        raise ConfigError(f"port {port} is not in 0..65535")
    max_clients = cmd.max_clients if cmd.max_clients is not None else _int(data, "max-clients", where) or 0
    if max_clients < 0:
        raise ConfigError(f"max clients {max_clients} is negative")
    socket_path = cmd.socket_path
    if socket_path is None and "socket" in data and cmd.port is None and cmd.bind is None:
        socket_path = _str(data, "socket", where)
    bind = cmd.bind if cmd.bind is not None else _str(data, "bind", where)
    tls, tls_creds, verify_peer = _tls_settings(cmd, data, where, exports)
    allow = tuple(_networks(cmd.allow if cmd.allow else _str_list(data, "allow", where), where))
    return ServerConfig(
        exports=tuple(exports),
        default_export=default,
        bind=bind if bind is not None else DEFAULT_BIND,
        port=port if port is not None else DEFAULT_PORT,
        socket_path=socket_path,
        max_clients=max_clients,
        pid_file=cmd.pid_file,
        tls=tls,
        tls_creds=tls_creds,
        tls_verify_peer=verify_peer,
        allow=allow,
        metrics=_address(cmd.metrics if cmd.metrics is not None else _str(data, "metrics", where), where),
        allow_backing=tuple(_backing_dirs(cmd, data, where)),
    )


def _from_file(cmd: CommandLine, path: str) -> str:
    """A path the config file gives: relative to the file's directory (only a file has keys)."""
    return os.path.join(os.path.dirname(os.path.abspath(cmd.config_file or ".")), path)


def _backing_dirs(cmd: CommandLine, data: Mapping[str, object], where: str) -> list[str]:
    """--allow-backing directories (the file's are relative to it), as real paths."""
    if cmd.allow_backing:
        dirs = list(cmd.allow_backing)
    else:
        dirs = [_from_file(cmd, d) for d in _str_list(data, "allow-backing", where)]
    for d in dirs:
        if not os.path.isdir(d):
            raise ConfigError(f"{where}: --allow-backing {d}: not a directory")
    return [os.path.realpath(d) for d in dirs]


def _address(value: str | None, where: str) -> tuple[str, int] | None:
    """``HOST:PORT``, ``[V6]:PORT`` or ``:PORT`` (all interfaces) → (host, port)."""
    if value is None:
        return None
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{where}: metrics address {value!r} is not HOST:PORT")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


def _str_list(table: Mapping[str, object], key: str, where: str) -> list[str]:
    value = table.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where}: '{key}' must be a list of strings")
    return [str(v) for v in value]


def _networks(values: Sequence[str], where: str) -> list[str]:
    """CIDR networks (an address alone is a /32 or /128), checked and normalised."""
    out = []
    for value in values:
        try:
            out.append(str(ipaddress.ip_network(value.strip(), strict=False)))
        except ValueError:
            raise ConfigError(f"{where}: --allow {value!r} is not an address or network (CIDR)") from None
    return out


def _tls_settings(
    cmd: CommandLine, data: Mapping[str, object], where: str, exports: Sequence[ExportConfig]
) -> tuple[str, str | None, bool]:
    """(mode, credentials directory, verify peer): flags win over the file; credentials alone
    mean ``require`` (as qemu-nbd: TLS configured is TLS enforced)."""
    creds = cmd.tls_creds
    if creds is None and "tls-creds" in data:
        file_creds = _str(data, "tls-creds", where)
        creds = _from_file(cmd, file_creds) if file_creds is not None else None
    mode = cmd.tls if cmd.tls is not None else _str(data, "tls", where)
    if mode is None:
        mode = "require" if creds is not None else "off"
    if mode not in TLS_MODES:
        raise ConfigError(f"{where}: tls must be one of {', '.join(TLS_MODES)}, not {mode!r}")
    verify_peer = cmd.tls_verify_peer or _bool(data, "tls-verify-peer", where)
    if mode != "off" and creds is None:
        raise ConfigError(
            f"--tls {mode} needs --tls-creds DIR (with ca-cert.pem, server-cert.pem, server-key.pem)"
        )
    if mode == "off" and verify_peer:
        raise ConfigError("--tls-verify-peer needs TLS (--tls-creds DIR)")
    for export in exports:
        if export.tls_only and mode == "off":
            raise ConfigError(f"export {export.name!r} is tls-only but TLS is off")
    return mode, creds if mode != "off" else None, verify_peer
