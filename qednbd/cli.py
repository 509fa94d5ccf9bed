"""The ``qednbd`` command: qemu-img's syntax and output shapes for QED images.

This is the only module that reads ``sys.argv``, configures logging and exits. Every
failure becomes one line on stderr (``qednbd: FILE: reason``) and exit status 1; a bug
shows its traceback only with ``QEDNBD_DEBUG=1``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import traceback
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, NoReturn

from qednbd import __version__
from qednbd.errors import ConfigError, QednbdError
from qednbd.qed import format as fmt

if TYPE_CHECKING:
    from qednbd.qed.locking import Access

# Each command imports the modules it needs when it runs: `qednbd check` on a big image
# is compared with qemu-img check, and importing every command's modules costs more
# than the check of a sparse terabyte.

_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([bkmgtpe]?)(?:i?b)?\s*$", re.IGNORECASE)
_UNITS = {"": 0, "b": 0, "k": 10, "m": 20, "g": 30, "t": 40, "p": 50, "e": 60}


def parse_size(text: str) -> int:
    """Bytes, or a number with a K/M/G/T/P/E suffix (powers of 1024), as qemu-img takes them."""
    match = _SIZE_RE.match(text)
    if not match:
        raise ConfigError(f"Invalid image size specified: '{text}'")
    number, unit = match.groups()
    value = float(number) * (1 << _UNITS[unit.lower()])
    if value != int(value) or value >= 1 << 63:
        raise ConfigError(f"Invalid image size specified: '{text}'")
    return int(value)


def parse_create_options(text: str | None) -> dict[str, int]:
    out: dict[str, int] = {}
    if not text:
        return out
    for item in text.split(","):
        key, _, value = item.partition("=")
        if key == "cluster_size":
            out[key] = parse_size(value)
        elif key == "table_size":
            if not value.isdigit():
                raise ConfigError(f"Parameter 'table_size' expects a number, got '{value}'")
            out[key] = int(value)
        else:
            raise ConfigError(f"Invalid parameter '{key}'")
    return out


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        print(f"qednbd: {message}", file=sys.stderr)
        sys.exit(1)


def _force_share(p: argparse.ArgumentParser, note: str = "") -> None:
    p.add_argument(
        "-U",
        "--force-share",
        dest="force_share",
        action="store_true",
        help=f"open the image even if another program is writing it (qemu-img's -U){note}",
    )


def _report_args(p: argparse.ArgumentParser, force_share_note: str = "") -> None:
    """What the read-only commands that report on an image (info, check, map) share."""
    p.add_argument("--output", choices=["human", "json"], default="human", help="human (default) or json")
    p.add_argument("-f", dest="format", choices=["qed"], default="qed", help="image format (qed)")
    _force_share(p, force_share_note)


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="qednbd",
        description="QED disk images: create, inspect, check and repair, convert, and serve over NBD.",
        epilog="Each command has its own --help. Documentation: docs/serve.md, docs/operations.md, "
        "docs/check.md, docs/format.md in the source tree.",
    )
    parser.add_argument("--version", action="version", version=f"qednbd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser(
        "create",
        help="create a new QED image",
        description="Create a QED image as qemu-img create -f qed does (same header, same tables).",
    )
    p.add_argument("-f", dest="format", default="qed", choices=["qed"], help="image format (qed)")
    p.add_argument("-o", dest="options", help="cluster_size=SIZE,table_size=N")
    p.add_argument("-b", dest="backing", help="backing file (relative to the image's directory)")
    p.add_argument("-F", dest="backing_format", choices=["raw", "qed"], help="backing file format")
    p.add_argument("filename")
    p.add_argument("size", nargs="?", help="bytes or K/M/G/T suffix; defaults to the backing file's")

    p = sub.add_parser(
        "info",
        help="show an image's header information",
        description="Show what qemu-img info shows: sizes, cluster size, backing file, dirty flag.",
    )
    _report_args(p)
    p.add_argument("filename", help="the QED image")

    p = sub.add_parser(
        "check",
        help="check an image's tables for corruption and leaks (-r repairs)",
        description="Check every table and cluster reference as qemu-img check does; exit 0 clean, "
        "1 check incomplete (I/O errors), 2 corruptions, 3 leaks only. Progress on a terminal.",
    )
    _report_args(p, " (not with -r)")
    p.add_argument(
        "-r",
        dest="repair",
        choices=["leaks", "all"],
        help="repair: 'leaks' clears invalid offsets and frees leaked space; 'all' also splits "
        "clusters referenced twice and clears entries that point into metadata",
    )
    p.add_argument("filename")

    p = sub.add_parser(
        "map",
        help="show allocation through the backing chain",
        description="List the image's extents as qemu-img map does (data, zero, depth, offset).",
    )
    _report_args(p)
    p.add_argument("filename", help="the QED image")

    p = sub.add_parser(
        "convert",
        help="copy an image to raw or QED, sparse",
        description="Copy the guest-visible contents (backing chain included) to a new raw or QED "
        "file, skipping zeros; a failed copy leaves no partial destination behind.",
    )
    p.add_argument("-f", dest="src_format", choices=["raw", "qed"], help="source format (probed if unset)")
    p.add_argument("-O", dest="dst_format", choices=["raw", "qed"], default="raw", help="output format")
    p.add_argument("-o", dest="options", help="cluster_size=SIZE,table_size=N (QED output)")
    p.add_argument("-p", dest="progress", action="store_true", help="show progress")
    _force_share(p, " (the source)")
    p.add_argument("source", help="raw or QED image")
    p.add_argument("destination", help="file to write (replaced if it exists)")

    p = sub.add_parser(
        "resize",
        help="grow an image (header only)",
        description="Grow an image's virtual size; only the header changes (shrinking is not "
        "supported, as in QEMU).",
    )
    p.add_argument("-f", dest="format", choices=["qed"], default="qed", help="image format (qed)")
    p.add_argument("filename", help="the QED image")
    p.add_argument("size", help="new size, or +SIZE to grow by SIZE")

    p = sub.add_parser(
        "rebase",
        help="change the backing file name (unsafe: data is not copied)",
        description="Point the image at another backing file (qemu-img rebase -u): no data moves.",
    )
    p.add_argument("-u", dest="unsafe", action="store_true", required=True, help="unsafe (header-only)")
    p.add_argument("-b", dest="backing", required=True, help="new backing file, '' for none")
    p.add_argument("-F", dest="backing_format", choices=["raw", "qed"])
    p.add_argument("-f", dest="format", choices=["qed"], default="qed", help="image format (qed)")
    p.add_argument("filename", help="the QED image")

    p = sub.add_parser(
        "serve",
        help="serve QED images over NBD",
        description="Serve QED images over NBD (foreground; SIGTERM/SIGINT stop it cleanly). "
        "A single FILE is also the default export (empty name).",
    )
    p.add_argument("-b", "--bind", dest="bind", help="address to listen on (default 127.0.0.1; IPv6 works)")
    p.add_argument("-p", "--port", dest="port", type=int, help="TCP port (default 10809; 0 picks a free one)")
    p.add_argument("-k", "--socket", dest="socket_path", help="serve on this Unix socket instead of TCP")
    p.add_argument("-x", "--export-name", dest="name", help="export name (default: the file's name)")
    p.add_argument("-D", "--description", dest="description", help="export description")
    p.add_argument("-r", "--read-only", dest="read_only", action="store_true", help="export read-only")
    _force_share(p, " (needs -r)")
    p.add_argument("-e", "--shared", dest="max_clients", type=int, help="most clients at once (0: no limit)")
    p.add_argument("--config", dest="config_file", help="TOML file with several exports (see docs/serve.md)")
    p.add_argument("--pid-file", dest="pid_file", help="write the process id here once listening")
    p.add_argument(
        "--tls-creds",
        dest="tls_creds",
        metavar="DIR",
        help="X.509 credentials: DIR/ca-cert.pem, server-cert.pem, server-key.pem (as qemu-nbd's)",
    )
    p.add_argument(
        "--tls",
        dest="tls",
        choices=["off", "on", "require"],
        help="on: TLS optional (tls-only exports need it); require: nothing before STARTTLS "
        "(the default once --tls-creds is given)",
    )
    p.add_argument(
        "--tls-verify-peer",
        dest="tls_verify_peer",
        action="store_true",
        help="clients must present a certificate signed by ca-cert.pem",
    )
    p.add_argument(
        "--tls-psk",
        dest="tls_psk",
        metavar="FILE",
        help="pre-shared keys (username:hexkey lines); needs Python 3.13's ssl PSK support",
    )
    p.add_argument(
        "--allow",
        dest="allow",
        action="append",
        default=[],
        metavar="CIDR",
        help="accept TCP clients only from this network (repeatable; default: any)",
    )
    p.add_argument(
        "--allow-backing",
        dest="allow_backing",
        action="append",
        default=[],
        metavar="DIR",
        help="backing files may also be in DIR (repeatable; default: only the image's own directory)",
    )
    p.add_argument(
        "--metrics",
        dest="metrics",
        metavar="ADDR:PORT",
        help="serve Prometheus metrics at http://ADDR:PORT/metrics (port 0 picks a free one)",
    )
    p.add_argument(
        "--log-format",
        dest="log_format",
        choices=["text", "json"],
        default="text",
        help="text (default) or JSON lines on stderr",
    )
    p.add_argument(
        "files",
        nargs="*",
        metavar="FILE",
        help="a QED image to export (named after the file; see -x, --config)",
    )
    return parser


def _warn(message: str) -> None:
    print(f"qednbd: warning: {message}", file=sys.stderr)


def cmd_create(args: argparse.Namespace) -> int:
    from qednbd.qed.image import create_image

    opts = parse_create_options(args.options)
    cluster_size = opts.get("cluster_size", fmt.DEFAULT_CLUSTER_SIZE)
    table_size = opts.get("table_size", fmt.DEFAULT_TABLE_SIZE)
    if args.backing and not args.backing_format:
        raise ConfigError("Backing file specified without backing format (use -F raw or -F qed)")
    size: int | None = parse_size(args.size) if args.size is not None else None
    if args.backing:
        backing = _open_backing_for_create(args.filename, args.backing, args.backing_format)
        if size is None:
            size = backing
    if size is None:
        raise ConfigError("Image creation needs a size parameter")
    shown = [f"fmt=qed size={size}"]
    if args.backing:
        shown.append(f"backing_file={args.backing} backing_fmt={args.backing_format}")
    shown.append(f"cluster_size={cluster_size}")
    if "table_size" in opts:
        shown.append(f"table_size={table_size}")
    print(f"Formatting '{args.filename}', " + " ".join(shown))
    create_image(
        args.filename,
        size,
        cluster_size=cluster_size,
        table_size=table_size,
        backing_file=args.backing or "",
        backing_format=args.backing_format,
    )
    rounded = -(-size // fmt.SECTOR_SIZE) * fmt.SECTOR_SIZE
    if not fmt.qemu_can_open(cluster_size, table_size, rounded):
        why = (
            "table_size=1" if table_size == 1 else f"cluster_size={cluster_size} with table_size={table_size}"
        )
        _warn(f"QEMU cannot open this image ({why}); qednbd can")
    return 0


def _open_backing_for_create(image_path: str, name: str, backing_format: str) -> int:
    """Open the backing file as qemu-img create does; return its size."""
    from qednbd.qed.backing import resolve_backing_path
    from qednbd.qed.image import open_layer

    layer = open_layer(resolve_backing_path(image_path, name), backing_format, ())
    try:
        return layer.size
    finally:
        layer.close()


def cmd_info(args: argparse.Namespace) -> int:
    from qednbd.qed.image import QedImage
    from qednbd.qed.info import human_info, image_info
    from qednbd.qed.storage import FileStorage

    access = _read_access(args, header_only=True)
    with QedImage.open(args.filename, read_only=True, open_backing=False, access=access) as image:
        storage = image.storage
        actual = storage.allocated_bytes() if isinstance(storage, FileStorage) else 0
        info = image_info(image, actual)
    if args.output == "json":
        print(json.dumps(info, indent=4))
    else:
        print(human_info(info))
    return 0


def _read_access(args: argparse.Namespace, header_only: bool = False) -> Access:
    """The locks a read-only command holds: a reader's (or, reading only the header, just the
    refusal of writers), as qemu-img's; with -U nothing is refused to anyone."""
    from qednbd.qed import locking

    access = locking.INSPECTOR if header_only else locking.READER
    return locking.shared(access) if args.force_share else access


def _terminal_progress() -> Callable[[float], None] | None:
    """A progress line on stderr when it is a terminal (it is erased when done)."""
    if not sys.stderr.isatty():
        return None

    def show(fraction: float) -> None:
        if fraction >= 1.0:
            sys.stderr.write("\r\033[K")
        else:
            sys.stderr.write(f"\r    ({100.0 * fraction:3.2f}/100%)")
        sys.stderr.flush()

    return show


def cmd_check(args: argparse.Namespace) -> int:
    """Exit status as qemu-img check's: 0 clean, 1 incomplete, 2 corruptions, 3 leaks only.

    The backing chain is opened (and locked as a reader) as qemu-img check opens it, although
    the check reads only the image's own tables: a chain that cannot be opened fails the check."""
    from qednbd.qed.check import check, report_human, report_json
    from qednbd.qed.image import QedImage
    from qednbd.qed.repair import repair

    if args.repair:
        if args.force_share:
            raise ConfigError("force-share=on can only be used with read-only images (not with -r)")
        with QedImage.open(args.filename, recover=False) as image:
            result = repair(image, args.repair, _terminal_progress())
        report = replace(
            result.after, corruptions_fixed=result.corruptions_fixed, leaks_fixed=result.leaks_fixed
        )
        if args.output == "human" and (result.corruptions_fixed or result.leaks_fixed):
            print(
                "The following inconsistencies were found and repaired:\n\n"
                f"    {result.leaks_fixed} leaked clusters\n    {result.corruptions_fixed} corruptions\n\n"
                "Double checking the fixed image now..."
            )
    else:
        access = _read_access(args)
        with QedImage.open(args.filename, read_only=True, access=access) as image:
            report = check(image, _terminal_progress())
    print(report_json(report, args.filename) if args.output == "json" else report_human(report))
    if report.check_errors:
        errors = [f.detail for f in report.findings if f.detail]
        reason = f": {errors[0]}" if errors else ""
        print(f"qednbd: {args.filename}: Check failed{reason}", file=sys.stderr)
    return report.exit_code


def cmd_map(args: argparse.Namespace) -> int:
    from qednbd.qed.image import QedImage
    from qednbd.qed.mapping import map_image

    with QedImage.open(args.filename, read_only=True, access=_read_access(args)) as image:
        extents = map_image(image)
    if args.output == "json":
        print("[" + ",\n".join(json.dumps(e.as_json()).replace("{", "{ ", 1) for e in extents) + "]")
        return 0
    print(f"{'Offset':<16}{'Length':<16}{'Mapped to':<16}File")
    for e in extents:
        if e.data and e.offset is not None:
            print(f"{_hex(e.start):<16}{_hex(e.length):<16}{_hex(e.offset):<16}{e.filename}")
    return 0


def _hex(value: int) -> str:
    return f"{value:#x}" if value else "0"


def cmd_convert(args: argparse.Namespace) -> int:
    from qednbd.convert import ConvertOptions, convert

    opts = parse_create_options(args.options)
    if opts and args.dst_format != "qed":
        raise ConfigError("-o cluster_size/table_size apply to QED output only")
    options = ConvertOptions(
        src_format=args.src_format,
        dst_format=args.dst_format,
        cluster_size=opts.get("cluster_size", fmt.DEFAULT_CLUSTER_SIZE),
        table_size=opts.get("table_size", fmt.DEFAULT_TABLE_SIZE),
        force_share=args.force_share,
    )
    if os.path.exists(args.destination) and os.path.samefile(args.source, args.destination):
        raise ConfigError("source and destination are the same file")
    show: Callable[[float], None] | None = None
    if args.progress:

        def show(percent: float) -> None:
            sys.stdout.write(f"    ({percent:3.2f}/100%)\r")
            sys.stdout.flush()

    convert(args.source, args.destination, options, show)
    if args.progress:
        sys.stdout.write("\n")
    return 0


def cmd_resize(args: argparse.Namespace) -> int:
    from qednbd.qed.image import QedImage

    text: str = args.size
    with QedImage.open(args.filename) as image:
        if text.startswith("+"):
            new_size = image.size + parse_size(text[1:])
        elif text.startswith("-"):
            raise ConfigError("Shrinking images is currently not supported")
        else:
            new_size = parse_size(text)
        image.resize(new_size)
    print("Image resized.")
    return 0


def cmd_rebase(args: argparse.Namespace) -> int:
    from qednbd.convert import detect_format
    from qednbd.qed.backing import resolve_backing_path
    from qednbd.qed.image import QedImage

    backing_format = args.backing_format
    with QedImage.open(args.filename, open_backing=False) as image:
        if args.backing and backing_format is None:
            path = resolve_backing_path(args.filename, args.backing)
            if os.path.exists(path):
                backing_format = detect_format(path)
        image.change_backing_file(args.backing, backing_format)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import logging

    from qednbd import config as cfg
    from qednbd import serve
    from qednbd.logfmt import formatter

    # Records need neither the process nor the thread: not looking them up saves ~5 us a line.
    logging.logProcesses = logging.logThreads = logging.logMultiprocessing = False
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter(args.log_format))
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    conf = cfg.build(
        cfg.CommandLine(
            files=args.files,
            bind=args.bind,
            port=args.port,
            socket_path=args.socket_path,
            name=args.name,
            description=args.description,
            read_only=args.read_only,
            force_share=args.force_share,
            max_clients=args.max_clients,
            config_file=args.config_file,
            pid_file=args.pid_file,
            tls=args.tls,
            tls_creds=args.tls_creds,
            tls_verify_peer=args.tls_verify_peer,
            allow=args.allow,
            metrics=args.metrics,
            allow_backing=args.allow_backing,
        )
    )
    if args.tls_psk is not None:  # Python's ssl module has PSK only from 3.13 on; not built yet
        why = "is not supported yet" if sys.version_info >= (3, 13) else "needs Python 3.13's ssl module"
        raise ConfigError(f"--tls-psk {why} (this is Python {sys.version.split()[0]}); use --tls-creds DIR")
    fds = serve.inherited_fds(os.environ)
    for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(var, None)  # not for our children
    return serve.serve(conf, fds)


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "create": cmd_create,
    "info": cmd_info,
    "check": cmd_check,
    "map": cmd_map,
    "convert": cmd_convert,
    "resize": cmd_resize,
    "rebase": cmd_rebase,
    "serve": cmd_serve,
}


def _subject(args: argparse.Namespace) -> str:
    """The file a failure is about; convert's errors name their own file."""
    for attr in ("filename",):
        value = getattr(args, attr, None)
        if value:
            return f"{value}: "
    return ""


def _log_warnings() -> None:
    """Log records of the image commands (a filesystem without locks, say) as ``qednbd: warning: …``."""
    import logging

    class Plain(logging.Formatter):
        def format(self, record: logging.LogRecord) -> str:
            return f"qednbd: {record.levelname.lower()}: {record.getMessage()}"

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(Plain())
    logging.basicConfig(level=logging.WARNING, handlers=[handler])


def main(argv: Sequence[str] | None = None) -> NoReturn:
    words = list(sys.argv[1:] if argv is None else argv)
    if words[:1] == ["resize"] and words[-1:] and re.match(r"-[0-9]", words[-1]):
        words.insert(len(words) - 1, "--")  # a negative size is an argument, not an option
    args = _build_parser().parse_args(words)
    if args.command != "serve":  # serve sets up its own log; the others print warnings as _warn does
        _log_warnings()
    try:
        code = COMMANDS[args.command](args)
    except (QednbdError, OSError) as exc:
        message = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        print(f"qednbd: {_subject(args)}{message}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        code = 130
    except Exception as exc:  # a bug: one line unless asked for the traceback
        if os.environ.get("QEDNBD_DEBUG"):
            traceback.print_exc()
        print(f"qednbd: {_subject(args)}internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
        code = 1
    sys.exit(code)
