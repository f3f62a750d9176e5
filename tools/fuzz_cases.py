"""What the fuzzers send: client byte streams for the handshake (valid
sessions, then mutated: bits flipped, fields set to edge values, pieces
cut, repeated or dropped, streams truncated), and transmission requests
with every command and flag.  Deterministic for a given random.Random.
"""

import os
import struct
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from vddktool import protocol as nbd  # noqa: E402

# Every option the protocol knows, and some it does not.
OPTION_CODES = sorted(nbd.OPTION_NAMES) + [0, 4, 12, 99, 0x7fffffff,
                                           0xffffffff]
COMMANDS = sorted(nbd.COMMAND_NAMES) + [8, 9, 0x4242, 0xffff]
ALL_CMD_FLAGS = (nbd.CMD_FLAG_FUA | nbd.CMD_FLAG_NO_HOLE | nbd.CMD_FLAG_DF
                 | nbd.CMD_FLAG_REQ_ONE | nbd.CMD_FLAG_FAST_ZERO)
# Lengths at the edges of every limit the server has.
EDGE_U32 = [0, 1, 2, 3, 4, 7, 8, 511, 512, 4095, 4096, 4097,
            nbd.MAX_STRING, nbd.MAX_STRING + 1, nbd.MAX_OPTION_LENGTH,
            nbd.MAX_OPTION_LENGTH + 1, nbd.MAX_REQUEST_SIZE,
            nbd.MAX_REQUEST_SIZE + 1, 0x7fffffff, 0x80000000, 0xffffffff]
NAMES = [b"", b"disk", b"\xc3\xa9", b"\xff\xfe", b"\0", b"x" * 300,
         b"[ds] vm/../x.vmdk"]
QUERIES = [b"base:allocation", b"base:", b"qemu:dirty-bitmap:x", b"", b"x",
           b"base:allocation" * 20]


def _string(data):
    return struct.pack(">I", len(data)) + data


def option_payload(rng, code):
    """A payload that is right for ``code`` most of the time."""
    if code == nbd.OPT_EXPORT_NAME:
        return rng.choice(NAMES)
    if code in (nbd.OPT_INFO, nbd.OPT_GO):
        infos = [rng.choice([0, 1, 2, 3, 4, 0xffff])
                 for _ in range(rng.randint(0, 5))]
        return (_string(rng.choice(NAMES))
                + struct.pack(">H%dH" % len(infos), len(infos), *infos))
    if code in (nbd.OPT_LIST_META_CONTEXT, nbd.OPT_SET_META_CONTEXT):
        queries = [rng.choice(QUERIES) for _ in range(rng.randint(0, 4))]
        return (_string(rng.choice(NAMES)) + struct.pack(">I", len(queries))
                + b"".join(_string(q) for q in queries))
    if code in OPTION_CODES and rng.random() < 0.8:
        return b""
    return rng_bytes(rng, rng.randint(0, 40))


def option(rng, code=None, starttls=True):
    if code is None:
        code = rng.choice(OPTION_CODES)
        while not starttls and code == nbd.OPT_STARTTLS:
            code = rng.choice(OPTION_CODES)
    payload = option_payload(rng, code)
    return nbd.OPTION_HEADER.pack(nbd.IHAVEOPT, code, len(payload)) + payload


def client_flags(rng):
    return struct.pack(">I", rng.choice(
        [3, 3, 3, 1, 2, 0, rng.getrandbits(32)]))


def valid_session(rng, starttls=True):
    """Flags and a few options, well formed (the server may refuse
    them); often ending with GO or EXPORT_NAME of the default export."""
    out = [client_flags(rng)]
    for _ in range(rng.randint(0, 8)):
        out.append(option(rng, starttls=starttls))
    end = rng.random()
    if end < 0.4:
        payload = _string(b"") + struct.pack(">H", 0)
        out.append(nbd.OPTION_HEADER.pack(nbd.IHAVEOPT, nbd.OPT_GO,
                                          len(payload)) + payload)
    elif end < 0.5:
        out.append(nbd.OPTION_HEADER.pack(nbd.IHAVEOPT, nbd.OPT_EXPORT_NAME,
                                          0))
    return b"".join(out)


def rng_bytes(rng, count):
    return bytes(rng.getrandbits(8) for _ in range(count))


def mutate(rng, data):
    """One to four changes of the kinds that break parsers."""
    data = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        kind = rng.randrange(8)
        if not data:
            data += rng_bytes(rng, rng.randint(1, 16))
            continue
        pos = rng.randrange(len(data))
        if kind == 0:                       # flip a bit
            data[pos] ^= 1 << rng.randrange(8)
        elif kind == 1:                     # a random byte
            data[pos] = rng.getrandbits(8)
        elif kind == 2:                     # an edge value in a u32
            data[pos:pos + 4] = struct.pack(">I", rng.choice(EDGE_U32))
        elif kind == 3:                     # insert noise
            data[pos:pos] = rng_bytes(rng, rng.randint(1, 24))
        elif kind == 4:                     # drop a piece
            del data[pos:pos + rng.randint(1, 24)]
        elif kind == 5:                     # repeat a piece
            end = min(len(data), pos + rng.randint(1, 64))
            data[pos:pos] = data[pos:end] * rng.randint(1, 4)
        elif kind == 6:                     # truncate
            del data[pos:]
        else:                               # a random u16
            data[pos:pos + 2] = struct.pack(">H", rng.getrandbits(16))
    return bytes(data)


def handshake_stream(rng, starttls=True):
    """A client stream for the handshake: valid, mutated, or noise."""
    kind = rng.random()
    if kind < 0.3:
        return valid_session(rng, starttls)
    if kind < 0.9:
        return mutate(rng, valid_session(rng, starttls))
    return rng_bytes(rng, rng.randint(0, 200))


def request(rng, size, cookie):
    """(command, flags, cookie, offset, length, payload): every command,
    flags valid and not, offsets and lengths near the disk's edges and
    far off; a WRITE's payload always matches its length (at most 64
    KiB) so that the stream stays framed."""
    command = rng.choice(COMMANDS + [nbd.CMD_READ, nbd.CMD_WRITE,
                                     nbd.CMD_BLOCK_STATUS] * 2)
    while command == nbd.CMD_DISC:
        command = rng.choice(COMMANDS)
    flags = rng.choice([0, 0, 0, rng.randint(0, ALL_CMD_FLAGS),
                        rng.getrandbits(16)])
    offset = rng.choice([0, rng.randrange(0, size, 512),
                         rng.randrange(0, size, 512), rng.randrange(size),
                         size - 512, size, size + 512, rng.getrandbits(64),
                         (1 << 64) - 1])
    length = rng.choice([0, 1, 512, 4096, 4096, rng.randint(1, 65536),
                         rng.choice(EDGE_U32), rng.getrandbits(32)])
    if command == nbd.CMD_WRITE:
        length = min(length, 65536)
    elif command == nbd.CMD_READ and length > 4 << 20:
        length = rng.choice([length, rng.randint(0, 4 << 20)])
    payload = rng_bytes(rng, 8) * (length // 8) + rng_bytes(rng, length % 8) \
        if command == nbd.CMD_WRITE else b""
    return command, flags, cookie, offset, length, payload


def encode(requests):
    return b"".join(nbd.encode_request(command, cookie, offset, length,
                                       flags) + payload
                    for command, flags, cookie, offset, length, payload
                    in requests)
