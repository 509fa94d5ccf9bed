"""NBD wire constants and message layouts, named after the protocol specification.

Theory of operation
-------------------
* Every integer on the wire is big-endian. Each fixed message is a precompiled, module-level
  :class:`struct.Struct` named after the spec message it encodes; nothing builds a format string
  per message.
* Enumerations use the spec's names without the ``NBD_`` / ``NBD_OPT_`` / … prefix:
  ``Option.GO`` is ``NBD_OPT_GO``, ``ReplyType.OFFSET_HOLE`` is ``NBD_REPLY_TYPE_OFFSET_HOLE``.
  Values that may arrive unknown from a peer (options, commands, info types) are kept as plain
  ``int`` by the parsers and compared against these enums, never converted blindly.
* Limits that the protocol itself fixes live here; limits that are our policy (option length,
  options per handshake, request payload) live beside the code that enforces them.

Sources: NetworkBlockDevice ``doc/proto.md`` (master and the extended-headers extension) and
qemu's ``docs/interop/nbd.rst`` for the ``qemu:`` namespace.
"""

from __future__ import annotations

import struct
from enum import IntEnum, IntFlag
from typing import Final


class Magic(IntEnum):
    """Magic numbers that open each message."""

    NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC": first 8 bytes from the server (INIT_PASSWD)
    IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT": the newstyle magic; also opens every client option
    OPTION_REPLY = 0x0003E889045565A9  # every fixed-newstyle option reply
    REQUEST = 0x25609513  # compact request
    EXTENDED_REQUEST = 0x21E41C71  # extended request (after NBD_OPT_EXTENDED_HEADERS)
    SIMPLE_REPLY = 0x67446698  # simple reply
    STRUCTURED_REPLY = 0x668E33EF  # structured reply chunk
    EXTENDED_REPLY = 0x6E8A278C  # extended reply chunk


class HandshakeFlag(IntFlag):
    """u16 sent by the server after IHAVEOPT. The server MUST NOT set any other bit."""

    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class ClientFlag(IntFlag):
    """u32 sent by the client in reply to the greeting. Unknown bits MUST close the connection."""

    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class Option(IntEnum):
    """``NBD_OPT_*``: the option field of a client option."""

    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    PEEK_EXPORT = 4  # withdrawn; answered like any unknown option
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10
    EXTENDED_HEADERS = 11


REP_ERROR_BIT: Final = 1 << 31  # every option error reply has bit 31 set


class OptionReply(IntEnum):
    """``NBD_REP_*``: the reply-type field of an option reply."""

    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = REP_ERROR_BIT | 1
    ERR_POLICY = REP_ERROR_BIT | 2
    ERR_INVALID = REP_ERROR_BIT | 3
    ERR_PLATFORM = REP_ERROR_BIT | 4
    ERR_TLS_REQD = REP_ERROR_BIT | 5
    ERR_UNKNOWN = REP_ERROR_BIT | 6
    ERR_SHUTDOWN = REP_ERROR_BIT | 7
    ERR_BLOCK_SIZE_REQD = REP_ERROR_BIT | 8
    ERR_TOO_BIG = REP_ERROR_BIT | 9
    ERR_EXT_HEADER_REQD = REP_ERROR_BIT | 10


class InfoType(IntEnum):
    """``NBD_INFO_*``: the first u16 of an ``NBD_REP_INFO`` payload and of INFO/GO requests."""

    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


class TransmissionFlag(IntFlag):
    """``NBD_FLAG_*``: the u16 in the EXPORT_NAME reply and in ``NBD_INFO_EXPORT``."""

    HAS_FLAGS = 1 << 0
    READ_ONLY = 1 << 1
    SEND_FLUSH = 1 << 2
    SEND_FUA = 1 << 3
    ROTATIONAL = 1 << 4
    SEND_TRIM = 1 << 5
    SEND_WRITE_ZEROES = 1 << 6
    SEND_DF = 1 << 7
    CAN_MULTI_CONN = 1 << 8
    SEND_RESIZE = 1 << 9
    SEND_CACHE = 1 << 10
    SEND_FAST_ZERO = 1 << 11
    BLOCK_STATUS_PAYLOAD = 1 << 12


class Command(IntEnum):
    """``NBD_CMD_*``: the type field of a request."""

    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7
    RESIZE = 8


class CommandFlag(IntFlag):
    """``NBD_CMD_FLAG_*``: the flags field of a request."""

    FUA = 1 << 0
    NO_HOLE = 1 << 1
    DF = 1 << 2
    REQ_ONE = 1 << 3
    FAST_ZERO = 1 << 4
    PAYLOAD_LEN = 1 << 5


class ReplyFlag(IntFlag):
    """``NBD_REPLY_FLAG_*``: the flags field of a structured or extended reply chunk."""

    DONE = 1 << 0


REPLY_TYPE_ERROR_BIT: Final = 1 << 15  # every error chunk type has bit 15 set


class ReplyType(IntEnum):
    """``NBD_REPLY_TYPE_*``: the type field of a structured or extended reply chunk."""

    NONE = 0
    OFFSET_DATA = 1
    OFFSET_HOLE = 2
    BLOCK_STATUS = 5
    BLOCK_STATUS_EXT = 6
    ERROR = REPLY_TYPE_ERROR_BIT | 1
    ERROR_OFFSET = REPLY_TYPE_ERROR_BIT | 2


class AllocationState(IntFlag):
    """``NBD_STATE_*`` of the ``base:allocation`` context."""

    HOLE = 1 << 0
    ZERO = 1 << 1


class Errno(IntEnum):
    """``NBD_E*``: the error field of replies. Host errnos are mapped onto this set elsewhere."""

    EPERM = 1
    EIO = 5
    ENOMEM = 12
    EINVAL = 22
    ENOSPC = 28
    EOVERFLOW = 75
    ENOTSUP = 95
    ESHUTDOWN = 108


# --- meta contexts ----------------------------------------------------------------------------

BASE_ALLOCATION: Final = "base:allocation"
QEMU_ALLOCATION_DEPTH: Final = "qemu:allocation-depth"

# --- limits the protocol fixes ----------------------------------------------------------------

MAX_STRING_BYTES: Final = 4096  # spec: every string (names, messages, queries) MUST be <= 4096 bytes
EXPORT_NAME_ZEROES: Final = 124  # reserved zeroes after the EXPORT_NAME reply unless NO_ZEROES
DEFAULT_MAX_PAYLOAD_BYTES: Final = 32 * 1024 * 1024  # spec: clients may always send payloads this big
MAX_MIN_BLOCK_SIZE: Final = 64 * 1024  # spec: the minimum block size is at most 64 KiB
MIN_PREFERRED_BLOCK_SIZE: Final = 512  # spec: the preferred block size is at least 512
NO_PAYLOAD_LIMIT: Final = 0xFFFFFFFF  # spec: a maximum payload of 2^32-1 means "no limit"
U16_MAX: Final = 0xFFFF
U32_MAX: Final = 0xFFFFFFFF
U64_MAX: Final = (1 << 64) - 1

# --- handshake messages -----------------------------------------------------------------------

GREETING = struct.Struct(">QQH")  # NBDMAGIC, IHAVEOPT, handshake flags
CLIENT_FLAGS = struct.Struct(">I")  # client flags
OPTION = struct.Struct(">QII")  # IHAVEOPT, option, length of option data
OPTION_REPLY = struct.Struct(">QIII")  # OPTION_REPLY magic, option, reply type, length of reply data
EXPORT_NAME_REPLY = struct.Struct(">QH")  # export size, transmission flags (then 124 zeroes or none)
U16 = struct.Struct(">H")  # info-request count and entries; INFO reply type
U32 = struct.Struct(">I")  # name/query lengths, query count, context id
INFO_EXPORT = struct.Struct(">HQH")  # NBD_INFO_EXPORT, export size, transmission flags
INFO_BLOCK_SIZE = struct.Struct(">HIII")  # NBD_INFO_BLOCK_SIZE, minimum, preferred, maximum payload

# --- transmission messages --------------------------------------------------------------------

REQUEST = struct.Struct(">IHHQQI")  # magic, command flags, type, cookie, offset, length (28 bytes)
EXTENDED_REQUEST = struct.Struct(">IHHQQQ")  # magic, command flags, type, cookie, offset, length (32)
SIMPLE_REPLY = struct.Struct(">IIQ")  # magic, error, cookie (16 bytes)
STRUCTURED_REPLY = struct.Struct(">IHHQI")  # magic, flags, type, cookie, payload length (20 bytes)
EXTENDED_REPLY = struct.Struct(">IHHQQQ")  # magic, flags, type, cookie, offset, payload length (32)
OFFSET_DATA_PREFIX = struct.Struct(">Q")  # OFFSET_DATA payload: offset, then the data
# A structured chunk header and the OFFSET_DATA offset packed at once (the READ fast path).
STRUCTURED_OFFSET_DATA = struct.Struct(">IHHQIQ")  # magic, flags, type, cookie, length, offset
OFFSET_HOLE = struct.Struct(">QI")  # OFFSET_HOLE payload: offset, hole size
ERROR_PREFIX = struct.Struct(">IH")  # ERROR / ERROR_OFFSET payload: error, message length, message…
ERROR_OFFSET_SUFFIX = struct.Struct(">Q")  # ERROR_OFFSET payload ends with the offset
BLOCK_DESCRIPTOR = struct.Struct(">II")  # BLOCK_STATUS extent: length, status flags
BLOCK_STATUS_EXT_PREFIX = struct.Struct(">II")  # BLOCK_STATUS_EXT payload: context id, extent count
BLOCK_DESCRIPTOR_EXT = struct.Struct(">QQ")  # BLOCK_STATUS_EXT extent: length, status flags
