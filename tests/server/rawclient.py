"""A small blocking NBD client over a raw socket, for what the real clients cannot send.

Theory of operation
-------------------
* :class:`RawClient` wraps one TCP or Unix socket with a timeout; every read is bounded, so a
  server that stops answering fails the test instead of hanging it.
* The handshake is done step by step (:meth:`~RawClient.read_greeting`,
  :meth:`~RawClient.send_client_flags`, :meth:`~RawClient.send_option` with any magic and any
  claimed length, :meth:`~RawClient.read_option_reply`), so a test can corrupt any part of it.
  Convenience wrappers (``opt_go``, ``opt_info``, ``opt_list``, ``opt_set_meta_context`` …)
  collect the replies of one option up to the final one; :meth:`~RawClient.handshake` does a
  whole ordinary negotiation.
* Transmission: :meth:`~RawClient.send_request` writes a compact (28-byte) or, after extended
  headers, extended (32-byte) header plus an optional payload. Each request is remembered by
  cookie; :meth:`~RawClient.wait` reads replies — simple, structured or extended — until the one
  for that cookie is complete, keeping completed replies of other cookies for later (the server
  may answer out of order). A :class:`Result` holds the chunks, the error, the READ data
  assembled from OFFSET_DATA/OFFSET_HOLE chunks (overlaps and chunks outside the request fail
  loudly) and the BLOCK_STATUS extents per context id.
"""

from __future__ import annotations

import random
import socket
import time
from dataclasses import dataclass, field

from qednbd.nbd.constants import (
    BLOCK_DESCRIPTOR,
    BLOCK_DESCRIPTOR_EXT,
    BLOCK_STATUS_EXT_PREFIX,
    CLIENT_FLAGS,
    ERROR_PREFIX,
    EXPORT_NAME_REPLY,
    EXPORT_NAME_ZEROES,
    EXTENDED_REPLY,
    EXTENDED_REQUEST,
    GREETING,
    INFO_BLOCK_SIZE,
    INFO_EXPORT,
    OFFSET_DATA_PREFIX,
    OFFSET_HOLE,
    OPTION,
    OPTION_REPLY,
    REP_ERROR_BIT,
    REPLY_TYPE_ERROR_BIT,
    REQUEST,
    SIMPLE_REPLY,
    STRUCTURED_REPLY,
    U16,
    U32,
    ClientFlag,
    Command,
    CommandFlag,
    InfoType,
    Magic,
    Option,
    OptionReply,
    ReplyFlag,
    ReplyType,
)

DEFAULT_TIMEOUT = 10.0


class ServerClosed(ConnectionError):
    """The server closed the connection (EOF or reset) while a reply was expected."""


@dataclass
class OptReply:
    option: int
    type: int
    data: bytes
    magic: int = Magic.OPTION_REPLY

    @property
    def is_error(self) -> bool:
        return bool(self.type & REP_ERROR_BIT)

    @property
    def message(self) -> str:
        return self.data.decode("utf-8", "replace")


@dataclass
class ExportDetails:
    """What INFO/GO or EXPORT_NAME said about an export."""

    size: int = -1
    flags: int = 0
    name: str | None = None
    description: str | None = None
    block_size: tuple[int, int, int] | None = None
    replies: list[OptReply] = field(default_factory=list)


@dataclass
class Chunk:
    """One structured or extended reply chunk (``offset`` is the extended header's echo)."""

    flags: int
    type: int
    cookie: int
    payload: bytes
    offset: int | None = None

    @property
    def done(self) -> bool:
        return bool(self.flags & ReplyFlag.DONE)


@dataclass
class Pending:
    command: int
    offset: int
    length: int


@dataclass
class Result:
    """The whole reply to one request."""

    cookie: int
    command: int
    offset: int
    length: int
    kind: str = ""  # "simple", "structured" or "extended"
    error: int = 0
    message: str = ""
    data: bytearray | None = None  # READ, assembled
    chunks: list[Chunk] = field(default_factory=list)
    extents: dict[int, list[tuple[int, int]]] = field(default_factory=dict)  # context id → (len, flags)
    covered: list[tuple[int, int]] = field(default_factory=list)  # READ chunks: (offset, length)

    def read_bytes(self) -> bytes:
        """The assembled READ data (fails if the reply carried none)."""
        assert self.data is not None and self.error == 0, (self.error, self.message)
        return bytes(self.data)

    def chunk_types(self) -> list[int]:
        return [c.type for c in self.chunks]


class RawClient:
    """One NBD connection. See the module docstring."""

    def __init__(self, sock: socket.socket, timeout: float = DEFAULT_TIMEOUT) -> None:
        sock.settimeout(timeout)
        self.sock = sock
        self.extended = False
        self.structured = False
        self.handshake_flags = 0
        self.contexts: dict[str, int] = {}
        self._pending: dict[int, Pending] = {}
        self._done: dict[int, Result] = {}
        self._partial: dict[int, Result] = {}
        self._next_cookie = 1
        self.arrivals: list[int] = []  # cookies in the order their replies completed

    # --- connection ---------------------------------------------------------------------------

    @classmethod
    def tcp(cls, host: str, port: int, timeout: float = DEFAULT_TIMEOUT) -> RawClient:
        sock = socket.create_connection((host, port), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(sock, timeout)

    @classmethod
    def unix(cls, path: str, timeout: float = DEFAULT_TIMEOUT) -> RawClient:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        sock.connect(path)
        return cls(sock, timeout)

    @classmethod
    def to(cls, uri: str, timeout: float = DEFAULT_TIMEOUT) -> RawClient:
        """Connect to ``nbd://127.0.0.1:PORT[/…]`` or ``nbd+unix:///…?socket=PATH``."""
        if uri.startswith("nbd+unix:"):
            return cls.unix(uri.split("socket=", 1)[1], timeout)
        hostport = uri.removeprefix("nbd://").split("/", 1)[0]
        host, port = hostport.rsplit(":", 1)
        return cls.tcp(host.strip("[]"), int(port), timeout)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- bytes --------------------------------------------------------------------------------

    def send(self, data: bytes | bytearray | memoryview) -> None:
        self.sock.sendall(data)

    def recv_exact(self, n: int) -> bytearray:
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            try:
                k = self.sock.recv_into(view[got:], min(n - got, 1 << 20))
            except ConnectionResetError as exc:
                raise ServerClosed(f"connection reset after {got} of {n} bytes") from exc
            if k == 0:
                raise ServerClosed(f"end of stream after {got} of {n} bytes")
            got += k
        return buf

    def wait_closed(self, timeout: float = 5.0) -> bytes:
        """Read until the server closes; returns what came before the close.

        Raises ``TimeoutError`` if the connection is still open after ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        received = bytearray()
        old = self.sock.gettimeout()
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"connection still open after {timeout} s")
                self.sock.settimeout(left)
                try:
                    data = self.sock.recv(1 << 16)
                except ConnectionResetError:
                    return bytes(received)
                except TimeoutError:
                    raise TimeoutError(f"connection still open after {timeout} s") from None
                if not data:
                    return bytes(received)
                received += data
        finally:
            self.sock.settimeout(old)

    def is_open(self, wait: float = 0.2) -> bool:
        """True if nothing (neither data nor a close) arrives within ``wait`` seconds."""
        try:
            self.wait_closed(wait)
        except TimeoutError:
            return True
        return False

    # --- handshake, step by step ----------------------------------------------------------------

    def read_greeting(self) -> int:
        magic, opts_magic, flags = GREETING.unpack(self.recv_exact(GREETING.size))
        assert magic == Magic.NBDMAGIC, hex(magic)
        assert opts_magic == Magic.IHAVEOPT, hex(opts_magic)
        self.handshake_flags = flags
        return int(flags)

    def send_client_flags(self, flags: int = ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES) -> None:
        self.send(CLIENT_FLAGS.pack(flags))

    def send_option(
        self, option: int, data: bytes = b"", *, magic: int = Magic.IHAVEOPT, length: int | None = None
    ) -> None:
        """An option header and its data; ``length`` overrides the length field (to lie)."""
        self.send(OPTION.pack(magic, option, len(data) if length is None else length) + data)

    def read_option_reply(self) -> OptReply:
        magic, option, rtype, length = OPTION_REPLY.unpack(self.recv_exact(OPTION_REPLY.size))
        assert magic == Magic.OPTION_REPLY, hex(magic)
        data = bytes(self.recv_exact(length)) if length else b""
        return OptReply(option, rtype, data, magic)

    def option(self, option: int, data: bytes = b"") -> list[OptReply]:
        """Send one option; return its replies up to and including the final one (ACK or error)."""
        self.send_option(option, data)
        replies = []
        while True:
            reply = self.read_option_reply()
            assert reply.option == option, (reply.option, option)
            replies.append(reply)
            if reply.type == OptionReply.ACK or reply.is_error:
                return replies

    # --- options ----------------------------------------------------------------------------------

    @staticmethod
    def info_request(name: str, infos: tuple[int, ...] = ()) -> bytes:
        raw = name.encode("utf-8")
        return U32.pack(len(raw)) + raw + U16.pack(len(infos)) + b"".join(U16.pack(i) for i in infos)

    @staticmethod
    def meta_request(name: str, queries: tuple[str, ...]) -> bytes:
        raw = name.encode("utf-8")
        out = U32.pack(len(raw)) + raw + U32.pack(len(queries))
        for q in queries:
            qraw = q.encode("utf-8")
            out += U32.pack(len(qraw)) + qraw
        return out

    def _info_go(self, option: int, name: str, infos: tuple[int, ...]) -> ExportDetails:
        replies = self.option(option, self.info_request(name, infos))
        details = ExportDetails(replies=replies)
        for reply in replies:
            if reply.type != OptionReply.INFO:
                continue
            (itype,) = U16.unpack_from(reply.data)
            if itype == InfoType.EXPORT:
                assert len(reply.data) == INFO_EXPORT.size, reply.data
                _, details.size, details.flags = INFO_EXPORT.unpack(reply.data)
            elif itype == InfoType.NAME:
                details.name = reply.data[2:].decode("utf-8")
            elif itype == InfoType.DESCRIPTION:
                details.description = reply.data[2:].decode("utf-8")
            elif itype == InfoType.BLOCK_SIZE:
                assert len(reply.data) == INFO_BLOCK_SIZE.size, reply.data
                _, mn, pref, mx = INFO_BLOCK_SIZE.unpack(reply.data)
                details.block_size = (mn, pref, mx)
        return details

    def opt_info(self, name: str = "", infos: tuple[int, ...] = ()) -> ExportDetails:
        return self._info_go(Option.INFO, name, infos)

    def opt_go(self, name: str = "", infos: tuple[int, ...] = ()) -> ExportDetails:
        return self._info_go(Option.GO, name, infos)

    def opt_list(self) -> list[OptReply]:
        return self.option(Option.LIST)

    def opt_structured_reply(self) -> OptReply:
        (reply,) = self.option(Option.STRUCTURED_REPLY)
        if reply.type == OptionReply.ACK:
            self.structured = True
        return reply

    def opt_extended_headers(self) -> OptReply:
        (reply,) = self.option(Option.EXTENDED_HEADERS)
        if reply.type == OptionReply.ACK:
            self.extended = True
        return reply

    def opt_meta_context(self, option: int, name: str, queries: tuple[str, ...]) -> list[OptReply]:
        return self.option(option, self.meta_request(name, queries))

    def opt_set_meta_context(self, name: str, queries: tuple[str, ...]) -> dict[str, int]:
        """SET_META_CONTEXT; returns {context name: id} (asserts the final reply is ACK)."""
        replies = self.opt_meta_context(Option.SET_META_CONTEXT, name, queries)
        assert replies[-1].type == OptionReply.ACK, replies
        return {r.data[4:].decode(): U32.unpack_from(r.data)[0] for r in replies[:-1]}

    def opt_abort(self) -> OptReply:
        self.send_option(Option.ABORT)
        return self.read_option_reply()

    def opt_export_name(self, name: str = "", *, no_zeroes: bool = True) -> ExportDetails:
        """EXPORT_NAME: the raw reply (size, flags, then 124 zero bytes unless NO_ZEROES)."""
        self.send_option(Option.EXPORT_NAME, name.encode("utf-8"))
        size, flags = EXPORT_NAME_REPLY.unpack(self.recv_exact(EXPORT_NAME_REPLY.size))
        if not no_zeroes:
            zeroes = self.recv_exact(EXPORT_NAME_ZEROES)
            assert zeroes == bytes(EXPORT_NAME_ZEROES), zeroes
        return ExportDetails(size=size, flags=flags)

    def handshake(
        self,
        name: str = "",
        *,
        structured: bool = True,
        extended: bool = False,
        meta: tuple[str, ...] = (),
        infos: tuple[int, ...] = (InfoType.BLOCK_SIZE,),
    ) -> ExportDetails:
        """Greeting, flags, the requested options, then GO (asserts every step succeeds)."""
        self.read_greeting()
        self.send_client_flags()
        if extended:
            reply = self.opt_extended_headers()
            assert reply.type == OptionReply.ACK, reply
        elif structured:
            reply = self.opt_structured_reply()
            assert reply.type == OptionReply.ACK, reply
        self.contexts = self.opt_set_meta_context(name, meta) if meta else {}
        details = self.opt_go(name, infos)
        assert details.replies[-1].type == OptionReply.ACK, details.replies
        return details

    # --- transmission -----------------------------------------------------------------------------

    def new_cookie(self) -> int:
        cookie = self._next_cookie
        self._next_cookie += 1
        return cookie

    def request_bytes(
        self,
        command: int,
        offset: int = 0,
        length: int = 0,
        flags: int = 0,
        cookie: int = 0,
        *,
        magic: int | None = None,
    ) -> bytes:
        if self.extended:
            return EXTENDED_REQUEST.pack(
                Magic.EXTENDED_REQUEST if magic is None else magic, flags, command, cookie, offset, length
            )
        return REQUEST.pack(Magic.REQUEST if magic is None else magic, flags, command, cookie, offset, length)

    def expect(self, cookie: int, command: int, offset: int, length: int) -> None:
        """Register a request sent by hand (``request_bytes`` + ``send``) so its reply is parsed."""
        self._pending[cookie] = Pending(command, offset, length)

    def send_request(
        self,
        command: int,
        offset: int = 0,
        length: int | None = None,
        flags: int = 0,
        payload: bytes | bytearray | memoryview = b"",
        *,
        cookie: int | None = None,
        expect_reply: bool = True,
    ) -> int:
        """Send one request; returns its cookie. ``length`` defaults to the payload's length."""
        if cookie is None:
            cookie = self.new_cookie()
        if length is None:
            length = len(payload)
        if self.extended and command == Command.WRITE:
            flags |= CommandFlag.PAYLOAD_LEN
        header = self.request_bytes(command, offset, length, flags, cookie)
        if expect_reply:
            self.expect(cookie, command, offset, length)
        if len(payload) < 1 << 16:
            self.send(header + bytes(payload))
        else:
            self.send(header)
            self.send(payload)
        return cookie

    def wait(self, cookie: int) -> Result:
        """Read replies until the one for ``cookie`` is complete."""
        while cookie not in self._done:
            self._read_one_reply()
        return self._done.pop(cookie)

    def wait_all(self, cookies: list[int]) -> dict[int, Result]:
        return {c: self.wait(c) for c in cookies}

    def request(
        self,
        command: int,
        offset: int = 0,
        length: int | None = None,
        flags: int = 0,
        payload: bytes | bytearray | memoryview = b"",
    ) -> Result:
        return self.wait(self.send_request(command, offset, length, flags, payload))

    def read(self, offset: int, length: int, flags: int = 0) -> Result:
        return self.request(Command.READ, offset, length, flags)

    def read_ok(self, offset: int, length: int, flags: int = 0) -> bytes:
        result = self.read(offset, length, flags)
        assert result.error == 0, (result.error, result.message)
        assert result.data is not None
        return bytes(result.data)

    def write(self, offset: int, data: bytes | bytearray | memoryview, flags: int = 0) -> Result:
        return self.request(Command.WRITE, offset, len(data), flags, data)

    def write_ok(self, offset: int, data: bytes | bytearray | memoryview, flags: int = 0) -> None:
        result = self.write(offset, data, flags)
        assert result.error == 0, (result.error, result.message)

    def flush(self) -> Result:
        return self.request(Command.FLUSH)

    def disconnect(self) -> None:
        self.send_request(Command.DISC, expect_reply=False)

    # --- replies ----------------------------------------------------------------------------------

    def _result_for(self, cookie: int) -> Result:
        if cookie in self._partial:
            return self._partial[cookie]
        pending = self._pending.pop(cookie, None)
        assert pending is not None, f"reply for unknown cookie {cookie}"
        result = Result(cookie, pending.command, pending.offset, pending.length)
        if pending.command == Command.READ:
            result.data = bytearray(pending.length)
        self._partial[cookie] = result
        return result

    def _finish(self, result: Result) -> None:
        del self._partial[result.cookie]
        self._done[result.cookie] = result
        self.arrivals.append(result.cookie)

    def _read_one_reply(self) -> None:
        first = self.recv_exact(4)
        (magic,) = U32.unpack(first)
        if magic == Magic.SIMPLE_REPLY:
            assert not self.extended, "simple reply after extended headers"
            rest = self.recv_exact(SIMPLE_REPLY.size - 4)
            _, error, cookie = SIMPLE_REPLY.unpack(first + rest)
            result = self._result_for(cookie)
            assert not result.chunks, "simple reply in the middle of a structured one"
            result.kind, result.error = "simple", error
            if result.command == Command.READ and error == 0:
                assert result.data is not None
                result.data[:] = self.recv_exact(result.length)
                result.covered.append((result.offset, result.length))
            self._finish(result)
            return
        if magic == Magic.STRUCTURED_REPLY:
            assert not self.extended, "structured reply after extended headers"
            rest = self.recv_exact(STRUCTURED_REPLY.size - 4)
            _, flags, rtype, cookie, length = STRUCTURED_REPLY.unpack(first + rest)
            chunk = Chunk(flags, rtype, cookie, bytes(self.recv_exact(length)))
            kind = "structured"
        elif magic == Magic.EXTENDED_REPLY:
            assert self.extended, "extended reply without extended headers"
            rest = self.recv_exact(EXTENDED_REPLY.size - 4)
            _, flags, rtype, cookie, offset, length = EXTENDED_REPLY.unpack(first + rest)
            chunk = Chunk(flags, rtype, cookie, bytes(self.recv_exact(length)), offset)
            kind = "extended"
        else:
            raise AssertionError(f"bad reply magic 0x{magic:08x}")
        result = self._result_for(cookie)
        result.kind = kind
        result.chunks.append(chunk)
        self._apply_chunk(result, chunk)
        if chunk.done:
            self._finish(result)

    def _apply_chunk(self, result: Result, chunk: Chunk) -> None:
        payload = chunk.payload
        if chunk.offset is not None:
            assert chunk.offset == result.offset, "extended reply does not echo the request offset"
        if chunk.type == ReplyType.NONE:
            assert not payload and chunk.done, chunk
        elif chunk.type in (ReplyType.OFFSET_DATA, ReplyType.OFFSET_HOLE):
            assert result.command == Command.READ and result.data is not None, chunk
            if chunk.type == ReplyType.OFFSET_DATA:
                (offset,) = OFFSET_DATA_PREFIX.unpack_from(payload)
                body = payload[OFFSET_DATA_PREFIX.size :]
                size = len(body)
                assert size > 0, "empty OFFSET_DATA chunk"
            else:
                assert len(payload) == OFFSET_HOLE.size, chunk
                offset, size = OFFSET_HOLE.unpack(payload)
                body = bytes(size)
            start = offset - result.offset
            assert start >= 0 and start + size <= result.length, f"chunk {offset}+{size} outside the request"
            for off, n in result.covered:
                assert offset + size <= off or off + n <= offset, f"chunk {offset}+{size} overlaps {off}+{n}"
            result.covered.append((offset, size))
            result.data[start : start + size] = body
        elif chunk.type == ReplyType.BLOCK_STATUS:
            assert not self.extended, "BLOCK_STATUS chunk with extended headers"
            (context,) = U32.unpack_from(payload)
            body = payload[4:]
            assert len(body) % BLOCK_DESCRIPTOR.size == 0 and body, chunk
            result.extents[context] = [
                BLOCK_DESCRIPTOR.unpack_from(body, i) for i in range(0, len(body), BLOCK_DESCRIPTOR.size)
            ]
        elif chunk.type == ReplyType.BLOCK_STATUS_EXT:
            assert self.extended, "BLOCK_STATUS_EXT chunk without extended headers"
            context, count = BLOCK_STATUS_EXT_PREFIX.unpack_from(payload)
            body = payload[BLOCK_STATUS_EXT_PREFIX.size :]
            assert count and len(body) == count * BLOCK_DESCRIPTOR_EXT.size, chunk
            result.extents[context] = [
                BLOCK_DESCRIPTOR_EXT.unpack_from(body, i)
                for i in range(0, len(body), BLOCK_DESCRIPTOR_EXT.size)
            ]
        elif chunk.type & REPLY_TYPE_ERROR_BIT:
            error, msglen = ERROR_PREFIX.unpack_from(payload)
            assert error != 0, "error chunk with error 0"
            result.error = error
            text = payload[ERROR_PREFIX.size : ERROR_PREFIX.size + msglen]
            result.message = text.decode("utf-8", "replace")
        else:
            raise AssertionError(f"unknown chunk type {chunk.type}")

    # --- checks -----------------------------------------------------------------------------------

    def full_coverage(self, result: Result) -> bool:
        """The READ chunks cover the whole request exactly once."""
        return sum(n for _, n in result.covered) == result.length


def pattern(seed: int, length: int) -> bytes:
    """Deterministic pseudo-random bytes for data checks (a misplaced block never matches)."""
    return random.Random(seed).randbytes(length)
