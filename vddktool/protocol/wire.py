"""NBD on the wire: magic numbers, option, command and flag values, the
fixed-size structures, and the errno mapping.  Shared by the handshake and
transmission modules; nothing here keeps state."""

import errno as _errno
import struct

# ---------------------------------------------------------------------------
# magics

NBDMAGIC = 0x4e42444d41474943
IHAVEOPT = 0x49484156454F5054
OPTION_REPLY_MAGIC = 0x3e889045565a9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668e33ef
EXTENDED_REQUEST_MAGIC = 0x21e41c71
EXTENDED_REPLY_MAGIC = 0x6e8a278c

# handshake flags (server -> client) and client flags (client -> server)
FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
SERVER_HANDSHAKE_FLAGS = FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES
CLIENT_FLAG_FIXED_NEWSTYLE = 1 << 0
CLIENT_FLAG_NO_ZEROES = 1 << 1
KNOWN_CLIENT_FLAGS = CLIENT_FLAG_FIXED_NEWSTYLE | CLIENT_FLAG_NO_ZEROES

# options
OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10
OPT_EXTENDED_HEADERS = 11

OPTION_NAMES = {
    OPT_EXPORT_NAME: "EXPORT_NAME", OPT_ABORT: "ABORT", OPT_LIST: "LIST",
    OPT_STARTTLS: "STARTTLS", OPT_INFO: "INFO", OPT_GO: "GO",
    OPT_STRUCTURED_REPLY: "STRUCTURED_REPLY",
    OPT_LIST_META_CONTEXT: "LIST_META_CONTEXT",
    OPT_SET_META_CONTEXT: "SET_META_CONTEXT",
    OPT_EXTENDED_HEADERS: "EXTENDED_HEADERS",
}

# option reply types
REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_ERROR_BIT = 1 << 31
REP_ERR_UNSUP = REP_ERROR_BIT | 1
REP_ERR_POLICY = REP_ERROR_BIT | 2
REP_ERR_INVALID = REP_ERROR_BIT | 3
REP_ERR_PLATFORM = REP_ERROR_BIT | 4
REP_ERR_TLS_REQD = REP_ERROR_BIT | 5
REP_ERR_UNKNOWN = REP_ERROR_BIT | 6
REP_ERR_SHUTDOWN = REP_ERROR_BIT | 7
REP_ERR_BLOCK_SIZE_REQD = REP_ERROR_BIT | 8
REP_ERR_TOO_BIG = REP_ERROR_BIT | 9

# NBD_INFO types inside REP_INFO
INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

# transmission flags
TFLAG_HAS_FLAGS = 1 << 0
TFLAG_READ_ONLY = 1 << 1
TFLAG_SEND_FLUSH = 1 << 2
TFLAG_SEND_FUA = 1 << 3
TFLAG_ROTATIONAL = 1 << 4
TFLAG_SEND_TRIM = 1 << 5
TFLAG_SEND_WRITE_ZEROES = 1 << 6
TFLAG_SEND_DF = 1 << 7
TFLAG_CAN_MULTI_CONN = 1 << 8
TFLAG_SEND_CACHE = 1 << 10
TFLAG_SEND_FAST_ZERO = 1 << 11

# commands
CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7

COMMAND_NAMES = {
    CMD_READ: "READ", CMD_WRITE: "WRITE", CMD_DISC: "DISC",
    CMD_FLUSH: "FLUSH", CMD_TRIM: "TRIM", CMD_CACHE: "CACHE",
    CMD_WRITE_ZEROES: "WRITE_ZEROES", CMD_BLOCK_STATUS: "BLOCK_STATUS",
}

# command flags
CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4

# error numbers on the wire (the protocol fixes Linux's values)
NBD_EPERM = 1
NBD_EIO = 5
NBD_ENOMEM = 12
NBD_EINVAL = 22
NBD_ENOSPC = 28
NBD_EOVERFLOW = 75
NBD_ENOTSUP = 95
NBD_ESHUTDOWN = 108

# structured reply chunk types and flags
CHUNK_FLAG_DONE = 1 << 0
CHUNK_NONE = 0
CHUNK_OFFSET_DATA = 1
CHUNK_OFFSET_HOLE = 2
CHUNK_BLOCK_STATUS = 5
CHUNK_ERROR = (1 << 15) + 1
CHUNK_ERROR_OFFSET = (1 << 15) + 2

# meta contexts this server knows, by name -> id sent to the client
BASE_ALLOCATION = "base:allocation"
META_CONTEXTS = {BASE_ALLOCATION: 1}
BASE_ALLOCATION_ID = META_CONTEXTS[BASE_ALLOCATION]

# Limits on what a client may make us read during the handshake.  A
# string is at most 4096 bytes (the spec's limit); an option payload
# longer than this cannot be legitimate and is refused without reading it.
MAX_STRING = 4096
MAX_OPTION_LENGTH = 64 * 1024
MAX_ERROR_MESSAGE = 4096

# ---------------------------------------------------------------------------
# wire formats, compiled once

GREETING = struct.Struct(">QQH")
CLIENT_FLAGS = struct.Struct(">I")
OPTION_HEADER = struct.Struct(">QII")
OPTION_REPLY_HEADER = struct.Struct(">QIII")
EXPORT_NAME_REPLY = struct.Struct(">QH")
INFO_EXPORT_PAYLOAD = struct.Struct(">HQH")
INFO_BLOCK_SIZE_PAYLOAD = struct.Struct(">HIII")
U16 = struct.Struct(">H")
U32 = struct.Struct(">I")
REQUEST = struct.Struct(">IHHQQI")
SIMPLE_REPLY = struct.Struct(">IIQ")
CHUNK_HEADER = struct.Struct(">IHHQI")
OFFSET_DATA_HEADER = struct.Struct(">IHHQIQ")
OFFSET_HOLE_CHUNK = struct.Struct(">IHHQIQI")
ERROR_CHUNK_START = struct.Struct(">IHHQIIH")
EXTENT_DESCRIPTOR = struct.Struct(">II")

REQUEST_SIZE = REQUEST.size
EXPORT_NAME_PADDING = bytes(124)


class ProtocolError(Exception):
    """The peer broke the protocol; the connection cannot continue."""


# ---------------------------------------------------------------------------
# errno mapping


def nbd_errno(err):
    """Map a host errno to one the protocol defines (nbdkit's mapping:
    anything without an NBD equivalent becomes EINVAL)."""
    return _ERRNO_MAP.get(err, NBD_EINVAL)


_ERRNO_MAP = {
    _errno.EPERM: NBD_EPERM, _errno.EROFS: NBD_EPERM,
    _errno.EACCES: NBD_EPERM,
    _errno.EIO: NBD_EIO,
    _errno.ENOMEM: NBD_ENOMEM,
    _errno.EINVAL: NBD_EINVAL,
    _errno.ENOSPC: NBD_ENOSPC, _errno.EFBIG: NBD_ENOSPC,
    _errno.EDQUOT: NBD_ENOSPC,
    _errno.EOVERFLOW: NBD_EOVERFLOW,
    _errno.ENOTSUP: NBD_ENOTSUP, _errno.EOPNOTSUPP: NBD_ENOTSUP,
    _errno.ESHUTDOWN: NBD_ESHUTDOWN,
}
