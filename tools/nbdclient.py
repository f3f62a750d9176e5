"""A small NBD client for the fuzz and load tools and the tests: plain
sockets, pipes, and TLS after STARTTLS (ssl.SSLObject on memory BIOs,
so it works over pipes too).  It sends whatever it is told, valid or
not, and checks the framing of every reply it reads.

Not part of vddktool: a test instrument that must be able to misbehave.
"""

import os
import socket
import ssl
import struct
import sys
import threading

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from vddktool import protocol as nbd  # noqa: E402

FIXED_NO_ZEROES = nbd.CLIENT_FLAG_FIXED_NEWSTYLE | nbd.CLIENT_FLAG_NO_ZEROES
STATE_HOLE = 1
STATE_ZERO = 2


class ClientError(Exception):
    """The server broke the protocol (or hung up early)."""


class Plain(object):
    """Bytes over a socket or a pair of descriptors."""

    def __init__(self, sock=None, read_fd=None, write_fd=None):
        self.sock = sock
        self.read_fd = read_fd
        self.write_fd = write_fd

    def send(self, data):
        if self.sock is not None:
            self.sock.sendall(data)
            return
        view = memoryview(data)
        while view:
            view = view[os.write(self.write_fd, view):]

    def recv_some(self, count):
        if self.sock is not None:
            return self.sock.recv(count)
        return os.read(self.read_fd, count)

    def close(self):
        if self.sock is not None:
            self.sock.close()


class _Tls(object):
    """TLS over another transport, through memory BIOs.  One thread may
    send while another receives (as a client with requests in flight
    does): the SSL object is used under a lock, the network outside it,
    and a second lock keeps what is sent in order."""

    def __init__(self, raw, context, hostname=None):
        self.raw = raw
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.ssl = context.wrap_bio(self.incoming, self.outgoing,
                                    server_side=False,
                                    server_hostname=hostname)
        self.lock = threading.Lock()
        self.send_lock = threading.Lock()
        while True:
            try:
                with self.lock:
                    self.ssl.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._push()
                self._pull()
        self._push()

    def _push(self):
        with self.send_lock:
            with self.lock:
                data = self.outgoing.read()
            if data:
                self.raw.send(data)

    def _pull(self):
        data = self.raw.recv_some(65536)
        with self.lock:
            if data:
                self.incoming.write(data)
            else:
                self.incoming.write_eof()

    def send(self, data):
        view = memoryview(data)
        with self.send_lock:
            for start in range(0, len(view), 65536):
                with self.lock:
                    self.ssl.write(view[start:start + 65536])
                    out = self.outgoing.read()
                self.raw.send(out)

    def recv_some(self, count):
        while True:
            try:
                with self.lock:
                    return self.ssl.read(count)
            except ssl.SSLWantReadError:
                self._pull()
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return b""

    def close(self):
        self.raw.close()


def client_context(directory=None, psk=None):
    """An SSLContext like libnbd's: trusts ``directory``/ca-cert.pem,
    shows client-cert.pem if there; or ``psk`` = (user, key bytes)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    if psk is not None:
        user, key = psk
        context.verify_mode = ssl.CERT_NONE
        context.set_psk_client_callback(lambda hint: (user, key))
        return context
    context.load_verify_locations(os.path.join(directory, "ca-cert.pem"))
    cert = os.path.join(directory, "client-cert.pem")
    if os.path.exists(cert):
        context.load_cert_chain(cert, os.path.join(directory,
                                                   "client-key.pem"))
    return context


class Reply(object):
    """One request's answer: ``error`` (NBD errno), ``data`` (reads),
    ``extents`` [(length, flags)] (block status)."""

    def __init__(self, cookie):
        self.cookie = cookie
        self.error = 0
        self.data = None
        self.extents = []


class NbdClient(object):
    def __init__(self, transport):
        self.transport = transport
        self.structured = False
        self.size = None
        self.flags = None
        self.context_id = None
        self._pending = {}      # cookie -> (command, offset, length)
        self._next_cookie = 1

    # -- connecting --
    @classmethod
    def unix(cls, path, timeout=60):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        sock.connect(path)
        return cls(Plain(sock))

    @classmethod
    def tcp(cls, host, port, timeout=60):
        return cls(Plain(socket.create_connection((host, port), timeout)))

    @classmethod
    def pipes(cls, read_fd, write_fd):
        return cls(Plain(read_fd=read_fd, write_fd=write_fd))

    def close(self):
        self.transport.close()

    # -- bytes --
    def send(self, data):
        self.transport.send(data)

    def recv(self, count):
        """Exactly ``count`` bytes, or fewer at end of stream."""
        out = bytearray()
        while len(out) < count:
            piece = self.transport.recv_some(count - len(out))
            if not piece:
                break
            out += piece
        return bytes(out)

    def recv_exact(self, count):
        data = self.recv(count)
        if len(data) != count:
            raise ClientError("the server hung up (%d of %d bytes)"
                              % (len(data), count))
        return data

    def at_eof(self):
        try:
            return self.recv(1) == b""
        except (ConnectionResetError, BrokenPipeError):
            return True

    # -- negotiation --
    def greet(self, flags=FIXED_NO_ZEROES):
        magic, ihaveopt, _ = nbd.GREETING.unpack(
            self.recv_exact(nbd.GREETING.size))
        if (magic, ihaveopt) != (nbd.NBDMAGIC, nbd.IHAVEOPT):
            raise ClientError("bad greeting")
        self.send(struct.pack(">I", flags))

    def option(self, opt, payload=b""):
        self.send(nbd.OPTION_HEADER.pack(nbd.IHAVEOPT, opt, len(payload))
                  + payload)

    def reply(self):
        header = self.recv_exact(nbd.OPTION_REPLY_HEADER.size)
        magic, opt, rtype, length = nbd.OPTION_REPLY_HEADER.unpack(header)
        if magic != nbd.OPTION_REPLY_MAGIC:
            raise ClientError("bad option reply magic 0x%x" % magic)
        return opt, rtype, self.recv_exact(length)

    def replies_until_final(self):
        """Option replies up to the ACK or error; [(type, payload)]."""
        out = []
        while True:
            _, rtype, payload = self.reply()
            out.append((rtype, payload))
            if rtype not in (nbd.REP_INFO, nbd.REP_META_CONTEXT,
                             nbd.REP_SERVER):
                return out

    def starttls(self, context, hostname=None):
        self.option(nbd.OPT_STARTTLS)
        _, rtype, _ = self.reply()
        if rtype != nbd.REP_ACK:
            raise ClientError("STARTTLS refused (reply type 0x%x)" % rtype)
        self.transport = _Tls(self.transport, context, hostname)

    def go(self, name=b"", structured=True, block_status=True):
        """Negotiate to transmission; returns the export's size."""
        if structured:
            self.option(nbd.OPT_STRUCTURED_REPLY)
            self.structured = self.reply()[1] == nbd.REP_ACK
        if self.structured and block_status:
            query = b"base:allocation"
            self.option(nbd.OPT_SET_META_CONTEXT,
                        struct.pack(">I", len(name)) + name
                        + struct.pack(">II", 1, len(query)) + query)
            for rtype, payload in self.replies_until_final():
                if rtype == nbd.REP_META_CONTEXT:
                    self.context_id = struct.unpack_from(">I", payload)[0]
        self.option(nbd.OPT_GO, struct.pack(">I", len(name)) + name
                    + b"\0\0")
        for rtype, payload in self.replies_until_final():
            if rtype == nbd.REP_INFO and payload[:2] == b"\0\0":
                _, self.size, self.flags = nbd.INFO_EXPORT_PAYLOAD.unpack(
                    payload)
            elif rtype != nbd.REP_ACK and rtype != nbd.REP_INFO:
                raise ClientError("GO refused (reply type 0x%x)" % rtype)
        return self.size

    # -- transmission --
    def submit(self, command, offset, length, flags=0, data=b""):
        cookie = self._next_cookie
        self._next_cookie += 1
        self._pending[cookie] = (command, offset, length)
        self.send(nbd.encode_request(command, cookie, offset, length, flags)
                  + data)
        return cookie

    def receive(self):
        """The next complete Reply (all its chunks), in server order."""
        partial = {}
        while True:
            magic = struct.unpack(">I", self.recv_exact(4))[0]
            if magic == nbd.SIMPLE_REPLY_MAGIC:
                error, cookie = struct.unpack(">IQ", self.recv_exact(12))
                reply = partial.pop(cookie, None) or Reply(cookie)
                command, _, length = self._take(cookie)
                reply.error = error
                if command == nbd.CMD_READ and not error:
                    if self.structured:
                        raise ClientError("simple reply to a structured read")
                    reply.data = self.recv_exact(length)
                return reply
            if magic != nbd.STRUCTURED_REPLY_MAGIC:
                raise ClientError("bad reply magic 0x%x" % magic)
            if not self.structured:
                raise ClientError("structured reply not negotiated")
            flags, kind, cookie, length = struct.unpack(
                ">HHQI", self.recv_exact(16))
            body = self.recv_exact(length)
            if cookie not in self._pending:
                raise ClientError("reply to unknown cookie %d" % cookie)
            reply = partial.setdefault(cookie, Reply(cookie))
            self._chunk(reply, kind, body)
            if flags & nbd.CHUNK_FLAG_DONE:
                del partial[cookie]
                self._finish(reply)
                return reply

    def _take(self, cookie):
        try:
            return self._pending.pop(cookie)
        except KeyError:
            raise ClientError("reply to unknown cookie %d" % cookie)

    def _chunk(self, reply, kind, body):
        command, offset, length = self._pending[reply.cookie]
        if kind & 0x8000:
            reply.error = reply.error or struct.unpack_from(">I", body)[0]
            if not reply.error:
                raise ClientError("error chunk with errno 0")
        elif kind == nbd.CHUNK_OFFSET_DATA:
            at = struct.unpack_from(">Q", body)[0] - offset
            self._buffer(reply, length)[at:at + len(body) - 8] = body[8:]
        elif kind == nbd.CHUNK_OFFSET_HOLE:
            at, hole = struct.unpack_from(">QI", body)
            at -= offset
            self._buffer(reply, length)[at:at + hole] = bytes(hole)
        elif kind == nbd.CHUNK_BLOCK_STATUS:
            for i in range(4, len(body), 8):
                reply.extents.append(struct.unpack_from(">II", body, i))
        elif kind != nbd.CHUNK_NONE:
            raise ClientError("unknown chunk type %d" % kind)

    @staticmethod
    def _buffer(reply, length):
        if reply.data is None:
            reply.data = bytearray(length)
        return reply.data

    def _finish(self, reply):
        command, _, length = self._take(reply.cookie)
        if command == nbd.CMD_READ and not reply.error:
            if reply.data is None:
                reply.data = bytearray(length)  # an empty read
            reply.data = bytes(reply.data)

    def call(self, command, offset, length, flags=0, data=b""):
        self.submit(command, offset, length, flags, data)
        return self.receive()

    def pread(self, count, offset, flags=0):
        return self.call(nbd.CMD_READ, offset, count, flags)

    def pwrite(self, data, offset, flags=0):
        return self.call(nbd.CMD_WRITE, offset, len(data), flags, data)

    def disconnect(self):
        self.send(nbd.encode_request(nbd.CMD_DISC, 0, 0, 0))
