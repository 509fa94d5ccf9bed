"""The NBD server: asyncio listeners, connections, shutdown.

Theory of operation
-------------------
* One process, one event loop. Each accepted socket gets a :class:`Connection` (an
  ``asyncio.BufferedProtocol``) that feeds what it reads to the sans-I/O machines — first
  :class:`~qednbd.nbd.handshake.ServerHandshake`, then :class:`~qednbd.nbd.transmission.Transmission`
  — and parses every request a received chunk completes before it returns to the loop. Bytes
  are received into one scratch buffer shared by all connections, except the rest of a large
  WRITE payload, which is received straight into the payload (no copy in Python).
* Requests are answered by :meth:`qednbd.export.Export.handle` inline, on the loop thread, in
  arrival order; the image is touched by that one thread only. Replies that need stable storage
  (FLUSH, FUA) wait for :meth:`Export.flush` in a small thread pool, and large READs read their
  planned file extents in another (:mod:`qednbd.export`), so other requests — on this connection
  and on others — go on meanwhile and their replies overtake (NBD allows any order).
* The fast path: small replies of one received chunk are gathered and sent with one socket write;
  large replies are written buffer by buffer (no join copy) into a 4 MiB socket buffer; cached
  READs of 64 KiB-4 MiB are sent zero-copy (header with ``os.write``, data with sendfile) when the
  transport has nothing queued — which is only valid on a plain socket (a TLS transport must not
  take this path).
* Latency: after a wake-up that brought one small request, the loop's selector spins briefly
  before it sleeps again (:mod:`qednbd.loop`), so a QD1 client's next request does not pay for
  waking the server; :func:`serve_forever` runs on that selector.
* Bounds: a handshake must finish within :data:`HANDSHAKE_TIMEOUT_SECONDS`; at most
  :data:`MAX_WAITING_REPLIES` replies may wait for a flush per connection, and reading stops while
  the transport's send buffer is full (a client that does not read its replies stops being read).
  ``max_clients`` connections are served; the next one is answered NBD_REP_ERR_POLICY on every
  option (the client learns why) and the others go on.
* A framing error (bad magic, absurd payload) closes only that connection. An unexpected
  exception while serving a request is logged with its traceback and answered EIO.
* Dirty bit: every :data:`IDLE_POLL_SECONDS` each writable export's image may clear NEED_CHECK
  once it has seen no allocating write for 5 s (:meth:`QedImage.poll_idle`).
* Shutdown (SIGTERM/SIGINT, :meth:`Server.shutdown`): close the listeners, refuse options on
  connections still negotiating, stop reading on the others, let their waiting replies go out,
  close them; then flush and close every image (which clears the dirty bit).
* TLS: when the handshake says :class:`~qednbd.nbd.handshake.StartTls`, reading stops, the ACK
  leaves, and ``loop.start_tls`` wraps the connection; options that arrive decrypted before
  ``start_tls`` returns are held and fed once the handshake machine knows TLS is up. The TLS
  transport never takes the sendfile path. ``--allow`` drops TCP clients from other networks
  before the greeting.
* Listeners: TCP (IPv4 or IPv6), a Unix socket, or the sockets systemd passes
  (``LISTEN_FDS``/``LISTEN_PID``, fds from 3).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import ipaddress
import logging
import os
import signal
import socket
import ssl
import stat
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Final

from qednbd.config import ServerConfig
from qednbd.errors import ConfigError, QednbdError
from qednbd.export import Export, ZeroCopy
from qednbd.loop import SpinningSelector
from qednbd.metrics import N_COMMANDS
from qednbd.nbd.constants import Command, Errno
from qednbd.nbd.handshake import (
    NEED_DATA,
    Closed,
    MetaContext,
    Ready,
    ServerHandshake,
    StartTls,
    StaticCatalog,
    TlsMode,
)
from qednbd.nbd.transmission import (
    Buffer,
    EndOfStream,
    ProtocolViolation,
    Request,
    Transmission,
    command_name,
)

log = logging.getLogger("qednbd.server")

# A client that has not chosen an export by then is gone or hostile (qemu-nbd uses 10 s too).
HANDSHAKE_TIMEOUT_SECONDS: Final = 10.0
# Replies held back until a flush completes, per connection, before we stop reading requests.
MAX_WAITING_REPLIES: Final = 64
# fdatasync calls that may run at once (they release the GIL; more would only queue in the kernel).
FLUSH_THREADS: Final = 4
# Large preads that may run at once (separate from flushes, so reads never queue behind fdatasync).
READ_THREADS: Final = 4
# Bytes of READ replies being produced by workers per connection before we stop taking requests.
MAX_WAITING_BYTES: Final = 128 * 1024 * 1024
# Replies shorter than this are gathered and sent with one socket write per received chunk (at
# QD32 that is ~30 replies per send instead of one: the send is most of a 4 KiB request's cost).
BATCH_REPLY_BYTES: Final = 64 * 1024
# ...but no more than this is gathered before it is written (and backpressure is checked).
MAX_BATCH_BYTES: Final = 256 * 1024
# After answering a request at least this long, let other connections' callbacks run first.
YIELD_AFTER_BYTES: Final = 1024 * 1024
# In a shutdown, a connection is closed once its client has sent nothing for this long.
SHUTDOWN_QUIET_SECONDS: Final = 0.5
# Socket send buffer: a 1 MiB READ reply then usually leaves in one send, without asyncio
# copying the unsent rest into its own buffer.
SEND_BUFFER_BYTES: Final = 4 * 1024 * 1024
# One receive takes at most this much (what asyncio's own data_received path takes).
RECEIVE_BUFFER_BYTES: Final = 256 * 1024
# A WRITE payload with at least this much still to come is received straight into its buffer.
DIRECT_PAYLOAD_BYTES: Final = 64 * 1024
# How often the dirty bit's idle timer is checked; the bit clears 5-6 s after the last allocation.
IDLE_POLL_SECONDS: Final = 1.0
# How long a shutdown waits for clients to take their last replies before it drops them.
SHUTDOWN_GRACE_SECONDS: Final = 10.0
# First file descriptor systemd passes (sd_listen_fds(3)).
SD_LISTEN_FDS_START: Final = 3


_monotonic: Final = time.monotonic
_READ: Final = int(Command.READ)
_WRITE: Final = int(Command.WRITE)
_CHANGES_DATA: Final = frozenset(int(c) for c in (Command.WRITE, Command.WRITE_ZEROES, Command.TRIM))


def _write_large(transport: asyncio.Transport, buffers: list[Buffer]) -> None:
    """Send a large reply buffer by buffer: ``writelines`` would first join them (a copy of
    the whole payload); ``write`` hands each to the socket directly when nothing is queued."""
    for buffer in buffers:
        transport.write(buffer)


def _nothing() -> None:
    pass


def _flush_then(flush: Callable[[], None], buffers: list[Buffer]) -> list[Buffer]:
    flush()
    return buffers


def _flush_quietly(export: Export) -> Callable[[], list[Buffer]]:
    """A flush whose outcome nobody waits for (after DISC): failures are logged, not sent."""

    def work() -> list[Buffer]:
        try:
            export.flush()
        except (OSError, QednbdError) as exc:
            log.error("export %r: flush after disconnect failed: %s", export.name, exc)
        return []

    return work


class ExportSet:
    """The server's exports by name: the handshake's catalog, and the images behind it."""

    def __init__(self, exports: Iterable[Export], default: str | None) -> None:
        self.exports = {export.name: export for export in exports}
        self.catalog = StaticCatalog((e.info for e in self.exports.values()), default)

    def close(self) -> None:
        for export in self.exports.values():
            try:
                export.close()
            except Exception as exc:  # keep closing the others; the reason is logged once
                log.error("closing export %r failed: %s", export.name, exc)


class Connection(asyncio.BufferedProtocol):
    """One client. See the module docstring."""

    def __init__(self, server: Server) -> None:
        self._server = server
        self._loop = server.loop
        self._transport: asyncio.Transport | None = None
        self._peer = "?"
        self._handshake: ServerHandshake | None = ServerHandshake(server.exports.catalog, server.tls_mode)
        self._tls = False  # the connection did STARTTLS
        self._tls_task: asyncio.Task[None] | None = None
        self._tls_early: bytearray | None = None  # options that arrive while start_tls finishes
        self.requests = self.bytes_read = self.bytes_written = self.errors = 0  # this connection's
        self._since = 0.0  # when transmission started
        self._transmission: Transmission | None = None
        self._export: Export | None = None
        self._contexts: tuple[MetaContext, ...] = ()
        self._timer: asyncio.TimerHandle | None = None
        self._waiting: set[asyncio.Future[list[Buffer]]] = set()
        self._pause_reasons: set[str] = set()
        self._closing = False  # no more requests: DISC, end of stream, violation or shutdown
        self.refused = False  # over the client limit: not counted against it
        self._stopping = False  # the server is shutting down
        self._quiet_timer: asyncio.TimerHandle | None = None
        self._serve_scheduled = False
        self._waiting_bytes = 0  # READ reply bytes being produced by workers
        self._unflushed = False  # this client changed data since its last FLUSH (flushed at DISC)
        self._sock_fd = -1  # for sendfile
        self._direct = False  # the last get_buffer returned a WRITE payload's own buffer
        self.closed = asyncio.get_running_loop().create_future()

    # --- asyncio callbacks --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        sock = transport.get_extra_info("socket")
        peer = transport.get_extra_info("peername")
        self._peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "unix socket"
        if sock is not None:
            self._sock_fd = sock.fileno()
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with contextlib.suppress(OSError):  # the kernel caps it at net.core.wmem_max
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
        server = self._server
        server.connections.add(self)
        if isinstance(peer, tuple) and not server.allowed(peer[0]):
            log.warning("refusing %s: not in --allow", self._peer)
            self._closing = True
            self.refused = True
            transport.abort()
            return
        assert self._handshake is not None
        limit = server.max_clients
        if limit and server.serving_count() > limit:
            self.refused = True
            log.warning("refusing %s: %d clients already (limit %d)", self._peer, limit, limit)
            self._handshake.refuse(f"the server is at its limit of {limit} clients; try again later")
        elif server.shutting_down:
            self._handshake.begin_shutdown()
        self._timer = self._loop.call_later(HANDSHAKE_TIMEOUT_SECONDS, self._handshake_timeout)
        transport.write(self._handshake.data_to_send())

    def get_buffer(self, sizehint: int) -> memoryview:
        """Where the next receive goes: straight into a large WRITE payload when one is arriving
        (no copies in Python), else the server's scratch buffer, consumed by
        :meth:`buffer_updated` before the loop reads anything else."""
        t = self._transmission
        if t is not None and not self._closing:
            direct = t.payload_buffer(DIRECT_PAYLOAD_BYTES)
            if direct is not None:
                self._direct = True
                return direct
        self._direct = False
        return self._server.scratch

    def buffer_updated(self, nbytes: int) -> None:
        if self._closing:
            return
        if self._stopping:
            self._arm_quiet_timer()
        try:
            if self._direct:
                assert self._transmission is not None
                self._transmission.payload_received(nbytes)
                self._serve()
            elif self._tls_early is not None:  # decrypted before start_tls handed us the transport
                self._tls_early += self._server.scratch[:nbytes]
            elif self._handshake is not None:
                self._handshake.receive_data(self._server.scratch[:nbytes])
                self._advance_handshake()
            elif self._transmission is not None:
                self._transmission.receive_data(self._server.scratch[:nbytes])
                self._serve()
        except Exception:
            log.exception("%s: internal error; closing the connection", self._peer)
            self._abort()

    def eof_received(self) -> bool:
        if self._tls_early is not None:  # gone in the middle of STARTTLS
            self._abort()
        elif not self._closing:
            self._end_of_input()
        return not self._tls  # we close once the waiting replies are out (TLS cannot half-close)

    def _end_of_input(self) -> None:
        if self._handshake is not None:
            self._handshake.receive_data(b"")
            self._advance_handshake()
        elif self._transmission is not None:
            self._transmission.receive_data(b"")
            self._serve()

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        for timer in (self._timer, self._quiet_timer):
            if timer is not None:
                timer.cancel()
        self._server.connections.discard(self)
        if self._export is not None and self._transmission is not None:
            self._export.stats.connections -= 1
            seconds = _monotonic() - self._since
            log.info(
                "%s: export %r closed after %.1f s: %d requests, %d bytes read, %d written, %d errors",
                self._peer,
                self._export.name,
                seconds,
                self.requests,
                self.bytes_read,
                self.bytes_written,
                self.errors,
                extra={
                    "event": "disconnect",
                    "client": self._peer,
                    "export": self._export.name,
                    "seconds": round(seconds, 3),
                    "requests": self.requests,
                    "bytes_read": self.bytes_read,
                    "bytes_written": self.bytes_written,
                    "errors": self.errors,
                    "tls": self._tls,
                },
            )
        if not self.closed.done():
            self.closed.set_result(None)

    def pause_writing(self) -> None:
        self._pause("send buffer full")

    def resume_writing(self) -> None:
        self._resume("send buffer full")

    # --- handshake ----------------------------------------------------------------------------

    def _handshake_timeout(self) -> None:
        if self._handshake is not None:
            limit = HANDSHAKE_TIMEOUT_SECONDS
            log.warning("%s: handshake not finished after %.0f s; closing", self._peer, limit)
            self._abort()

    def _advance_handshake(self) -> None:
        hs = self._handshake
        assert hs is not None and self._transport is not None
        event = hs.next_event()
        out = hs.data_to_send()
        if out:
            self._transport.write(out)
        if event is NEED_DATA:
            return
        if isinstance(event, StartTls):  # the handshake limit covers the TLS handshake too
            # Not a byte more for the plaintext parser: the client's TLS hello follows our ACK,
            # and start_tls (which takes over reading) only runs on the loop's next turn.
            self._transport.pause_reading()
            self._tls_early = bytearray()
            self._tls_task = self._loop.create_task(self._start_tls())
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if isinstance(event, Closed):
            (log.debug if event.graceful else log.info)("%s: handshake ended: %s", self._peer, event.reason)
            self._closing = True
            self._transport.close()
            return
        assert isinstance(event, Ready)
        self._start_transmission(event, hs.trailing_data)

    def _count_error(self, nbd_errno: int) -> None:
        self.errors += 1
        if self._export is not None:
            self._export.stats.error(nbd_errno)

    async def _start_tls(self) -> None:
        """STARTTLS was ACKed: run the TLS handshake on this connection, then go on negotiating."""
        transport, context = self._transport, self._server.tls_context
        assert transport is not None and context is not None
        try:
            upgraded = await self._loop.start_tls(
                transport, self, context, server_side=True, ssl_handshake_timeout=HANDSHAKE_TIMEOUT_SECONDS
            )
        except (TimeoutError, OSError, ssl.SSLError, ConnectionError) as exc:
            log.info("%s: TLS handshake failed: %s", self._peer, exc)
            self._abort()
            return
        if upgraded is None or self._handshake is None or self._closing:
            return
        self._transport = upgraded
        self._sock_fd = -1  # sendfile would bypass TLS: no zero-copy READs on this connection
        self._tls = True
        self._handshake.tls_started()
        early, self._tls_early = self._tls_early, None
        if early:
            self._handshake.receive_data(early)
        self._advance_handshake()

    def _start_transmission(self, ready: Ready, trailing: bytes) -> None:
        self._handshake = None
        self._export = self._server.exports.exports[ready.export.name]
        self._contexts = ready.negotiated.meta_contexts
        self._transmission = Transmission(ready)
        self._transmission.replies.on_error = self._count_error
        self._since = _monotonic()
        self._export.stats.connections += 1
        self._export.stats.connections_total += 1
        log.info(
            "%s: export %r, %s replies%s%s",
            self._peer,
            ready.export.name,
            self._transmission.replies.mode.name.lower(),
            ", TLS" if self._tls else "",
            "".join(f", {c.name}" for c in self._contexts),
            extra={
                "event": "connect",
                "client": self._peer,
                "export": ready.export.name,
                "replies": self._transmission.replies.mode.name.lower(),
                "tls": self._tls,
            },
        )
        if trailing:
            self._transmission.receive_data(trailing)
            self._serve()

    # --- transmission -------------------------------------------------------------------------

    def _serve(self) -> None:
        """Answer the buffered requests, one at a time, while the connection is not paused.

        Stops while paused (send buffer full, too much waiting in workers), so a client that does
        not read its replies cannot make the server build them all in memory; :meth:`_resume`
        comes back here. After a large request it yields to the loop (other clients go first).
        """
        self._serve_scheduled = False
        t = self._transmission
        export = self._export
        transport = self._transport
        assert t is not None and export is not None and transport is not None
        replies = t.replies
        batch: list[Buffer] = []  # small replies, sent with one socket write
        batch_bytes = 0
        answered = 0
        last_length = 0
        started = _monotonic()
        reads = read_bytes = writes = write_bytes = 0  # fast-path counts, for the statistics
        others = [0] * N_COMMANDS  # other requests answered in this pass, by command
        try:
            while not self._pause_reasons and not self._closing:
                if batch_bytes >= MAX_BATCH_BYTES:
                    transport.writelines(batch)  # may pause writing: the loop condition sees it
                    batch, batch_bytes = [], 0
                    continue
                event = t.next_event()
                if type(event) is not Request:
                    if isinstance(event, ProtocolViolation):
                        log.warning("%s: %s; closing the connection", self._peer, event.reason)
                        self._closing = True
                    elif isinstance(event, EndOfStream):
                        self._closing = True
                    break  # or NEED_DATA
                answered += 1
                last_length = event.length
                if event.command == _READ and not event.error and not self._stopping:
                    inline = export.read_inline(event, replies)  # the fast path: small cached READs
                    if inline is not None:
                        batch += inline
                        batch_bytes += event.length
                        reads += 1
                        read_bytes += event.length
                        continue
                elif (  # the fast path: overwrites without FUA
                    event.command == _WRITE
                    and not event.error
                    and not self._stopping
                    and export.write_inline(event)
                ):
                    self._unflushed = True
                    batch.append(replies.ok_reply(event))
                    batch_bytes += 16
                    writes += 1
                    write_bytes += event.length
                    continue
                if event.error:
                    error = replies.error(event, event.error, event.message)
                    batch.append(error)
                    batch_bytes += len(error)
                    others[event.command % N_COMMANDS] += 1
                    continue
                if event.command == Command.DISC:
                    # No reply; answer what is in flight, flush what this client wrote, then close.
                    self._closing = True
                    if self._unflushed:
                        self._in_background(event, self._server.flush_pool, _flush_quietly(export))
                    break
                if self._stopping:
                    error = replies.error(event, Errno.ESHUTDOWN, "server is shutting down")
                    batch.append(error)
                    batch_bytes += len(error)
                    others[event.command % N_COMMANDS] += 1
                    continue
                if event.command in _CHANGES_DATA:
                    self._unflushed = True
                elif event.command == Command.FLUSH:
                    self._unflushed = False
                try:
                    reply = export.handle(event, replies, self._contexts)
                    if event.payload is not None:  # written: its buffer can take the next one
                        t.recycle(event.payload)
                except Exception:
                    log.exception("%s: %s failed unexpectedly", self._peer, command_name(event.command))
                    self._server.internal_errors += 1
                    batch.append(replies.error(event, Errno.EIO, "internal server error"))
                    others[event.command % N_COMMANDS] += 1
                    continue
                if reply.background is None and not reply.flush_first:  # answered in this pass
                    others[event.command % N_COMMANDS] += 1
                    if reply.failed:
                        pass
                    elif event.command == _READ:
                        read_bytes += event.length
                    elif event.command == _WRITE:
                        write_bytes += event.length
                if reply.background is not None:
                    self._in_background(event, self._server.read_pool, reply.background, event.length)
                elif reply.flush_first:
                    work = functools.partial(_flush_then, export.flush, reply.buffers)
                    self._in_background(event, self._server.flush_pool, work)
                elif reply.zero_copy is not None:
                    if batch:
                        transport.writelines(batch)
                        batch, batch_bytes = [], 0
                    self._send_zero_copy(export, reply.zero_copy)
                else:
                    size = sum(map(len, reply.buffers))
                    if size >= BATCH_REPLY_BYTES:  # large replies go alone: joining them only copies
                        if batch:
                            transport.writelines(batch)
                            batch, batch_bytes = [], 0
                        _write_large(transport, reply.buffers)
                    else:
                        batch.extend(reply.buffers)
                        batch_bytes += size
                if event.length >= YIELD_AFTER_BYTES:
                    self._schedule_serve()
                    return
        finally:
            if batch:
                transport.writelines(batch)
            if answered:
                self._account(started, reads, read_bytes, writes, write_bytes, others)
        if self._closing:
            self._finish()
        elif answered == 1 and last_length < BATCH_REPLY_BYTES:
            self._server.expect_soon()  # a lone small request: its client may be latency-bound

    def _account(
        self, started: float, reads: int, read_bytes: int, writes: int, write_bytes: int, others: list[int]
    ) -> None:
        """Add one pass's requests to the export's statistics and this connection's totals."""
        assert self._export is not None
        stats = self._export.stats
        seconds = _monotonic() - started
        reads += others[_READ]
        writes += others[_WRITE]
        others[_READ] = others[_WRITE] = 0
        if reads:
            stats.record(_READ, reads, read_bytes, seconds)
        if writes:
            stats.record(_WRITE, writes, write_bytes, seconds)
        total = reads + writes
        for command, count in enumerate(others):
            if count:
                stats.record(command, count, 0, seconds)
                total += count
        self.requests += total
        self.bytes_read += read_bytes
        self.bytes_written += write_bytes

    def _send_zero_copy(self, export: Export, zc: ZeroCopy) -> None:
        """Header, then the file bytes with sendfile, straight to the socket when nothing is queued
        in the transport (else, or for what the socket did not take, through the transport)."""
        transport = self._transport
        assert transport is not None
        sent = 0
        if self._sock_fd >= 0 and transport.get_write_buffer_size() == 0 and not transport.is_closing():
            try:
                head = os.write(self._sock_fd, zc.header)
                if head == len(zc.header):
                    sent = export.send_file(self._sock_fd, zc.host_offset, zc.length)
            except BlockingIOError:
                head = 0
            except (OSError, QednbdError) as exc:  # the client went away under us
                log.info("%s: send failed: %s", self._peer, exc)
                self._abort()
                return
            if head < len(zc.header):
                transport.write(zc.header[head:])
        else:
            transport.write(zc.header)
        if sent < zc.length:
            transport.write(export.read_file(zc.host_offset + sent, zc.length - sent))

    def _schedule_serve(self) -> None:
        if not self._serve_scheduled and self._transmission is not None:
            self._serve_scheduled = True
            self._loop.call_soon(self._serve)

    def _in_background(
        self,
        request: Request,
        pool: concurrent.futures.ThreadPoolExecutor,
        work: Callable[[], list[Buffer]],
        reply_bytes: int = 0,
    ) -> None:
        """Run ``work`` (a flush, a big read) on ``pool``; send what it returns when it is done."""
        export = self._export
        assert export is not None
        future = self._loop.run_in_executor(pool, work)
        self._waiting_bytes += reply_bytes
        started = _monotonic()

        def done(fut: asyncio.Future[list[Buffer]]) -> None:
            self._waiting.discard(fut)
            self._waiting_bytes -= reply_bytes
            command = request.command
            nbytes = request.length if command in (_READ, _WRITE) and not fut.exception() else 0
            export.stats.record(command, 1, nbytes, _monotonic() - started)
            self.requests += 1
            if command == _READ:
                self.bytes_read += nbytes
            elif command == _WRITE:
                self.bytes_written += nbytes
            transport = self._transport
            if transport is None or transport.is_closing():
                return
            exc = fut.exception()
            if exc is None:
                _write_large(transport, fut.result())
            else:
                assert self._transmission is not None
                if not isinstance(exc, (OSError, QednbdError)):
                    log.error(
                        "%s: %s failed unexpectedly", self._peer, command_name(request.command), exc_info=exc
                    )
                    self._server.internal_errors += 1
                else:
                    log.warning("%s: %s failed: %s", self._peer, command_name(request.command), exc)
                transport.writelines(export.error_reply(request, self._transmission.replies, exc).buffers)
            if len(self._waiting) < MAX_WAITING_REPLIES and self._waiting_bytes < MAX_WAITING_BYTES:
                self._resume("replies waiting for a worker")
            if self._closing and not self._waiting:
                self._finish()

        self._waiting.add(future)
        future.add_done_callback(done)
        if len(self._waiting) >= MAX_WAITING_REPLIES or self._waiting_bytes >= MAX_WAITING_BYTES:
            self._pause("replies waiting for a worker")

    def _finish(self) -> None:
        """No more requests: once the waiting replies are out, close (the transport drains first)."""
        transport = self._transport
        if transport is None or self._waiting:
            return
        self._pause("closing")
        if not transport.is_closing():
            transport.close()

    def shutdown(self) -> None:
        """Server shutdown: answer further options NBD_REP_ERR_SHUTDOWN and further requests
        NBD_ESHUTDOWN (the client should then disconnect), and close once the client is quiet.

        Closing at once would drop requests the client already sent (unread data makes the
        kernel reset the connection, and the client sees neither a reply nor an error).
        """
        self._stopping = True
        if self._handshake is not None:
            self._handshake.begin_shutdown()
        self._arm_quiet_timer()
        if self._transmission is not None:
            self._serve()

    def _arm_quiet_timer(self) -> None:
        if self._quiet_timer is not None:
            self._quiet_timer.cancel()
        self._quiet_timer = self._loop.call_later(SHUTDOWN_QUIET_SECONDS, self._quiet)

    def _quiet(self) -> None:
        self._quiet_timer = None
        self._closing = True
        self._finish()

    # --- helpers ------------------------------------------------------------------------------

    def _pause(self, reason: str) -> None:
        if not self._pause_reasons and self._transport is not None and not self._transport.is_closing():
            self._transport.pause_reading()
        self._pause_reasons.add(reason)

    def _resume(self, reason: str) -> None:
        if reason not in self._pause_reasons:
            return
        self._pause_reasons.discard(reason)
        if not self._pause_reasons and self._transport is not None and not self._transport.is_closing():
            self._transport.resume_reading()
            self._schedule_serve()  # requests already buffered go on being answered

    def _abort(self) -> None:
        self._closing = True
        if self._transport is not None:
            self._transport.abort()


class Server:
    """Listeners and connections over one :class:`ExportSet`."""

    def __init__(
        self,
        exports: ExportSet,
        *,
        max_clients: int = 0,
        expect_soon: Callable[[], None] = _nothing,
        tls_mode: TlsMode = TlsMode.OFF,
        tls_context: ssl.SSLContext | None = None,
        allow: Sequence[str] = (),
    ) -> None:
        if tls_mode is not TlsMode.OFF and tls_context is None:
            raise ValueError("TLS needs a context")
        self.exports = exports
        self.max_clients = max_clients
        self.tls_mode = tls_mode
        self.tls_context = tls_context
        self._allow = [ipaddress.ip_network(n) for n in allow]
        self.loop = asyncio.get_running_loop()
        self.connections: set[Connection] = set()
        self.flush_pool = concurrent.futures.ThreadPoolExecutor(
            FLUSH_THREADS, thread_name_prefix="qednbd-flush"
        )
        self.read_pool = concurrent.futures.ThreadPoolExecutor(READ_THREADS, thread_name_prefix="qednbd-read")
        self.shutting_down = False
        self.internal_errors = 0
        self._listeners: list[asyncio.AbstractServer] = []
        self._unix_paths: list[str] = []
        self._idle_task: asyncio.Task[None] | None = None
        self._stopped = asyncio.Event()
        # Every connection receives into this one buffer: the loop thread hands what one receive
        # brought to that connection's parser, which copies it, before it receives anything else.
        self.scratch = memoryview(bytearray(RECEIVE_BUFFER_BYTES))
        self.expect_soon = expect_soon  # a lone small request was answered (see qednbd.loop)

    def allowed(self, address: str) -> bool:
        """Whether a TCP client from ``address`` may connect (``--allow``; everyone if unset)."""
        if not self._allow:
            return True
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in network for network in self._allow)

    def serving_count(self) -> int:
        return sum(1 for conn in self.connections if not conn.refused)

    def _factory(self) -> Connection:
        return Connection(self)

    async def listen_tcp(self, host: str, port: int) -> list[tuple[str, int]]:
        listener = await self.loop.create_server(self._factory, host=host, port=port, reuse_address=True)
        self._listeners.append(listener)
        return [sock.getsockname()[:2] for sock in listener.sockets]

    async def listen_unix(self, path: str) -> None:
        listener = await self.loop.create_unix_server(self._factory, path=path)
        self._listeners.append(listener)
        self._unix_paths.append(path)

    async def listen_inherited(self, fds: Sequence[int]) -> list[str]:
        """Serve sockets passed by systemd; returns a description of each."""
        described = []
        for fd in fds:
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                raise OSError(f"file descriptor {fd} from LISTEN_FDS is not a socket")
            sock = socket.socket(fileno=fd)
            if sock.family == socket.AF_UNIX:
                listener = await self.loop.create_unix_server(self._factory, sock=sock)
                described.append(f"nbd+unix:///?socket={sock.getsockname()}")
            else:
                listener = await self.loop.create_server(self._factory, sock=sock)
                described.append(uri_for_tcp(sock.getsockname()[:2]))
            self._listeners.append(listener)
        return described

    def start_idle_timer(self) -> None:
        self._idle_task = self.loop.create_task(self._idle_loop())

    async def _idle_loop(self) -> None:
        while True:
            await asyncio.sleep(IDLE_POLL_SECONDS)
            for export in self.exports.exports.values():
                try:
                    if export.poll_idle():
                        log.debug("export %r: idle, dirty bit cleared", export.name)
                except Exception as exc:  # the next allocating write will try again
                    log.error("export %r: clearing the dirty bit failed: %s", export.name, exc)

    def install_signal_handlers(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(sig, self.request_shutdown, sig)

    def request_shutdown(self, sig: int | None = None) -> None:
        if not self.shutting_down:
            if sig is not None:
                log.info("%s: shutting down", signal.Signals(sig).name)
            self.loop.create_task(self.shutdown())

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    async def shutdown(self) -> None:
        """Stop listening, let clients take their last replies, then flush and close every image."""
        if self.shutting_down:
            await self._stopped.wait()
            return
        self.shutting_down = True
        for listener in self._listeners:
            listener.close()
        for conn in list(self.connections):
            conn.shutdown()
        pending = [conn.closed for conn in self.connections]
        if pending:
            _, late = await asyncio.wait(pending, timeout=SHUTDOWN_GRACE_SECONDS)
            if late:
                log.warning("%d clients did not take their last replies; dropping them", len(late))
                for conn in list(self.connections):
                    conn._abort()
        if self._idle_task is not None:
            self._idle_task.cancel()
        self.flush_pool.shutdown(wait=True)
        self.read_pool.shutdown(wait=True)
        self.exports.close()
        for path in self._unix_paths:
            with contextlib.suppress(OSError):
                os.unlink(path)
        self._stopped.set()


TLS_FILES: Final = ("ca-cert.pem", "server-cert.pem", "server-key.pem")


def tls_context(creds_dir: str | None, verify_peer: bool) -> ssl.SSLContext:
    """A server context from a directory laid out like qemu-nbd's tls-creds-x509 (TLS 1.2+).
    The CA certificate is needed only to verify clients; its absence is an error only then."""
    if creds_dir is None:
        raise ConfigError("TLS needs --tls-creds DIR")
    paths = {name: os.path.join(creds_dir, name) for name in TLS_FILES}
    needed = TLS_FILES if verify_peer else TLS_FILES[1:]
    for name in needed:
        if not os.path.isfile(paths[name]):
            raise ConfigError(f"--tls-creds {creds_dir}: {name} is missing")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(paths["server-cert.pem"], paths["server-key.pem"])
        if verify_peer:
            context.load_verify_locations(paths["ca-cert.pem"])
            context.verify_mode = ssl.CERT_REQUIRED
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"--tls-creds {creds_dir}: cannot use the credentials: {exc}") from None
    return context


def uri_for_tcp(address: tuple[str, int], export: str = "") -> str:
    host, port = address
    if ":" in host:
        host = f"[{host}]"
    return f"nbd://{host}:{port}" + (f"/{export}" if export else "")


def systemd_listen_fds(environ: dict[str, str], pid: int) -> list[int]:
    """The fds systemd passed to this process (sd_listen_fds semantics), else []."""
    if environ.get("LISTEN_PID") != str(pid):
        return []
    try:
        count = int(environ.get("LISTEN_FDS", "0"))
    except ValueError:
        return []
    return list(range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + max(count, 0)))


async def run(
    exports: ExportSet,
    conf: ServerConfig,
    inherited_fds: Sequence[int],
    on_ready: Callable[[list[str]], None],
    expect_soon: Callable[[], None] = _nothing,
    context: ssl.SSLContext | None = None,
) -> int:
    """Listen where ``conf`` says (or on the inherited sockets), report the addresses through
    ``on_ready``, serve until a signal; returns the exit code. ``context``: :func:`tls_context`'s
    for ``conf``, made before the images were opened."""
    server = Server(
        exports,
        max_clients=conf.max_clients,
        expect_soon=expect_soon,
        tls_mode=TlsMode(conf.tls),
        tls_context=context,
        allow=conf.allow,
    )
    try:
        if inherited_fds:
            uris = await server.listen_inherited(inherited_fds)
        elif conf.socket_path is not None:
            await server.listen_unix(conf.socket_path)
            uris = [f"nbd+unix:///?socket={conf.socket_path}"]
        else:
            uris = [uri_for_tcp(address) for address in await server.listen_tcp(conf.bind, conf.port)]
    except BaseException:
        exports.close()
        raise
    server.install_signal_handlers()
    server.start_idle_timer()
    try:
        on_ready(uris)
    except BaseException:
        await server.shutdown()  # closes the listeners and the images, removes the socket file
        raise
    await server.wait_stopped()
    return 0


def serve_forever(
    exports: ExportSet,
    conf: ServerConfig,
    inherited_fds: Sequence[int],
    on_ready: Callable[[list[str]], None],
    context: ssl.SSLContext | None = None,
) -> int:
    """Run :func:`run` on a new event loop (the CLI's entry point; it owns no loop itself)."""
    selector = SpinningSelector()
    with asyncio.Runner(loop_factory=lambda: asyncio.SelectorEventLoop(selector)) as runner:
        return runner.run(run(exports, conf, inherited_fds, on_ready, selector.spin_next, context))
