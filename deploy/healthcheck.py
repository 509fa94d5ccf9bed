#!/usr/bin/python3
"""Health check for an NBD server: connect, check the newstyle greeting, leave politely.

A server is healthy when, within the timeout, it accepts a connection and sends the fixed
newstyle greeting ``"NBDMAGIC" "IHAVEOPT"`` + 16-bit handshake flags. The check then sends its
client flags and ``NBD_OPT_ABORT``, and waits (briefly) for the server's ACK or for it to close,
so that the server sees an orderly goodbye rather than a reset. ``NBD_OPT_ABORT`` is allowed
before STARTTLS, so the check also works against ``tls = "require"``. It uses the standard
library only: it runs with the image's ``/usr/bin/python3``, in a Kubernetes exec probe too.

    qednbd-healthcheck                          # 127.0.0.1:10809
    qednbd-healthcheck --host ::1 --port 10810 --timeout 2
    qednbd-healthcheck --unix /run/qednbd/nbd.sock

Exit status 0 healthy, 1 not (the reason on stderr, one line).
"""

from __future__ import annotations

import argparse
import socket
import struct
import sys
import time

GREETING = b"NBDMAGICIHAVEOPT"  # NBD_MAGIC, then IHAVEOPT: fixed newstyle negotiation
IHAVEOPT = 0x49484156454F5054
REPLY_MAGIC = 0x3E889045565A9
NBD_FLAG_FIXED_NEWSTYLE = 1 << 0  # handshake flags from the server
NBD_FLAG_NO_ZEROES = 1 << 1
NBD_FLAG_C_FIXED_NEWSTYLE = 1 << 0  # client flags
NBD_FLAG_C_NO_ZEROES = 1 << 1
NBD_OPT_ABORT = 2
NBD_REP_ACK = 1

HANDSHAKE_FLAGS = struct.Struct(">H")
CLIENT_FLAGS = struct.Struct(">I")
OPTION = struct.Struct(">QII")  # IHAVEOPT, option, length of data
OPTION_REPLY = struct.Struct(">QIII")  # reply magic, option, reply type, length of data


class Unhealthy(Exception):
    """The server did not answer like an NBD server."""


def recv_exactly(sock: socket.socket, n: int, deadline: float) -> bytes:
    """``n`` bytes, or Unhealthy when the peer closes first or the deadline passes."""
    buf = bytearray()
    while len(buf) < n:
        left = deadline - time.monotonic()
        if left <= 0:
            raise Unhealthy(f"timed out after {len(buf)} of {n} bytes")
        sock.settimeout(left)
        try:
            chunk = sock.recv(n - len(buf))
        except TimeoutError:
            raise Unhealthy(f"timed out after {len(buf)} of {n} bytes") from None
        if not chunk:
            raise Unhealthy(f"connection closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def handshake(sock: socket.socket, deadline: float) -> None:
    """Read and check the greeting, send the client flags and NBD_OPT_ABORT."""
    greeting = recv_exactly(sock, len(GREETING) + HANDSHAKE_FLAGS.size, deadline)
    if greeting[: len(GREETING)] != GREETING:
        raise Unhealthy(f"not an NBD newstyle greeting: {greeting[: len(GREETING)]!r}")
    (flags,) = HANDSHAKE_FLAGS.unpack_from(greeting, len(GREETING))
    if not flags & NBD_FLAG_FIXED_NEWSTYLE:
        raise Unhealthy(f"server lacks fixed newstyle negotiation (handshake flags {flags:#x})")
    client_flags = NBD_FLAG_C_FIXED_NEWSTYLE | (NBD_FLAG_C_NO_ZEROES if flags & NBD_FLAG_NO_ZEROES else 0)
    sock.sendall(CLIENT_FLAGS.pack(client_flags) + OPTION.pack(IHAVEOPT, NBD_OPT_ABORT, 0))
    # The server should ACK the ABORT and close; the check has already passed, so a server that
    # just closes (the spec allows it) or a late reply only shortens the goodbye.
    try:
        reply = recv_exactly(sock, OPTION_REPLY.size, min(deadline, time.monotonic() + 1.0))
    except (Unhealthy, OSError):
        return
    magic, option, reply_type, _length = OPTION_REPLY.unpack(reply)
    if magic != REPLY_MAGIC or option != NBD_OPT_ABORT or reply_type != NBD_REP_ACK:
        raise Unhealthy(f"unexpected reply to NBD_OPT_ABORT: magic {magic:#x} type {reply_type:#x}")


def check(host: str, port: int, unix: str | None, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    try:
        if unix is not None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            try:
                sock.connect(unix)
            except BaseException:
                sock.close()
                raise
        else:
            sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as e:
        where = unix if unix is not None else f"{host}:{port}"
        raise Unhealthy(f"cannot connect to {where}: {e.strerror or e}") from None
    with sock:
        try:
            handshake(sock, deadline)
        except OSError as e:
            raise Unhealthy(f"handshake failed: {e.strerror or e}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qednbd-healthcheck", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="server address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=10809, help="TCP port (default 10809)")
    parser.add_argument("--unix", metavar="PATH", help="check a Unix socket instead of TCP")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds for the whole check (default 5)")
    args = parser.parse_args(argv)
    try:
        check(args.host, args.port, args.unix, args.timeout)
    except Unhealthy as e:
        print(f"qednbd-healthcheck: unhealthy: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
