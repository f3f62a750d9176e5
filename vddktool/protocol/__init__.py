"""The NBD protocol without any I/O (the h11 approach).

Nothing in this package touches a socket or a thread, so every state and
every malformed input can be reached from a unit test: the server feeds
received bytes in, gets events out, answers the events that need a
decision (which export, which size) and sends the bytes it is given.
All integers on the wire are big-endian.

* ``wire``: numbers and structures the protocol fixes.
* ``options``: option replies, export facts, option payload decoders.
* ``handshake``: negotiation, as a state machine.
* ``transmission``: request checks, reply encoding.

Everything is re-exported here, so callers write ``protocol.CMD_READ``.
"""

from .wire import *          # noqa: F401,F403 (the package's namespace)
from .options import *       # noqa: F401,F403
from .handshake import *     # noqa: F401,F403
from .transmission import *  # noqa: F401,F403
