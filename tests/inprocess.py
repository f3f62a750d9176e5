"""Run vddktool's Server inside the test process, on a Unix socket, for
tests whose engine is a Python class defined in the test itself."""

import contextlib
import socket
import threading

from vddktool.engine import SHUTTING_DOWN
from vddktool.server import Server, ServerSettings


@contextlib.contextmanager
def serving(backend, tmp_path, **settings):
    """Serve ``backend`` for the with-block; yields the NBD URI."""
    sock_path = str(tmp_path / "inprocess.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(sock_path)
    listener.listen(4)
    server = Server(backend, ServerSettings(**settings))
    thread = threading.Thread(target=server.serve_forever, args=([listener],))
    thread.start()
    try:
        yield "nbd+unix:///?socket=" + sock_path
    finally:
        server.shutdown()
        thread.join(30)
        listener.close()
        # A stopping server tells every waiting filter so (a process-wide
        # flag, set for good in a real server): the next test starts anew.
        SHUTTING_DOWN.clear()
    assert not thread.is_alive(), "the server did not stop"
