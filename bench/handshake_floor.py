"""What an NBD handshake costs on Python's asyncio before qednbd does any work of its own.

``python bench/handshake_floor.py`` times libnbd's connect + handshake + close (as the
``handshake_unix`` row of serve_bench.py does) against three servers on Unix sockets, in
alternating rounds: qednbd, qemu-nbd, and *the floor* — an asyncio Protocol that answers libnbd's
options with canned bytes (no parsing, no image, no logging). If the floor is as slow as qednbd,
the handshake's cost is asyncio's per-connection work (accept, a Task, the transport, one
callback per round trip), not qednbd's.

``python bench/handshake_floor.py --serve SOCKET`` runs the floor server alone.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import struct
import sys
import tempfile
from pathlib import Path

from benchkit import LIBNBD_PYTHON, Server, measure, qemu_img_create, run, stop_all
from serve_bench import HANDSHAKE

OPTS_MAGIC = 0x49484156454F5054
REPLY_MAGIC = 0x3E889045565A9
OPT_GO, OPT_STRUCTURED_REPLY = 7, 8
REP_ACK, REP_INFO, REP_ERR_UNSUP = 1, 3, (1 << 31) + 1
SIZE = 64 << 20
FLAGS = 1 | 4 | 8 | 32 | 64 | 128  # HAS_FLAGS, SEND_FLUSH, SEND_FUA, SEND_TRIM, SEND_WRITE_ZEROES, SEND_DF


def _reply(option: int, kind: int, data: bytes = b"") -> bytes:
    return struct.pack(">QIII", REPLY_MAGIC, option, kind, len(data)) + data


class CannedHandshake(asyncio.Protocol):
    """Greeting; ACK to STRUCTURED_REPLY; INFO_EXPORT + ACK to GO; close at the first request."""

    def __init__(self) -> None:
        self.buf = b""
        self.step = 0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(b"NBDMAGIC" + struct.pack(">QH", OPTS_MAGIC, 3))

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.buf += data
        while True:
            if self.step == 0:  # client flags
                if len(self.buf) < 4:
                    return
                self.buf, self.step = self.buf[4:], 1
            elif self.step == 1:  # options
                if len(self.buf) < 16:
                    return
                _, option, length = struct.unpack(">QII", self.buf[:16])
                if len(self.buf) < 16 + length:
                    return
                self.buf = self.buf[16 + length :]
                if option == OPT_STRUCTURED_REPLY:
                    self.transport.write(_reply(option, REP_ACK))
                elif option == OPT_GO:
                    info = struct.pack(">HQH", 0, SIZE, FLAGS)
                    self.transport.write(_reply(option, REP_INFO, info) + _reply(option, REP_ACK))
                    self.step = 2
                else:
                    self.transport.write(_reply(option, REP_ERR_UNSUP))
            else:  # transmission: the first request is DISC; close
                if len(self.buf) >= 28:
                    self.transport.close()
                return


async def serve(path: str) -> None:
    server = await asyncio.get_running_loop().create_unix_server(CannedHandshake, path)
    async with server:
        await server.serve_forever()


def compare(rounds: int, n: int) -> None:
    with tempfile.TemporaryDirectory(prefix="hsfloor-") as tmp:
        work = Path(tmp)
        image = qemu_img_create(work / "d.qed", SIZE)
        results: dict[str, list[tuple[float, float]]] = {"floor": [], "qednbd": [], "qemu-nbd": []}
        try:
            for _ in range(rounds):
                for kind in results:
                    with Server(kind, image, work) as server:
                        with measure([server.pid]) as use:
                            out = json.loads(run([LIBNBD_PYTHON, "-c", HANDSHAKE, server.uri, str(n)]))
                        results[kind].append((out["total"] / n * 1e6, use.server_cpu / n * 1e6))
        finally:
            stop_all()
        print(f"handshake + close over a Unix socket, {n} connections x {rounds} rounds, medians:")
        for kind, samples in results.items():
            wall = statistics.median(s[0] for s in samples)
            cpu = statistics.median(s[1] for s in samples)
            print(f"  {kind:9} {wall:7.0f} µs/conn   server CPU {cpu:6.0f} µs/conn")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--serve", metavar="SOCKET", help="run the floor server on this Unix socket")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--handshakes", type=int, default=500)
    args = parser.parse_args()
    if args.serve:
        asyncio.run(serve(args.serve))
        return 0
    compare(args.rounds, args.handshakes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
