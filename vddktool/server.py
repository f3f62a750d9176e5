"""Sockets, threads and request dispatch around the sans-IO protocol.

Each connection gets one thread (socketserver-style) that negotiates and
then reads requests, executes them and sends the replies itself; only
when the disk stalls do more threads (up to -t per connection) join in,
so a slow request does not hold up fast ones, and replies go out in
completion order under a write lock.  With Python's GIL, every hand-off
between threads costs more than a read from the page cache.

Shutdown must be callable from a signal handler, so ``shutdown()`` only
sets a flag and writes a byte to a pipe that is never drained: the pipe
then stays readable, waking every select() that watches it, now or later.
"""

import errno
import itertools
import os
import select
import selectors
import socket
import socketserver
import stat
import threading
from time import monotonic

from . import log
from . import protocol as nbd
from .engine import (FUA_EMULATE, FUA_NATIVE, MAX_REQUEST_SIZE, PARALLEL,
                     EngineError, FileRange, SerializedEngine, errno_of,
                     in_memory)

# Buffers per sendmsg/writev call, well under Linux's IOV_MAX of 1024.
_MAX_IOVECS = 512

# Asked for (the kernel doubles it, and caps it at net.core.wmem_max).
_UNIX_SEND_BUFFER = 1024 * 1024

# Errors of sendfile(2) that mean the client went away, not the file.
_CLIENT_GONE = frozenset((errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN,
                          errno.ESHUTDOWN))

# Tells the kernel more follows a reply header (TCP: one segment, not two).
_MSG_MORE = getattr(socket, "MSG_MORE", 0)

# Write payload buffers kept for reuse per connection: one per thread that
# may be writing at once is plenty, the rest are freed.
_SPARE_WRITE_BUFFERS = 4

# How long one request may run before another thread takes over reading
# the next ones (see _LeaderFollowers).
_WORKER_PATIENCE_SECONDS = 0.005

# How long the main thread may sleep in select().  The kernel may deliver
# SIGTERM to any thread; Python then runs the handler only when the main
# thread next runs bytecode, so it must wake now and then to let it.
_SIGNAL_POLL_SECONDS = 0.5


class ServerSettings(object):
    """Server-wide options: -r, -e, -t, --tls."""

    def __init__(self, readonly=False, export_name="", threads=16,
                 tls="off"):
        self.readonly = readonly
        self.export_name = export_name
        self.threads = max(1, int(threads))
        self.tls = tls


# ---------------------------------------------------------------------------
# channels: how bytes move for one connection
#
# A channel's send() takes a list of bytes-like buffers and, when the
# channel's ``zero_copy`` is true, engine.FileRange pieces too.


class _FileSendError(OSError):
    """Reading the disk failed while its data was being sent: part of a
    reply is out, so the connection must be dropped."""


class _SocketChannel(object):
    """A connected stream socket (accepted, or stdin when it is one)."""

    # Data still in files goes out with sendfile(2): no copy into Python.
    zero_copy = True

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
        if wanted - buffered > self.BUFFER_SIZE // 2:
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
                if exc.errno in _CLIENT_GONE:
                    raise
                raise _FileSendError(exc.errno, "sending from the disk: %s"
                                     % exc.strerror)
            if sent == 0:
                raise _FileSendError(errno.EIO, "the disk file ends %d bytes "
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


class _PipeChannel(object):
    """A pair of file descriptors that are not one socket (-s with
    pipes).  A pipe read cannot be interrupted from another thread, so
    every read first waits for data or the stop pipe."""

    # sendfile(2) needs a socket here (pipes take splice): read instead.
    zero_copy = False

    def __init__(self, read_fd, write_fd, stop_fd):
        self.read_fd = read_fd
        self.write_fd = write_fd
        self.stop_fd = stop_fd

    def read_into(self, view):
        got, wanted = 0, len(view)
        while got < wanted:
            ready, _, _ = select.select([self.read_fd, self.stop_fd], [], [])
            if self.stop_fd in ready:
                return False
            n = os.readv(self.read_fd, [view[got:]])
            if n == 0:
                return False
            got += n
        return True

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
        pass  # the stop pipe wakes read_into

    def abort(self):
        pass  # a write to a pipe cannot be cut short

    def close(self):
        pass  # stdin/stdout belong to the process


def _enlarge_send_buffer(sock):
    """A Unix socket's only buffer is the sender's (TCP sizes its own):
    room for a few replies lets the thread go on to the next request while
    the client drains the last one."""
    if sock.family == socket.AF_UNIX:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF,
                            _UNIX_SEND_BUFFER)
        except OSError:
            pass


def _stdio_channel(read_fd, write_fd, stop_fd):
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
        _enlarge_send_buffer(sock)
        return _SocketChannel(sock)
    return _PipeChannel(read_fd, write_fd, stop_fd)


class _LeaderFollowers(object):
    """Runs one connection's requests on up to ``size`` threads.

    One thread at a time, the leader, reads a request, executes it and
    sends the reply itself, then reads the next: no queue and no hand-off
    between threads, which with Python's GIL cost more than a read from
    the page cache.  A second thread, the standby, naps meanwhile; when
    the leader has spent ``patience`` seconds inside one request (a slow
    disk: a slow request must not hold up fast ones) the standby takes
    over reading, and another thread, up to ``size``, becomes the next
    standby.  The old leader sends its reply, then waits as a follower.

    When many recent requests stalled (not the odd one: a page-cache
    write now and then waits for writeback), the disk is deemed slow: the
    leader then hands reading to a waiting thread as soon as it has a
    request, so up to ``size`` slow requests run at once without each
    waiting ``patience`` first.

    Time spent sending never counts: a leader blocked on the socket means
    the client is the bottleneck, which more threads would not help.

    ``read()`` returns the next request or None at the end of the stream;
    ``execute(request)`` returns what ``deliver`` sends.
    """

    # Once the connection has been quiet this long, the standby stops
    # napping and sleeps until the leader next starts a request.
    QUIET_SECONDS = 1.0
    # The share of stalls among recent requests (a moving average, each
    # request weighing STALL_WEIGHT) above which the disk counts as slow.
    SLOW_STALL_SHARE = 0.25
    STALL_WEIGHT = 0.125
    # The standby's naps grow to this many patiences while nothing stalls.
    LONGEST_NAP = 8

    def __init__(self, read, execute, deliver, size, patience):
        self._read = read
        self._execute = execute
        self._deliver = deliver
        self._size = size
        self._patience = patience
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._threads = []
        self._leader = None        # the thread reading, or None
        self._busy_since = None    # when the leader started executing
        self._last_request = monotonic()
        self._stall_share = 0.0
        self._waiting = 0          # threads in _follow, standby included
        self._standby = None
        self._standby_asleep = False
        self._nap = patience
        self._ended = False
        self._failure = None

    def run(self):
        """Serve until the end of the stream and every request is done.
        Whatever a thread raised (the client hung up...) is raised here,
        in the caller's thread."""
        try:
            self._serve()
        finally:
            with self._lock:
                self._end()
                threads = list(self._threads)
            for thread in threads:
                thread.join()
        if self._failure is not None:
            raise self._failure

    def _end(self):
        self._ended = True
        self._changed.notify_all()

    def _serve(self, spawned=False):
        me = threading.current_thread()
        counted = spawned  # _spawn counted it as waiting already
        while self._follow(me, counted):
            counted = False
            try:
                self._lead(me)
            except BaseException as exc:
                with self._lock:
                    if self._failure is None:
                        self._failure = exc
                    self._end()
                return

    def _lead(self, me):
        read, execute, deliver = self._read, self._execute, self._deliver
        lock = self._lock
        while True:
            request = read()
            with lock:
                if request is None:
                    self._end()
                    return
                started = self._last_request = monotonic()
                if self._stall_share >= self.SLOW_STALL_SHARE:
                    self._hand_over()
                if self._leader is me:
                    self._busy_since = started
                    if self._standby is None:
                        if self._waiting:
                            self._changed.notify()  # a follower stands by
                        else:
                            self._spawn()
                    elif self._standby_asleep:
                        self._standby_asleep = False
                        self._changed.notify_all()
            try:
                reply = execute(request)
            finally:
                with lock:
                    replaced = self._leader is not me
                    if not replaced:
                        self._busy_since = None
                    self._note(monotonic() - started >= self._patience)
            deliver(reply)
            if replaced:
                return

    def _note(self, stalled):
        """Count a request, stalled or not (a stall counts when seen and
        again when its request ends)."""
        self._stall_share += self.STALL_WEIGHT * (stalled -
                                                  self._stall_share)

    def _hand_over(self):
        """Let another thread read the next request while this one runs
        its own; with nobody free, keep reading."""
        if self._waiting:
            self._leader = None
            self._changed.notify()
        elif self._spawn():
            self._leader = None

    def _spawn(self):
        if len(self._threads) + 1 >= self._size:
            return False
        thread = threading.Thread(target=self._serve, args=(True,),
                                  name="nbd-worker")
        thread.daemon = True
        self._threads.append(thread)
        self._waiting += 1  # from now on: no second spawn meanwhile
        thread.start()
        return True

    def _follow(self, me, counted):
        """Wait until this thread should lead; False when serving ends."""
        with self._lock:
            if not counted:
                self._waiting += 1
            try:
                while not self._ended:
                    if self._leader is None:
                        if self._standby is me:
                            self._standby = None
                        self._leader = me
                        return True
                    if self._standby is None or self._standby is me:
                        self._standby = me
                        if self._stand_by():
                            self._standby = None
                            self._leader = me
                            return True
                        continue
                    self._changed.wait()
                if self._standby is me:
                    self._standby = None
                return False
            finally:
                self._waiting -= 1

    def _stand_by(self):
        """One nap of the standby; True when it should take over."""
        now = monotonic()
        remaining = 0.0
        if self._busy_since is not None:
            remaining = self._patience - (now - self._busy_since)
            if remaining <= 0:
                self._busy_since = None
                self._note(True)
                self._nap = self._patience
                return True
        elif now - self._last_request >= self.QUIET_SECONDS:
            self._standby_asleep = True
            self._changed.wait()
            self._standby_asleep = False
            return False
        # Each nap wakes a thread, which under the GIL costs the leader
        # too: while nothing stalls, the naps grow (a stall is then seen
        # a little late, and the disk deemed slow from then on).
        self._changed.wait(max(remaining, self._nap))
        self._nap = min(2 * self._nap, self.LONGEST_NAP * self._patience)
        return False


# ---------------------------------------------------------------------------
# one connection


class _Disconnect(Exception):
    """The connection cannot continue (protocol violation, client gone)."""


class _Connection(object):
    def __init__(self, server, channel, peer):
        self.server = server
        self.backend = server.backend
        self.settings = server.settings
        self.channel = channel
        self.peer = peer
        self.debugging = log.verbose()
        self._write_lock = threading.Lock()
        self._broken = False
        self._spare_write_buffers = []

    # -- plumbing --
    def _send(self, buffers):
        with self._write_lock:
            if self._broken:
                return
            try:
                self.channel.send(buffers)
            except _FileSendError as exc:
                # The reply is cut short: only a dropped connection tells
                # the client its data is wrong.
                self._broken = True
                log.error("%s: %s: dropping the connection", self.peer, exc)
                self.channel.abort()
            except OSError as exc:
                # The client is gone: make the reader stop too.
                self._broken = True
                if self.debugging:
                    log.debug("%s: write failed: %s", self.peer, exc)
                self.channel.stop_reading()

    def stop_reading(self):
        self.channel.stop_reading()

    def abort(self):
        self.channel.abort()

    def run(self):
        engine = None
        if not self.server._register(self):
            self.channel.close()
            return
        try:
            if self.debugging:
                log.debug("%s: new connection", self.peer)
            ready, engine = self._negotiate()
            if ready is not None:
                self._transmit(ready, engine)
        except (OSError, nbd.ProtocolError, _Disconnect) as exc:
            if self.debugging:
                log.debug("%s: connection ends: %s", self.peer, exc)
        finally:
            if engine is not None:
                self._close_engine(engine)
            self.channel.close()
            self.server._unregister(self)
            if self.debugging:
                log.debug("%s: closed", self.peer)

    # -- negotiation --
    def _negotiate(self):
        """Run the handshake.  Returns (Ready, engine) or (None, None)."""
        handshake = nbd.Handshake(self.settings.tls)
        self.channel.send([handshake.greeting()])
        while True:
            event = handshake.next_event()
            self._flush_handshake(handshake)
            if isinstance(event, nbd.NeedData):
                data = bytearray(event.count)
                if not self.channel.read_into(memoryview(data)):
                    return None, None
                handshake.receive_data(data)
            elif isinstance(event, nbd.ExportRequest):
                result, engine = self._answer_export(handshake, event)
                if isinstance(result, nbd.Ready):
                    return result, engine
            elif isinstance(event, nbd.ListRequest):
                handshake.answer_list(self.backend.list_exports())
            elif isinstance(event, nbd.TlsRequest):
                self._start_tls(handshake)
            elif isinstance(event, nbd.Closed):
                if self.debugging:
                    log.debug("%s: negotiation ends: %s", self.peer,
                              event.reason)
                return None, None

    def _flush_handshake(self, handshake):
        out = handshake.data_to_send()
        if out:
            self.channel.send([out])

    def _start_tls(self, handshake):
        # The seam for TLS: with a certificate configured this becomes
        # accept_tls(), send the ACK, wrap self.channel's socket with an
        # ssl.SSLContext (the channel's read buffer must be empty: bytes
        # after STARTTLS belong to the TLS handshake), then
        # handshake.tls_started().  A TLS channel has zero_copy False:
        # sendfile would bypass the encryption.
        handshake.refuse_tls("TLS is not implemented in this version")

    def _answer_export(self, handshake, request):
        if self.debugging:
            log.debug("%s: %s export %r", self.peer,
                      nbd.OPTION_NAMES[request.option], request.name)
        name = request.name or self.settings.export_name
        engine, message = self._open_engine(name)
        info = None
        if engine is not None:
            try:
                info = self._describe(engine, name, handshake.structured,
                                      request.infos)
            except Exception as exc:
                log.error("export %r: %s", name, exc)
                self._close_engine(engine)
                engine, message = None, "cannot query the export"
        result = handshake.answer_export(info, message)
        keep = isinstance(result, nbd.Ready)
        try:
            self._flush_handshake(handshake)
        except OSError:
            keep = False
            raise
        finally:
            if not keep and engine is not None:
                self._close_engine(engine)  # INFO only looks
        if isinstance(result, nbd.Closed):
            raise _Disconnect(result.reason)
        return result, engine if keep else None

    def _open_engine(self, name):
        try:
            engine = self.backend.open(name, self.settings.readonly)
        except EngineError as exc:
            if exc.errno == errno.ENOENT:
                return None, "unknown export %r" % name
            log.error("cannot open export %r: %s", name, exc)
            return None, "cannot open the export"
        except Exception as exc:
            log.error("cannot open export %r: %s", name, exc)
            return None, "cannot open the export"
        if engine.thread_model != PARALLEL:
            engine = SerializedEngine(engine)
        return engine, ""

    def _describe(self, engine, name, structured, infos):
        size = engine.get_size()
        flags = nbd.transmission_flags(engine, self.settings.readonly,
                                       structured)
        block_size = nbd.clamp_block_size(size, *engine.block_size())
        description = ""
        if nbd.INFO_DESCRIPTION in infos:
            description = self.backend.describe(name) or ""
        return nbd.ExportInfo(name, size, flags, block_size, description)

    def _close_engine(self, engine):
        try:
            engine.close()
        except Exception as exc:
            log.error("closing the disk: %s", exc)

    # -- transmission --
    def _transmit(self, ready, engine):
        export = ready.export
        self.engine = engine
        self.structured = ready.structured
        self.context_id = (nbd.BASE_ALLOCATION_ID
                           if nbd.BASE_ALLOCATION_ID in ready.meta_contexts
                           else None)
        self.limits = nbd.Limits(export.size, export.flags,
                                 export.block_size, ready.structured,
                                 self.context_id is not None)
        self.fua_mode = engine.can_fua()
        self.fast_zero = engine.can_fast_zero()
        self.extents_known = engine.can_extents()
        if self.debugging:
            log.debug("%s: serving %r: size %d, flags 0x%x, structured %s",
                      self.peer, export.name, export.size, export.flags,
                      ready.structured)
        self._handlers = {
            nbd.CMD_READ: (self._read_structured if ready.structured
                           else self._read_simple),
            nbd.CMD_WRITE: self._write,
            nbd.CMD_FLUSH: self._flush,
            nbd.CMD_TRIM: self._trim,
            nbd.CMD_CACHE: self._cache,
            nbd.CMD_WRITE_ZEROES: self._zero,
            nbd.CMD_BLOCK_STATUS: self._block_status,
        }
        self._header = memoryview(bytearray(nbd.REQUEST_SIZE))
        # Returns at DISC, end of stream or shutdown, once every request
        # in flight has been answered.
        _LeaderFollowers(self._next_request, self._execute, self._send,
                         self.settings.threads,
                         _WORKER_PATIENCE_SECONDS).run()
        # A client that leaves flushes if it cares (nbdkit does not flush
        # for it, and an fdatasync per disconnect costs seconds); a server
        # shutdown cuts clients off, so it flushes on their behalf.
        if self.server._stopping and not export.flags & nbd.TFLAG_READ_ONLY \
                and export.flags & nbd.TFLAG_SEND_FLUSH:
            try:
                engine.flush()
            except Exception as exc:
                log.error("flush at disconnect: %s", exc)

    def _next_request(self):
        """The next valid request, or None when the connection ends.
        Invalid requests are answered here."""
        header = self._header
        read_into = self.channel.read_into
        debugging = self.debugging
        while True:
            if not read_into(header):
                return None
            magic, flags, command, cookie, offset, length = \
                nbd.REQUEST.unpack_from(header)
            if magic != nbd.REQUEST_MAGIC:
                log.error("%s: bad request magic 0x%x: disconnecting",
                          self.peer, magic)
                return None
            if debugging:
                log.debug("%s: %s flags 0x%x offset %d length %d cookie %d",
                          self.peer, nbd.COMMAND_NAMES.get(command, command),
                          flags, offset, length, cookie)
            payload = None
            if command == nbd.CMD_WRITE:
                if length > MAX_REQUEST_SIZE:
                    # Its payload cannot be skipped without reading
                    # whatever the client claims: refuse and hang up.
                    self._send(self._error_reply(command, cookie,
                                                 nbd.NBD_EINVAL))
                    return None
                payload = self._write_buffer(length)
                if length and not read_into(memoryview(payload)):
                    return None
            elif command == nbd.CMD_DISC:
                return None
            error = nbd.validate_request(command, flags, offset, length,
                                         self.limits)
            if error:
                self._send(self._error_reply(command, cookie, error))
                continue
            return flags, command, cookie, offset, length, payload

    def _execute(self, request):
        flags, command, cookie, offset, length, payload = request
        try:
            reply = self._handlers[command](flags, cookie, offset, length,
                                            payload)
        except Exception as exc:
            error = nbd.nbd_errno(errno_of(exc))
            log.error("%s: %s at offset %d length %d: %s", self.peer,
                      nbd.COMMAND_NAMES[command], offset, length, exc)
            reply = self._error_reply(command, cookie, error, str(exc))
        return reply

    def _error_reply(self, command, cookie, error, message=""):
        if self.structured and command in (nbd.CMD_READ,
                                           nbd.CMD_BLOCK_STATUS):
            return [nbd.error_chunk(cookie, error, message)]
        return [nbd.simple_reply(cookie, error)]

    # -- command handlers: each returns the reply buffers --
    def _read_simple(self, flags, cookie, offset, length, payload):
        data = self.engine.pread(length, offset)
        if len(data) != length:
            raise EngineError(errno.EIO, "short read from the disk")
        return [nbd.simple_reply(cookie), data]

    def _read_structured(self, flags, cookie, offset, length, payload):
        if flags & nbd.CMD_FLAG_DF:
            data = self.engine.pread(length, offset)
            if len(data) != length:
                raise EngineError(errno.EIO, "short read from the disk")
            return [nbd.offset_data_header(cookie, offset, length, True),
                    data]
        pieces = self.engine.pread_sparse(length, offset)
        zero_copy = self.channel.zero_copy
        bounds = [start for start, _ in pieces] + [offset + length]
        if bounds[0] != offset or any(
                a > b for a, b in zip(bounds, bounds[1:])):
            raise EngineError(errno.EIO, "disk returned misplaced pieces")
        runs = [(start, bounds[index + 1] - start, data)
                for index, (start, data) in enumerate(pieces)
                if bounds[index + 1] > start]
        reply = []
        last = len(runs) - 1
        for index, (start, size, data) in enumerate(runs):
            done = index == last
            if data is None:
                reply.append(nbd.offset_hole_chunk(cookie, start, size, done))
                continue
            if len(data) != size:
                raise EngineError(errno.EIO, "short read from the disk")
            if not zero_copy:
                data = in_memory(data)
            reply.append(nbd.offset_data_header(cookie, start, size, done))
            reply.append(data)
        return reply

    def _write_buffer(self, length):
        """A buffer for a write payload: a spare one of the right size if
        the engine gave one back, which spares allocating and zeroing."""
        spares = self._spare_write_buffers
        if spares:
            try:
                spare = spares.pop()
            except IndexError:
                pass  # another thread took the last one
            else:
                if len(spare) == length:
                    return spare
        return bytearray(length)

    def _write(self, flags, cookie, offset, length, payload):
        fua = flags & nbd.CMD_FLAG_FUA
        self.engine.pwrite(payload, offset, bool(fua) and
                           self.fua_mode == FUA_NATIVE)
        if not self.engine.keeps_write_buffers and \
                len(self._spare_write_buffers) < _SPARE_WRITE_BUFFERS:
            self._spare_write_buffers.append(payload)
        self._emulate_fua(fua)
        return [nbd.simple_reply(cookie)]

    def _emulate_fua(self, fua):
        if fua and self.fua_mode == FUA_EMULATE:
            self.engine.flush()

    def _flush(self, flags, cookie, offset, length, payload):
        self.engine.flush()
        return [nbd.simple_reply(cookie)]

    def _trim(self, flags, cookie, offset, length, payload):
        fua = flags & nbd.CMD_FLAG_FUA
        self.engine.trim(length, offset,
                         bool(fua) and self.fua_mode == FUA_NATIVE)
        self._emulate_fua(fua)
        return [nbd.simple_reply(cookie)]

    def _cache(self, flags, cookie, offset, length, payload):
        self.engine.cache(length, offset)
        return [nbd.simple_reply(cookie)]

    def _zero(self, flags, cookie, offset, length, payload):
        if flags & nbd.CMD_FLAG_FAST_ZERO and not self.fast_zero:
            return [nbd.simple_reply(cookie, nbd.NBD_ENOTSUP)]
        fua = flags & nbd.CMD_FLAG_FUA
        self.engine.zero(length, offset,
                         may_trim=not flags & nbd.CMD_FLAG_NO_HOLE,
                         fua=bool(fua) and self.fua_mode == FUA_NATIVE)
        self._emulate_fua(fua)
        return [nbd.simple_reply(cookie)]

    def _block_status(self, flags, cookie, offset, length, payload):
        req_one = bool(flags & nbd.CMD_FLAG_REQ_ONE)
        if self.extents_known:
            extents = nbd.normalize_extents(
                self.engine.extents(length, offset, req_one), offset,
                length, req_one)
            if not extents:
                raise EngineError(errno.EIO, "disk returned no extents")
        else:
            extents = [(length, 0)]  # all data, as nbdkit reports
        return [nbd.block_status_chunk(cookie, self.context_id, extents)]


# ---------------------------------------------------------------------------
# listening


class _ThreadPerConnectionMixIn(object):
    """socketserver's ThreadingMixIn, but the threads are tracked by our
    Server so shutdown can wait for them (3.6's mixin forgets them)."""

    nbd_server = None

    def process_request(self, request, client_address):
        self.nbd_server._spawn(self._serve_one, request, client_address)

    def _serve_one(self, request, client_address):
        try:
            self.finish_request(request, client_address)
        except Exception as exc:
            log.error("connection failed: %s", exc)
        finally:
            self.shutdown_request(request)


class _UnixListener(_ThreadPerConnectionMixIn, socketserver.UnixStreamServer):
    pass


class _TcpListener(_ThreadPerConnectionMixIn, socketserver.TCPServer):
    pass


class _NbdHandler(socketserver.BaseRequestHandler):
    def handle(self):
        sock = self.request
        sock.setblocking(True)
        _enlarge_send_buffer(sock)
        nbd_server = self.server.nbd_server
        peer = "connection %d (%s)" % (nbd_server._next_connection_number(),
                                       self.client_address or "unix socket")
        _Connection(nbd_server, _SocketChannel(sock), peer).run()


def _listener_for(sock):
    """Wrap an already bound and listening socket in a socketserver."""
    cls = _UnixListener if sock.family == socket.AF_UNIX else _TcpListener
    listener = cls(sock.getsockname(), _NbdHandler, bind_and_activate=False)
    listener.socket.close()
    listener.socket = sock
    return listener


class Server(object):
    """Serves one Backend on listening sockets or on stdin/stdout."""

    # How long shutdown waits for connections to finish their requests
    # before cutting their sockets: a client that never reads its replies
    # would otherwise block our sends, and the shutdown, forever.
    shutdown_grace = 10.0

    def __init__(self, backend, settings):
        self.backend = backend
        self.settings = settings
        self._stopping = False
        self._stop_read, self._stop_write = os.pipe()
        os.set_blocking(self._stop_write, False)
        self._lock = threading.Lock()
        self._connections = set()
        self._threads = set()
        self._connection_numbers = itertools.count(1)

    def shutdown(self):
        """Stop serving.  Signal-safe: no locks, one non-blocking write."""
        self._stopping = True
        try:
            os.write(self._stop_write, b"!")
        except OSError:
            pass  # pipe full: already signalled

    # -- bookkeeping shared by connection threads --
    def _register(self, connection):
        with self._lock:
            if self._stopping:
                return False
            self._connections.add(connection)
            return True

    def _unregister(self, connection):
        with self._lock:
            self._connections.discard(connection)

    def _spawn(self, target, *args):
        def run():
            try:
                target(*args)
            finally:
                with self._lock:
                    self._threads.discard(thread)
        thread = threading.Thread(target=run, name="nbd-connection")
        thread.daemon = True
        with self._lock:
            self._threads.add(thread)
        thread.start()
        return thread

    def _next_connection_number(self):
        with self._lock:
            return next(self._connection_numbers)

    def _stop_connections(self, how="stop_reading"):
        with self._lock:
            connections = list(self._connections)
        for connection in connections:
            getattr(connection, how)()

    def _finish_connections(self):
        """Stop reading from every client, let in-flight requests finish,
        and wait for the connection threads."""
        self._stopping = True
        self._stop_connections()
        grace = self.shutdown_grace
        deadline = monotonic() + grace
        aborted = False
        while True:
            with self._lock:
                threads = list(self._threads)
            if not threads:
                return
            for thread in threads:
                thread.join(None if aborted
                            else max(0.0, deadline - monotonic()))
            if not aborted and monotonic() >= deadline:
                log.warning("cutting off clients still busy after %g "
                            "seconds", grace)
                self._stop_connections("abort")
                aborted = True

    # -- entry points --
    def serve_forever(self, listen_sockets):
        listeners = [_listener_for(sock) for sock in listen_sockets]
        selector = selectors.DefaultSelector()
        try:
            for listener in listeners:
                listener.nbd_server = self
                listener.socket.setblocking(False)
                selector.register(listener.socket, selectors.EVENT_READ,
                                  listener)
            selector.register(self._stop_read, selectors.EVENT_READ, None)
            while not self._stopping:
                for key, _ in selector.select(_SIGNAL_POLL_SECONDS):
                    if key.data is not None and not self._stopping:
                        key.data._handle_request_noblock()
        finally:
            selector.close()
            self._finish_connections()

    def serve_connection(self, rfile_fd=0, wfile_fd=1):
        channel = _stdio_channel(rfile_fd, wfile_fd, self._stop_read)
        connection = _Connection(self, channel, "stdio")
        done_read, done_write = os.pipe()
        try:
            def run():
                try:
                    connection.run()
                finally:
                    os.write(done_write, b"!")
            self._spawn(run)
            while not self._stopping:
                ready, _, _ = select.select([self._stop_read, done_read],
                                            [], [], _SIGNAL_POLL_SECONDS)
                if done_read in ready:
                    break
            self._finish_connections()
        finally:
            os.close(done_read)
            os.close(done_write)
