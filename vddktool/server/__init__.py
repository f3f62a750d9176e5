"""The NBD server around the sans-IO protocol package, split as nbdkit's
server/ is:

* ``listener``: accept loop, registry of connections, shutdown.
* ``connection``: one client: negotiation, then transmission.
* ``dispatch``: how requests reach the engine (leader/followers for
  engines that answer at once, a window of submitted requests for those
  that complete later).
* ``commands``: requests run on the engine, replies built.
* ``channels``: how bytes move (sockets, pipes); ``tls_channel``: the
  same, encrypted, after STARTTLS.
* ``limits``: the handshake limit's watchdog.
"""

from .listener import Server, ServerSettings  # noqa: F401
