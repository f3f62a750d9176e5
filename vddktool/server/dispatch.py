"""Dispatchers: how one connection's requests reach its engine.

``LeaderFollowers`` serves engines that answer each call before
returning: the connection's own thread reads, executes and replies, and
more threads join in only while the disk is slow.  ``AsyncWindow`` serves
engines that can submit a request and be told later (VDDK's ReadAsync
and WriteAsync): the connection's thread keeps reading and submitting,
up to a window of requests and bytes in flight, while a sender thread
encodes completions and sends them in the order they complete.
"""

import functools
import queue
import threading
from time import monotonic

from .. import protocol as nbd
from ..engine import CompletionQueue


class LeaderFollowers(object):
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
    waiting ``patience`` first.  An ``eager`` loop (an engine that is
    latency-bound) does so from the first request.

    Time spent sending never counts: a leader blocked on the socket means
    the client is the bottleneck, which more threads would not help.

    ``read()`` returns the next request or None at the end of the stream;
    ``execute(request)`` returns what ``deliver`` sends.

    Replies are corked: while ``cheap_ahead()`` says the next request
    has already arrived and is quick to serve (a small read), the leader
    keeps its reply and sends it with the next ones, in one system call
    (the reply that would take the corked bytes past CORK_BYTES goes out
    with them).  A client with 64 small reads in flight then gets
    its replies in a few sends instead of 64.
    """

    CORK_BYTES = 256 * 1024

    # Once the connection has been quiet this long, the standby stops
    # napping: a spawned one leaves (an idle client then costs only the
    # thread blocked reading it), the connection's own thread sleeps
    # until the leader next starts a request.
    QUIET_SECONDS = 1.0
    # The share of stalls among recent requests (a moving average, each
    # request weighing STALL_WEIGHT) above which the disk counts as slow.
    SLOW_STALL_SHARE = 0.25
    STALL_WEIGHT = 0.125
    # The standby's naps grow to this many patiences while nothing stalls.
    LONGEST_NAP = 8

    def __init__(self, read, execute, deliver, size, patience,
                 cheap_ahead=lambda: False, eager=False):
        self._read = read
        self._execute = execute
        self._deliver = deliver
        self._cheap_ahead = cheap_ahead
        self._eager = eager
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
        while self._follow(me, counted, spawned):
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
        cheap_ahead = self._cheap_ahead
        lock = self._lock
        patience = self._patience
        slow_share = self.SLOW_STALL_SHARE
        weight = self.STALL_WEIGHT
        corked = []
        corked_bytes = 0
        while True:
            request = read()
            with lock:
                if request is None:
                    self._end()
                    if corked:
                        deliver(corked)
                    return
                started = self._last_request = monotonic()
                if self._eager or self._stall_share >= slow_share:
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
                    # _note, inlined: this runs once per request.
                    stalled = monotonic() - started >= patience
                    self._stall_share += weight * (stalled -
                                                   self._stall_share)
            if not replaced and corked_bytes < self.CORK_BYTES and \
                    cheap_ahead():
                size = sum(len(buffer) for buffer in reply)
                if corked_bytes + size <= self.CORK_BYTES:
                    corked += reply
                    corked_bytes += size
                    continue
            if corked:
                reply = corked + reply
                corked = []
                corked_bytes = 0
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

    def _follow(self, me, counted, may_retire):
        """Wait until this thread should lead; False when serving ends,
        or when this spawned thread retires from a quiet connection."""
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
                        verdict = self._stand_by(may_retire)
                        if verdict is _TAKE_OVER:
                            self._standby = None
                            self._leader = me
                            return True
                        if verdict is _RETIRE:
                            self._standby = None
                            self._threads.remove(me)
                            return False
                        continue
                    self._changed.wait()
                if self._standby is me:
                    self._standby = None
                return False
            finally:
                self._waiting -= 1

    def _stand_by(self, may_retire):
        """One nap of the standby: _TAKE_OVER, _RETIRE, or None to nap
        again."""
        now = monotonic()
        remaining = 0.0
        if self._busy_since is not None:
            remaining = self._patience - (now - self._busy_since)
            if remaining <= 0:
                self._busy_since = None
                self._note(True)
                self._nap = self._patience
                return _TAKE_OVER
        elif now - self._last_request >= self.QUIET_SECONDS:
            if may_retire:
                return _RETIRE
            self._standby_asleep = True
            self._changed.wait()
            self._standby_asleep = False
            return None
        # Each nap wakes a thread, which under the GIL costs the leader
        # too: while nothing stalls, the naps grow (a stall is then seen
        # a little late, and the disk deemed slow from then on).
        self._changed.wait(max(remaining, self._nap))
        self._nap = min(2 * self._nap, self.LONGEST_NAP * self._patience)
        return None


# What a standby's nap ends in (see LeaderFollowers._stand_by).
_TAKE_OVER = "take over"
_RETIRE = "retire"


class AsyncWindow(object):
    """Runs one connection's requests on an engine that can submit.

    The connection's thread reads requests (``read(admit)``) and submits
    READs and WRITEs without waiting for them; ``admit(request)`` is
    called between a request's header and its payload, and waits there
    while the window is full: no more than ``max_requests`` requests and
    ``max_bytes`` bytes in flight (one request always fits), which also
    bounds the memory held by payloads and read buffers.

    Completions may arrive on any thread (VDDK's own): they only go into
    the connection's completion queue, which wakes the sender thread; it
    encodes the replies of whatever has completed and sends them in one
    go, then frees their room in the window.  A completion thread never
    touches the socket, so one slow client cannot hold up the library's
    other callbacks.  The engine is offered the queue itself
    (``Engine.complete_on``): what it puts there is finished on the
    sender thread, so a library's callback need do no more than queue.
    The sender starts with the first request submitted and leaves once
    nothing has been in flight for QUIET_SECONDS, so an idle client
    costs only the thread reading it.

    Other commands (and long zeroes) run on the reading thread,
    synchronously, as they come.  A FLUSH, or any request with FUA, first
    waits until every request in flight has been answered: what the
    client had written before it is then on the disk too.
    ``send(buffers)`` must be safe to call from two threads at once.
    """

    QUIET_SECONDS = 1.0

    def __init__(self, read, commands, send, stop, max_requests, max_bytes):
        self._read = read
        self._commands = commands
        self._send = send
        self._stop = stop
        self._max_requests = max_requests
        self._max_bytes = max_bytes
        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)
        self._completed = CompletionQueue()
        self._requests = 0         # admitted, reply not yet sent
        self._bytes = 0
        self._admitted = None      # admitted, payload still being read
        self._waiting = 0          # threads waiting for room
        self._sender = None        # the sender thread, while there is one
        self._failure = None
        commands.engine.complete_on(self._completed.put)

    def run(self):
        """Serve until the end of the stream, then wait for every request
        in flight (buffers the engine writes into must outlive it)."""
        try:
            self._serve()
        finally:
            with self._lock:
                while self._requests:
                    self._wait_for_room()
                sender = self._sender
            if sender is not None:
                self._completed.put(_END)
                sender.join()
        if self._failure is not None:
            raise self._failure

    def _serve(self):
        read, send = self._read, self._send
        submit, execute = self._commands.submit, self._commands.execute
        complete = self._complete
        while True:
            request = read(self._admit)
            admitted, self._admitted = self._admitted, None
            if request is None:
                if admitted is not None:
                    # Its payload never came: give its room back.
                    self._release(1, admitted.length)
                return
            if admitted is request:     # _admit took it in the window
                submit(request, functools.partial(complete, request))
            else:
                send(execute(request))

    def _admit(self, request):
        with self._lock:
            if _submitted(request):
                size = request.length
                while self._requests and (
                        self._requests >= self._max_requests or
                        self._bytes + size > self._max_bytes):
                    self._wait_for_room()
                self._requests += 1
                self._bytes += size
                self._admitted = request
                if self._sender is None:
                    self._sender = threading.Thread(
                        target=self._send_completions, name="nbd-sender")
                    self._sender.daemon = True
                    self._sender.start()
            elif request.command == nbd.CMD_FLUSH or \
                    request.flags & nbd.CMD_FLAG_FUA:
                while self._requests:
                    self._wait_for_room()

    def _wait_for_room(self):
        # With the lock held.  Counted, so that _release only notifies
        # when someone waits (most releases find nobody).
        self._waiting += 1
        try:
            self._room.wait()
        finally:
            self._waiting -= 1

    def _complete(self, request, error, data):
        # Called by the engine, on any thread: queue, no more.
        self._completed.put((request, error, data))

    def _next_batch(self):
        """The completions queued now (waiting for the first), with what
        engines queued to run here run first; None when the sender should
        leave."""
        completed = self._completed
        get = completed.get
        while True:
            try:
                item = get(True, self.QUIET_SECONDS)
                break
            except _Empty:
                with self._lock:
                    if not self._requests:
                        # Quiet: leave; the next submit starts another.
                        self._sender = None
                        return None
        # This thread alone takes from the queue, so a queue that is not
        # empty has an item for get(False); asking first spares the
        # raising of Empty that ends every batch otherwise.
        is_empty = completed.empty
        batch = []
        while item is not _END:
            if type(item) is tuple:
                batch.append(item)
            else:
                item.run()  # an engine's; it queues a tuple in turn
            if is_empty():
                return batch
            item = get(False)
        return batch or None

    def _send_completions(self):
        completed, sent = self._commands.completed, self._commands.sent
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            if not batch:
                continue    # a stray completion, already finished
            buffers = []
            try:
                for request, error, data in batch:
                    buffers += completed(request, error, data)
                self._send(buffers)
                del buffers
                for request, _, data in batch:
                    sent(request, data)
            except BaseException as exc:
                # A bug, not the client (send() copes with that): end the
                # connection, but keep freeing room so the reader can end.
                if self._failure is None:
                    self._failure = exc
                    self._stop()
            buffers = None
            self._release(len(batch),
                          sum(request.length for request, _, _ in batch))

    def _release(self, requests, size):
        with self._lock:
            self._requests -= requests
            self._bytes -= size
            if self._waiting:
                self._room.notify()


# Put last in the completion queue: the sender ends.
_END = object()

_Empty = queue.Empty


# The longest WRITE_ZEROES submitted: an engine that cannot zero writes
# zeros, all its pieces in flight together.  Longer ones run as they come.
MAX_SUBMITTED_ZERO = 16 * 1024 * 1024


def _submitted(request):
    """Whether AsyncWindow submits a request (the rest run as they come):
    READ, WRITE, and WRITE_ZEROES up to MAX_SUBMITTED_ZERO, unless they
    ask for FUA."""
    command = request.command
    if command == nbd.CMD_READ:
        return True
    if request.flags & nbd.CMD_FLAG_FUA:
        return False
    return command == nbd.CMD_WRITE or (
        command == nbd.CMD_WRITE_ZEROES and
        request.length <= MAX_SUBMITTED_ZERO)
