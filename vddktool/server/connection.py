"""One client connection: negotiation on the sans-IO handshake, then the
engine handed to a dispatcher for the transmission phase."""

import errno
import threading

from .. import log
from .. import protocol as nbd
from ..protocol import CMD_DISC, CMD_WRITE, Request, validate_request
from ..buffers import BufferPool
from ..engine import MAX_REQUEST_SIZE, PARALLEL, EngineError
from ..layers import SerializedEngine
from .channels import FileSendError
from .commands import SMALL_FILE_RANGE, Commands, Written
from .splice import FileWriteFailed
from .dispatch import AsyncWindow, LeaderFollowers
from .limits import NegotiationExpired

# How long one request may run before another thread takes over reading
# the next ones (see LeaderFollowers).
WORKER_PATIENCE_SECONDS = 0.005

# Writes at least this large may be moved from the socket into the disk
# file with splice(2); below it, the copy through Python costs less than
# the extra system calls.
SPLICED_WRITE = 64 * 1024

# An engine that submits may have this many requests in flight per -t
# thread: in flight they cost memory, not threads.
ASYNC_REQUESTS_PER_THREAD = 4
# ... and this many bytes per -t thread (one request always fits).
ASYNC_BYTES_PER_THREAD = 4 * 1024 * 1024


class Disconnect(Exception):
    """The connection cannot continue (protocol violation, client gone)."""


class Connection(object):
    def __init__(self, server, channel, peer):
        self.server = server
        self.backend = server.backend
        self.settings = server.settings
        self.channel = channel
        self.peer = peer
        self.debugging = log.verbose()
        # A line per request, unless -D nbdkit.backend.datapath=0.
        self.datapath_debugging = log.datapath_debug()
        self._write_lock = threading.Lock()
        self._broken = False

    # -- plumbing --
    def send(self, buffers):
        """Send one or more whole replies; safe from any thread.  Once
        the client is gone, replies are dropped."""
        with self._write_lock:
            if self._broken:
                return
            try:
                self.channel.send(buffers)
            except FileSendError as exc:
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
        if not self.server.register(self):
            self.channel.close()
            return
        try:
            if self.debugging:
                log.debug("%s: new connection", self.peer)
            # Filters may refuse the client before the handshake (limit).
            self.backend.preconnect(self.settings.readonly)
            ready, engine = self._negotiate()
            if ready is not None:
                self._transmit(ready, engine)
        except (OSError, nbd.ProtocolError, Disconnect,
                NegotiationExpired) as exc:
            if self.debugging:
                log.debug("%s: connection ends: %s", self.peer, exc)
        except EngineError as exc:
            log.error("%s: %s", self.peer, exc)
        finally:
            if engine is not None:
                self._close_engine(engine)
            self.channel.close()
            self.server.unregister(self)
            if self.debugging:
                log.debug("%s: closed", self.peer)

    # -- negotiation --
    def _negotiate(self):
        """Run the handshake, within the handshake limit.  Returns
        (Ready, engine) or (None, None)."""
        ready, engine = None, None
        try:
            with self.server.watchdog.watch(self) as timer:
                ready, engine = self._haggle(timer)
        except NegotiationExpired:
            if engine is not None:
                self._close_engine(engine)
            raise
        return ready, engine

    def negotiation_expired(self, report):
        """The watchdog's call, from its thread: cut the channel, which
        ends any read or send the connection's thread is blocked in.
        ``report``: None to stay quiet, else how many others were cut
        without a word since the last message."""
        if report is not None:
            log.warning("%s: still negotiating after %g seconds (see "
                        "--handshake-limit): disconnecting%s", self.peer,
                        self.settings.handshake_limit,
                        " (and %d other clients since the last such "
                        "message)" % report if report else "")
        self.channel.abort()

    def _haggle(self, timer):
        """The options, one by one, until an export is chosen.  Only the
        client's time counts against the limit: ``timer`` is paused while
        the backend works (a remote disk may take long to open)."""
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
                result, engine = self._answer_export(handshake, event, timer)
                if isinstance(result, nbd.Ready):
                    return result, engine
            elif isinstance(event, nbd.ListRequest):
                with timer.paused():
                    exports = self.backend.list_exports(self.channel.is_tls)
                handshake.answer_list(exports)
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
        context = self.settings.tls_context
        if context is None:
            handshake.refuse_tls("TLS is not configured on this server")
            return
        # Imported here: a server without TLS never loads ssl.
        from .tls_channel import TlsChannel, TlsHandshakeError
        handshake.accept_tls()
        self._flush_handshake(handshake)
        # Bytes the client sent past STARTTLS, and those the socket
        # channel read ahead, are the start of the TLS handshake.
        channel = TlsChannel(self.channel, context, handshake.trailing_data)
        try:
            channel.handshake()
        except TlsHandshakeError as exc:
            log.warning("%s: TLS handshake failed: %s", self.peer, exc)
            raise Disconnect("TLS handshake failed")
        self.channel = channel
        handshake.tls_started()
        if self.debugging:
            log.debug("%s: TLS started: %s", self.peer, channel.describe())

    def _answer_export(self, handshake, request, timer):
        if self.debugging:
            log.debug("%s: %s export %r", self.peer,
                      nbd.OPTION_NAMES[request.option], request.name)
        name = request.name or self.settings.export_name
        with timer.paused():
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
            raise Disconnect(result.reason)
        return result, engine if keep else None

    def _open_engine(self, name):
        try:
            engine = self.backend.open_engine(name, self.settings.readonly,
                                              self.channel.is_tls)
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
        context_id = (nbd.BASE_ALLOCATION_ID
                      if nbd.BASE_ALLOCATION_ID in ready.meta_contexts
                      else None)
        self.limits = nbd.Limits(export.size, export.flags,
                                 export.block_size, ready.structured,
                                 context_id is not None)
        self.structured = ready.structured
        self.engine = engine
        # Only where the channel can take a payload into a file itself,
        # and never on the asynchronous path (its writes are submitted).
        self.receive_into_file = None if engine.can_submit() else getattr(
            self.channel, "receive_into_file", None)
        threads = self.settings.threads
        self.buffers = BufferPool(
            max(4, threads * ASYNC_REQUESTS_PER_THREAD)
            if engine.can_submit() else 4)
        self.header = memoryview(bytearray(nbd.REQUEST_SIZE))
        commands = Commands(engine, self.peer, ready.structured, context_id,
                            self.channel.zero_copy, self.buffers)
        if self.debugging:
            log.debug("%s: serving %r: size %d, flags 0x%x, structured %s, "
                      "%s", self.peer, export.name, export.size,
                      export.flags, ready.structured,
                      "asynchronous" if engine.can_submit() else
                      "synchronous")
        # Each returns at DISC, end of stream or shutdown, once every
        # request in flight has been answered.
        if engine.can_submit():
            AsyncWindow(self.next_request, commands, self.send,
                        self.stop_reading,
                        threads * ASYNC_REQUESTS_PER_THREAD,
                        max(threads * ASYNC_BYTES_PER_THREAD,
                            MAX_REQUEST_SIZE)).run()
        else:
            LeaderFollowers(self.next_request, commands.execute, self.send,
                            threads, WORKER_PATIENCE_SECONDS,
                            self.small_read_ahead,
                            engine.is_latency_bound()).run()
        # A client that leaves flushes if it cares (nbdkit does not flush
        # for it, and an fdatasync per disconnect costs seconds); a server
        # shutdown cuts clients off, so it flushes on their behalf.
        if self.server.stopping and not export.flags & nbd.TFLAG_READ_ONLY \
                and export.flags & nbd.TFLAG_SEND_FLUSH:
            try:
                engine.flush()
            except Exception as exc:
                log.error("flush at disconnect: %s", exc)

    def _write_into_file(self, request):
        """Written when the payload went straight into the disk file,
        False when the client hung up meanwhile, None to receive it as
        usual."""
        length = request.length
        if self.receive_into_file is None or length < SPLICED_WRITE or \
                request.flags & nbd.CMD_FLAG_FUA:
            return None
        target = self.engine.write_target(length, request.offset)
        if target is None:
            return None
        try:
            moved = self.receive_into_file(target[0], target[1], length)
        except FileWriteFailed as exc:
            return Written(EngineError(exc.errno, "writing the disk: %s"
                                       % exc))
        if moved is None:
            self.receive_into_file = None   # this socket cannot
            return None
        return Written() if moved else False

    def small_read_ahead(self):
        """Whether the next request has already arrived and is a valid
        READ of less than SMALL_FILE_RANGE bytes: reading it cannot block
        (an invalid one would be answered and the next one awaited, with
        the corked replies held back)."""
        header = self.channel.buffered(nbd.REQUEST_SIZE)
        if header is None:
            return False
        command, length = nbd.peek_command_and_length(header)
        if command != nbd.CMD_READ or length >= SMALL_FILE_RANGE:
            return False
        try:
            flags, command, _, offset, length = nbd.decode_request(header)
        except nbd.ProtocolError:
            return False
        return not nbd.validate_request(command, flags, offset, length,
                                        self.limits)

    def next_request(self, admit=None):
        """The next valid request, or None when the connection ends.
        Invalid requests are answered here.  ``admit(request)``, when
        given, runs after a valid request's header, before its payload
        is read (it may wait for room)."""
        header = self.header
        read_into = self.channel.read_into
        while True:
            if not read_into(header):
                return None
            try:
                request = Request(header)
            except nbd.ProtocolError as exc:
                log.error("%s: %s: disconnecting", self.peer, exc)
                return None
            command, length = request.command, request.length
            if self.datapath_debugging:
                log.debug("%s: %s flags 0x%x offset %d length %d cookie %d",
                          self.peer, request.name, request.flags,
                          request.offset, length, request.cookie)
            if command == CMD_WRITE:
                if length > MAX_REQUEST_SIZE:
                    # Its payload cannot be skipped without reading
                    # whatever the client claims: refuse and hang up.
                    self.send(nbd.error_reply(request, nbd.NBD_EINVAL, "",
                                              self.structured))
                    return None
            elif command == CMD_DISC:
                return None
            error = validate_request(command, request.flags,
                                     request.offset, length, self.limits)
            if error:
                if command == CMD_WRITE and length and not read_into(
                        memoryview(self.buffers.get(length))):
                    return None     # the payload of a refused write
                self.send(nbd.error_reply(request, error, "",
                                          self.structured))
                continue
            if admit is not None:
                admit(request)
            if command == CMD_WRITE:
                # Written (it went straight into the file), or a buffer.
                payload = self._write_into_file(request)
                if payload is None:
                    payload = self.buffers.get(length)
                    if length and not read_into(memoryview(payload)):
                        return None
                elif payload is False:
                    return None
                request.payload = payload
            return request
