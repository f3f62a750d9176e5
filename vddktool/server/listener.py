"""Listening: the accept loop, the registry of live connections, and a
shutdown that a signal handler may start.

One thread per connection (socketserver's model, with threads we track
so shutdown can wait for them).  ``shutdown()`` only sets a flag and
writes a byte to a pipe that is never drained: the pipe then stays
readable, waking every select() that watches it, now or later.
"""

import itertools
import os
import select
import selectors
import socket
import socketserver
import threading
from time import monotonic

from .. import log
from ..engine import SHUTTING_DOWN
from .channels import SocketChannel, enlarge_send_buffer, stdio_channel
from .connection import Connection
from .limits import HandshakeWatchdog

# How long the main thread may sleep in select().  The kernel may deliver
# SIGTERM to any thread; Python then runs the handler only when the main
# thread next runs bytecode, so it must wake now and then to let it.
_SIGNAL_POLL_SECONDS = 0.5

# When connections are refused for being too many, say so at most this
# often: a flood must not flood the log too.
_REFUSAL_LOG_SECONDS = 60.0


class ServerSettings(object):
    """Server-wide options: -r, -e, -t, --tls and the limits.

    ``tls_context``: the ssl.SSLContext STARTTLS upgrades with (tls.py
    makes it; without one STARTTLS is refused).  ``handshake_limit``:
    seconds a client may take to negotiate; ``max_connections``: clients
    served at once.  0 means no limit (the command line's defaults are in
    exposure.py)."""

    def __init__(self, readonly=False, export_name="", threads=16,
                 tls="off", tls_context=None, handshake_limit=0,
                 max_connections=0):
        self.readonly = readonly
        self.export_name = export_name
        self.threads = max(1, int(threads))
        self.tls = tls
        self.tls_context = tls_context
        self.handshake_limit = handshake_limit
        self.max_connections = max_connections


class _ThreadPerConnectionMixIn(object):
    """socketserver's ThreadingMixIn, but the threads are tracked by our
    Server so shutdown can wait for them (3.6's mixin forgets them)."""

    nbd_server = None

    def verify_request(self, request, client_address):
        # Refused here, in the accept loop: a refusal costs no thread.
        return self.nbd_server._admit()

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
        enlarge_send_buffer(sock)
        nbd_server = self.server.nbd_server
        peer = "connection %d (%s)" % (nbd_server._next_connection_number(),
                                       self.client_address or "unix socket")
        Connection(nbd_server, SocketChannel(sock), peer).run()


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
        self.stopping = False
        self._stop_read, self._stop_write = os.pipe()
        os.set_blocking(self._stop_write, False)
        self._lock = threading.Lock()
        self._connections = set()
        self._threads = set()
        self._connection_numbers = itertools.count(1)
        self.watchdog = HandshakeWatchdog(settings.handshake_limit)
        self._refused = 0
        self._refusal_logged = None

    def shutdown(self):
        """Stop serving.  Signal-safe: no locks, one non-blocking write."""
        self.stopping = True
        try:
            os.write(self._stop_write, b"!")
        except OSError:
            pass  # pipe full: already signalled

    # -- bookkeeping shared by connection threads --
    def register(self, connection):
        with self._lock:
            if self.stopping:
                return False
            self._connections.add(connection)
            return True

    def unregister(self, connection):
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

    def _admit(self):
        """May one more client connect?  Each connection has one tracked
        thread (its own), so those are what is counted."""
        limit = self.settings.max_connections
        with self._lock:
            if not limit or len(self._threads) < limit:
                return True
            self._refused += 1
            now = monotonic()
            if self._refusal_logged is not None and \
                    now - self._refusal_logged < _REFUSAL_LOG_SECONDS:
                return False
            self._refusal_logged = now
            refused, self._refused = self._refused, 0
        log.warning("%d clients are connected (the most --max-connections "
                    "allows): refused %d more", limit, refused)
        return False

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
        self.stopping = True
        SHUTTING_DOWN.set()
        self.watchdog.stop()
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
            while not self.stopping:
                for key, _ in selector.select(_SIGNAL_POLL_SECONDS):
                    if key.data is not None and not self.stopping:
                        key.data._handle_request_noblock()
        finally:
            selector.close()
            self._finish_connections()

    def serve_connection(self, rfile_fd=0, wfile_fd=1):
        channel = stdio_channel(rfile_fd, wfile_fd, self._stop_read)
        connection = Connection(self, channel, "stdio")
        done_read, done_write = os.pipe()
        try:
            def run():
                try:
                    connection.run()
                finally:
                    os.write(done_write, b"!")
            self._spawn(run)
            while not self.stopping:
                ready, _, _ = select.select([self._stop_read, done_read],
                                            [], [], _SIGNAL_POLL_SECONDS)
                if done_read in ready:
                    break
            self._finish_connections()
        finally:
            os.close(done_read)
            os.close(done_write)
