"""The TLS channel: the channel contract of channels.py, encrypted, over
any raw channel (an accepted socket, or stdin/stdout with -s).

It is built on ssl.SSLObject and two MemoryBIOs rather than on
ssl.SSLSocket: one thread reads requests while others send replies, and
an SSL object must never be used by two threads at once, so all
encryption and decryption happens in memory under one lock, and the raw
reads and writes happen outside it.  A reader blocked on the network
never holds up a sender, and a sender blocked on a client that does not
read never holds up the reader.

``_send_lock`` keeps the encrypted bytes in order: only its holder takes
bytes out of the outgoing BIO and writes them, so records reach the
client in the order OpenSSL made them (a reply's, or those the reader
caused, such as TLS 1.3's session tickets).

sendfile(2) would bypass the encryption: ``zero_copy`` is false and
file ranges are read into memory first.
"""

import ssl
import threading

from ..engine import in_memory

# Plaintext encrypted per hold of the lock: big enough to amortize the
# lock and the system call, small enough to bound the memory a reply
# takes on its way out (a 64 MiB read goes out piece by piece).
SEND_CHUNK = 256 * 1024
# Runs of smaller pieces (reply headers, block status chunks) are joined
# into one TLS record rather than a record each.
_SMALL_PIECE = 16 * 1024
# Raw bytes read per system call (a TLS record is at most ~16 KiB).
RECV_SIZE = 64 * 1024


class TlsHandshakeError(Exception):
    """The client hung up or failed TLS's own handshake."""


class TlsChannel(object):
    zero_copy = False
    is_tls = True

    def __init__(self, raw, context, early=b""):
        """``raw``: the channel the connection started on; ``early``:
        bytes already taken off it that belong to TLS."""
        self.raw = raw
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._ssl = context.wrap_bio(self._incoming, self._outgoing,
                                     server_side=True)
        self._lock = threading.Lock()       # the SSL object and its BIOs
        self._send_lock = threading.Lock()  # the order of bytes sent
        self._recv_view = memoryview(bytearray(RECV_SIZE))
        if early:
            self._incoming.write(early)

    # -- the TLS handshake --
    def handshake(self):
        """Run TLS's handshake.  Raises TlsHandshakeError (the client
        hung up, or TLS refused it: the reason is in the message)."""
        while True:
            failure = None
            with self._lock:
                try:
                    self._ssl.do_handshake()
                    done = True
                except ssl.SSLWantReadError:
                    done = False
                except ssl.SSLError as exc:
                    failure = exc
            # Also after a failure: OpenSSL queued an alert telling the
            # client why.
            self._flush()
            if failure is not None:
                raise TlsHandshakeError(describe_ssl_error(failure))
            if done:
                return
            if not self._fill():
                raise TlsHandshakeError("the client hung up during the TLS "
                                        "handshake")

    def describe(self):
        """The protocol version and cipher, for the debug log."""
        cipher = self._ssl.cipher()
        return "%s, %s" % (self._ssl.version(), cipher[0] if cipher else "?")

    # -- raw I/O --
    def _fill(self):
        """Move raw bytes from the client into the incoming BIO."""
        view = self._recv_view
        count = self.raw.recv_some(view)
        if not count:
            return False
        with self._lock:
            self._incoming.write(view[:count])
        return True

    def _flush(self, wait=True):
        """Send whatever OpenSSL has produced.  Without ``wait``, leave
        it to the thread sending now (its next turn takes it along)."""
        if not self._send_lock.acquire(wait):
            return
        try:
            with self._lock:
                data = self._outgoing.read()
            if data:
                self.raw.send_raw(data)
        finally:
            self._send_lock.release()

    # -- the channel contract --
    def buffered(self, count):
        return None  # replies are not corked under TLS

    def read_into(self, view):
        """Fill ``view`` with decrypted bytes; False at end of stream."""
        got, wanted = 0, len(view)
        while got < wanted:
            with self._lock:
                try:
                    count = self._ssl.read(wanted - got, view[got:])
                except ssl.SSLWantReadError:
                    count = -1
                except ssl.SSLZeroReturnError:
                    return False    # the client said goodbye
                produced = self._outgoing.pending
            if produced:
                # TLS 1.3 may answer a read (session tickets, key updates).
                self._flush(wait=False)
            if count < 0:
                if not self._fill():
                    return False
            elif count == 0:
                return False
            else:
                got += count
        return True

    def send(self, buffers):
        pieces = [memoryview(in_memory(piece)).cast("B") for piece in buffers]
        with self._send_lock:
            batch, size = [], 0
            for piece in pieces:
                for start in range(0, len(piece), SEND_CHUNK):
                    part = piece[start:start + SEND_CHUNK]
                    batch.append(part)
                    size += len(part)
                    if size >= SEND_CHUNK:
                        self._encrypt_and_send(batch)
                        batch, size = [], 0
            if batch:
                self._encrypt_and_send(batch)

    def _encrypt_and_send(self, batch):
        """One system call for a batch of pieces.  The caller holds
        _send_lock."""
        with self._lock:
            run = []
            for part in batch:
                if len(part) < _SMALL_PIECE:
                    run.append(part)
                    continue
                if run:
                    self._ssl.write(b"".join(run))
                    run = []
                self._ssl.write(part)
            if run:
                self._ssl.write(b"".join(run))
            out = self._outgoing.read()
        self.raw.send_raw(out)

    def stop_reading(self):
        self.raw.stop_reading()

    def abort(self):
        self.raw.abort()

    def close(self):
        """Say goodbye (TLS's close_notify, as the NBD spec asks) if the
        client has room for it, then close the raw channel."""
        if self._send_lock.acquire(False):
            try:
                with self._lock:
                    try:
                        self._ssl.unwrap()
                    except (ssl.SSLError, ValueError):
                        pass    # expected: the client's goodbye is unread
                    goodbye = self._outgoing.read()
                if goodbye:
                    self.raw.send_if_room(goodbye)
            finally:
                self._send_lock.release()
        self.raw.close()


def describe_ssl_error(exc):
    """OpenSSL's reason ("tlsv1 alert unknown ca"), with why a client's
    certificate was refused when known, or the whole message."""
    reason = getattr(exc, "reason", None)
    if not reason:
        return str(exc)
    text = reason.lower().replace("_", " ")
    detail = getattr(exc, "verify_message", None)     # Python 3.7+
    return "%s: %s" % (text, detail) if detail else text
