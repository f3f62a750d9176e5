"""Channels: how one connection's bytes move.

A channel reads exactly what the protocol asks (``read_into``) and sends
lists of buffers (``send``); when its ``zero_copy`` is true, the list may
hold engine.FileRange pieces, which go out with sendfile(2) without
passing through Python.  ``stop_reading`` wakes a blocked reader (it sees
end of stream), ``abort`` also fails a blocked send, ``close`` ends it.

SocketChannel serves accepted sockets (and stdin when it is one),
PipeChannel a pair of pipes (-s).  Both also move raw bytes for the TLS
channel layered on them (tls_channel.py): ``recv_some`` (bytes read ahead
first: after STARTTLS they are the start of the TLS handshake),
``send_raw`` and ``send_if_room`` (never blocks: for TLS's goodbye).
"""

import errno
import os
import select
import socket
import stat
import threading

from ..engine import FileRange
from .splice import FileWriteFailed, Splicer

# Buffers per sendmsg/writev call, well under Linux's IOV_MAX of 1024.
_MAX_IOVECS = 512

# Asked for (the kernel doubles it, and caps it at net.core.wmem_max).
UNIX_SEND_BUFFER = 1024 * 1024

# Errors of sendfile(2) that mean the client went away, not the file.
CLIENT_GONE = frozenset((errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN,
                         errno.ESHUTDOWN))

# Tells the kernel more follows a reply header (TCP: one segment, not two).
_MSG_MORE = getattr(socket, "MSG_MORE", 0)


class FileSendError(OSError):
    """Reading the disk failed while its data was being sent: part of a
    reply is out, so the connection must be dropped."""


class SocketChannel(object):
    """A connected stream socket (accepted, or stdin when it is one)."""

    # Data still in files goes out with sendfile(2): no copy into Python.
    zero_copy = True
    is_tls = False

    # Requests arrive in bursts (nbdcopy keeps 64 in flight): one recv
    # into this buffer picks up many 28-byte headers, sparing a system
    # call and a GIL hand-off per request.  Large payloads bypass it.
    BUFFER_SIZE = 64 * 1024

    def __init__(self, sock):
        self.sock = sock
        self._recv_into = sock.recv_into
        self._sendmsg = sock.sendmsg
        self._buffer = memoryview(bytearray(self.BUFFER_SIZE))
        self._start = self._end = 0
        # Set after a large payload (received directly, or spliced into
        # a file): the next read takes only the header it asks for, so
        # the payload after it is not read ahead into this buffer (and
        # copied out again, or written from Python) but taken whole.
        self._exact = False
        self._splicer = None
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            # Replies are written whole; Nagle would only delay them.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def read_into(self, view):
        """Fill ``view``; False at end of stream."""
        wanted = len(view)
        start = self._start
        buffered = self._end - start
        if buffered >= wanted:
            view[:] = self._buffer[start:start + wanted]
            self._start = start + wanted
            return True
        if buffered:
            view[:buffered] = self._buffer[start:self._end]
        self._start = self._end = 0
        if self._exact:
            self._exact = False
            return self._recv_all(view[buffered:])
        if wanted - buffered > self.BUFFER_SIZE // 2:
            self._exact = True
            return self._recv_all(view[buffered:])
        got = buffered
        while got < wanted:
            n = self._recv_into(self._buffer, self.BUFFER_SIZE)
            if n == 0:
                return False
            take = min(n, wanted - got)
            view[got:got + take] = self._buffer[:take]
            got += take
            if take < n:
                self._start, self._end = take, n
        return True

    def receive_into_file(self, fd, offset, count):
        """Take the next ``count`` bytes of the stream (a write's payload)
        straight into file ``fd`` at ``offset`` (splice(2)).  True when
        done, False at end of stream, None when this socket cannot do it
        (nothing taken: receive as usual); raises FileWriteFailed when
        the file failed, the payload taken all the same."""
        splicer = self._splicer
        if splicer is None:
            splicer = self._splicer = Splicer(self.sock.fileno())
        if not splicer.usable:
            return None
        buffered = min(self._end - self._start, count)
        failure = None
        if buffered < count:
            try:
                moved = splicer.move(fd, offset + buffered, count - buffered)
            except FileWriteFailed as exc:
                moved, failure = True, exc
            if not moved:
                return moved    # None (unusable) or False (hung up)
            self._exact = True
        if buffered:
            start = self._start
            self._start = start + buffered
            if failure is None:
                view = self._buffer[start:start + buffered]
                try:
                    while view:
                        written = os.pwrite(fd, view, offset)
                        view, offset = view[written:], offset + written
                except OSError as exc:
                    failure = FileWriteFailed(exc.errno)
        if failure is not None:
            raise failure
        return True

    def buffered(self, count):
        """The next ``count`` bytes if they are already read ahead (a
        view, valid until the next read), else None."""
        start = self._start
        if self._end - start >= count:
            return self._buffer[start:start + count]
        return None

    def recv_some(self, view):
        """Up to len(view) bytes, those read ahead first; 0 at end of
        stream."""
        buffered = self._end - self._start
        if buffered:
            count = min(buffered, len(view))
            view[:count] = self._buffer[self._start:self._start + count]
            self._start += count
            return count
        return self._recv_into(view)

    def send_raw(self, data):
        self.sock.sendall(data)

    def send_if_room(self, data):
        try:
            self.sock.send(data, socket.MSG_DONTWAIT)
        except OSError:
            pass

    def _recv_all(self, view):
        wanted = len(view)
        got = 0
        while got < wanted:
            n = self._recv_into(view[got:], wanted - got, socket.MSG_WAITALL)
            if n == 0:
                return False
            got += n
        return True

    def send(self, buffers):
        if len(buffers) == 1 and type(buffers[0]) is not FileRange:
            # Most replies: one header, or one chunk with its data.
            sent = self._sendmsg(buffers)
            if sent < len(buffers[0]):
                self._send_rest(buffers, sent)
            return
        start = 0
        for index, piece in enumerate(buffers):
            if type(piece) is FileRange:
                if index > start:
                    self._send_buffers(buffers[start:index], _MSG_MORE)
                self._send_file(piece)
                start = index + 1
        if start == 0:
            self._send_buffers(buffers)
        elif start < len(buffers):
            self._send_buffers(buffers[start:])

    def _send_buffers(self, buffers, flags=0):
        for start in range(0, len(buffers), _MAX_IOVECS):
            batch = buffers[start:start + _MAX_IOVECS]
            sent = (self._sendmsg(batch, (), flags) if flags
                    else self._sendmsg(batch))
            if sent < sum(len(b) for b in batch):
                self._send_rest(batch, sent)

    def _send_file(self, piece):
        fileno = self.sock.fileno()
        offset, left = piece.offset, piece.length
        while left:
            try:
                sent = os.sendfile(fileno, piece.fd, offset, left)
            except OSError as exc:
                if exc.errno in CLIENT_GONE:
                    raise
                raise FileSendError(exc.errno, "sending from the disk: %s"
                                     % exc.strerror)
            if sent == 0:
                raise FileSendError(errno.EIO, "the disk file ends %d bytes "
                                     "short of a reply" % left)
            offset += sent
            left -= sent

    def _send_rest(self, batch, sent):
        # A signal can interrupt a blocking sendmsg part way.
        for buf in batch:
            size = len(buf)
            if sent >= size:
                sent -= size
                continue
            self.sock.sendall(memoryview(buf)[sent:])
            sent = 0

    def stop_reading(self):
        """Wake a reader blocked in recv: it sees end of stream."""
        try:
            self.sock.shutdown(socket.SHUT_RD)
        except OSError:
            pass

    def abort(self):
        """Also fail any send blocked on a client that does not read."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def close(self):
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        if self._splicer is not None:
            self._splicer.close()


class PipeChannel(object):
    """A pair of file descriptors that are not one socket (-s with
    pipes).  A pipe read cannot be interrupted from another thread, so
    every read first waits for data, the server's stop pipe or the
    channel's own (``stop_reading``)."""

    # sendfile(2) needs a socket here (pipes take splice): read instead.
    zero_copy = False
    is_tls = False

    def __init__(self, read_fd, write_fd, stop_fd):
        self.read_fd = read_fd
        self.write_fd = write_fd
        self.stop_fd = stop_fd
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_write, False)
        # stop_reading may come from another thread as close runs: never
        # write to a descriptor number that may have been reused.
        self._wake_lock = threading.Lock()

    def buffered(self, count):
        return None  # no read-ahead on pipes

    def read_into(self, view):
        got, wanted = 0, len(view)
        while got < wanted:
            n = self.recv_some(view[got:])
            if n == 0:
                return False
            got += n
        return True

    def recv_some(self, view):
        ready, _, _ = select.select(
            [self.read_fd, self.stop_fd, self._wake_read], [], [])
        if self.stop_fd in ready or self._wake_read in ready:
            return 0
        return os.readv(self.read_fd, [view])

    def send_raw(self, data):
        self.send([data])

    def send_if_room(self, data):
        try:
            _, ready, _ = select.select([], [self.write_fd], [], 0)
            if ready:
                os.write(self.write_fd, data)
        except OSError:
            pass

    def send(self, buffers):
        views = [memoryview(b).cast("B") for b in buffers if len(b)]
        while views:
            sent = os.writev(self.write_fd, views[:_MAX_IOVECS])
            while views and sent >= len(views[0]):
                sent -= len(views[0])
                views.pop(0)
            if sent:
                views[0] = views[0][sent:]

    def stop_reading(self):
        with self._wake_lock:
            if self._wake_write >= 0:
                try:
                    os.write(self._wake_write, b"!")
                except OSError:
                    pass  # already woken

    def abort(self):
        # A write to a pipe cannot be cut short; a read can.
        self.stop_reading()

    def close(self):
        # stdin/stdout belong to the process; only the wake pipe is ours.
        with self._wake_lock:
            if self._wake_write >= 0:
                os.close(self._wake_read)
                os.close(self._wake_write)
                self._wake_read = self._wake_write = -1


def enlarge_send_buffer(sock):
    """A Unix socket's only buffer is the sender's (TCP sizes its own):
    room for a few replies lets the thread go on to the next request while
    the client drains the last one."""
    if sock.family == socket.AF_UNIX:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF,
                            UNIX_SEND_BUFFER)
        except OSError:
            pass


def stdio_channel(read_fd, write_fd, stop_fd):
    """A socket channel when both descriptors are the same socket (inetd,
    libnbd's connect_command), else a pipe channel."""
    read_stat, write_stat = os.fstat(read_fd), os.fstat(write_fd)
    same = (read_stat.st_ino, read_stat.st_dev) == (write_stat.st_ino,
                                                   write_stat.st_dev)
    if same and stat.S_ISSOCK(read_stat.st_mode):
        probe = socket.fromfd(read_fd, socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            family = probe.getsockopt(socket.SOL_SOCKET, socket.SO_DOMAIN)
        finally:
            probe.close()
        sock = socket.fromfd(read_fd, family, socket.SOCK_STREAM)
        sock.setblocking(True)
        enlarge_send_buffer(sock)
        return SocketChannel(sock)
    return PipeChannel(read_fd, write_fd, stop_fd)
