#!/usr/bin/env python3
"""Load: many concurrent connections, each on its own region of one disk,
mixing reads, writes (some with FUA), flushes, zeroes and block status,
with up to eight requests in flight; every read is checked against what
the connection wrote.  Afterwards one more connection reads the whole
disk back and compares every byte, and the server must be back to the
threads and descriptors it had before.

    python3 tools/load.py [--connections 100] [--seconds 60]
                          [--region-kib 1024] [--tls] [--python EXE]

Prints the operations done, errors, mismatches and thread/descriptor
counts; exits 1 on any problem.  tests/test_load.py runs it briefly.
"""

import argparse
import os
import random
import shutil
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from liveserver import LiveServer  # noqa: E402
from nbdclient import (STATE_ZERO, NbdClient, client_context)  # noqa: E402
from vddktool import protocol as nbd  # noqa: E402

CHUNK = 64 * 1024       # requests touch whole chunks of a region
OPERATIONS = ("read", "read", "write", "write", "write-fua", "zero",
              "zero-no-hole", "flush", "block-status")


class Region(object):
    """One connection's part of the disk and what it must hold."""

    def __init__(self, offset, size):
        self.offset = offset
        self.model = bytearray(size)


class Tally(object):
    def __init__(self):
        self.lock = threading.Lock()
        self.operations = {}
        self.problems = []

    def done(self, operation):
        with self.lock:
            self.operations[operation] = self.operations.get(operation,
                                                             0) + 1

    def problem(self, text):
        with self.lock:
            if len(self.problems) < 20:
                self.problems.append(text)


def _chunks(rng, region, count):
    """``count`` distinct chunks of the region: requests in flight at
    once never overlap, so their order cannot matter."""
    total = len(region.model) // CHUNK
    return rng.sample(range(total), min(count, total))


def _submit(rng, client, region, chunk, tally):
    """Send one request on ``chunk``; returns what to check on reply."""
    operation = rng.choice(OPERATIONS)
    start = chunk * CHUNK
    offset = region.offset + start
    length = rng.choice([512, 4096, CHUNK])
    if operation == "flush":
        client.submit(nbd.CMD_FLUSH, 0, 0)
    elif operation == "read":
        client.submit(nbd.CMD_READ, offset, length)
    elif operation.startswith("write"):
        data = os.urandom(length)
        flags = nbd.CMD_FLAG_FUA if operation == "write-fua" else 0
        client.submit(nbd.CMD_WRITE, offset, length, flags, data)
        region.model[start:start + length] = data
    elif operation.startswith("zero"):
        flags = 0 if operation == "zero" else nbd.CMD_FLAG_NO_HOLE
        client.submit(nbd.CMD_WRITE_ZEROES, offset, length, flags)
        region.model[start:start + length] = bytes(length)
    else:
        client.submit(nbd.CMD_BLOCK_STATUS, offset, length)
    return operation, start, length


def _check(reply, expectation, region, tally):
    operation, start, length = expectation
    if reply.error:
        tally.problem("%s at %d: errno %d" % (operation, start, reply.error))
        return
    if operation == "read":
        if reply.data != bytes(region.model[start:start + length]):
            tally.problem("read at %d: data differs" % (region.offset +
                                                        start))
    elif operation == "block-status":
        position = start
        for extent_length, flags in reply.extents:
            if flags & STATE_ZERO and any(
                    region.model[position:position + extent_length]):
                tally.problem("block status at %d calls data zero"
                              % (region.offset + position))
            position += extent_length
        if not reply.extents or position - start > length:
            tally.problem("block status at %d: %r" % (region.offset + start,
                                                      reply.extents))
    tally.done(operation)


def _connect(target, context):
    client = NbdClient.unix(target)
    client.greet()
    if context is not None:
        client.starttls(context)
    client.go()
    return client


def work_on(target, region, rng, until, tally, context):
    """One connection's life: batches of requests until ``until`` says
    stop, then FLUSH and DISC."""
    client = _connect(target, context)
    try:
        while not until():
            batch = {}
            for chunk in _chunks(rng, region, rng.randint(1, 8)):
                cookie = client._next_cookie
                batch[cookie] = _submit(rng, client, region, chunk, tally)
            for _ in range(len(batch)):
                reply = client.receive()
                _check(reply, batch.pop(reply.cookie), region, tally)
        reply = client.call(nbd.CMD_FLUSH, 0, 0)
        if reply.error:
            tally.problem("final flush: errno %d" % reply.error)
        client.disconnect()
        if not client.at_eof():
            tally.problem("the server did not hang up after DISC")
    except Exception as exc:
        tally.problem("connection at %d: %r" % (region.offset, exc))
    finally:
        client.close()


def verify(target, regions, context):
    """Read the whole of every region back on a fresh connection."""
    client = _connect(target, context)
    mismatches = 0
    try:
        for region in regions:
            size = len(region.model)
            for start in range(0, size, 1 << 20):
                count = min(1 << 20, size - start)
                reply = client.pread(count, region.offset + start)
                if reply.error or reply.data != bytes(
                        region.model[start:start + count]):
                    mismatches += 1
        client.disconnect()
    finally:
        client.close()
    return mismatches


def run_load(target, connections, region_size, seed=1, seconds=None,
             batches=None, context=None):
    """Returns (tally, mismatches).  Stops after ``seconds``, or after
    ``batches`` batches per connection (for tests: no clock)."""
    regions = [Region(i * region_size, region_size)
               for i in range(connections)]
    tally = Tally()
    deadline = time.monotonic() + seconds if seconds else None

    def stopper():
        left = [batches]

        def until():
            if deadline is not None:
                return time.monotonic() >= deadline
            left[0] -= 1
            return left[0] < 0
        return until

    threads = [threading.Thread(target=work_on, args=(
        target, region, random.Random(seed * 100000 + n), stopper(), tally,
        context)) for n, region in enumerate(regions)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return tally, verify(target, regions, context)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--region-kib", type=int, default=1024)
    parser.add_argument("--tls", action="store_true")
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--seed", type=int, default=1)
    options = parser.parse_args(argv)
    region = options.region_kib * 1024
    work = tempfile.mkdtemp(prefix="vddktool-load-")
    try:
        args, context = [], None
        if options.tls:
            from testpki import PKI
            pki = PKI(os.path.join(work, "pki"))
            args = ["--tls=require", "--tls-certificates=" + pki.server]
            context = client_context(pki.client)
        server = LiveServer(work, options.python, args + [
            "--max-connections=%d" % (options.connections + 8),
            os.path.join(work, "disk.vmdk"), "create=true",
            "create-size=%d" % (region * options.connections)])
        try:
            quiet = warm_up(server, context)
            started = time.monotonic()
            tally, mismatches = run_load(server.sock, options.connections,
                                         region, options.seed,
                                         seconds=options.seconds,
                                         context=context)
            elapsed = time.monotonic() - started
            after = server.quiet_counts()
        finally:
            server.stop()
        total = sum(tally.operations.values())
        print("%d connections, %.0f s: %d operations (%s)" % (
            options.connections, elapsed, total, ", ".join(
                "%s %d" % item for item in sorted(tally.operations.items()))))
        print("problems: %d; regions read back wrong: %d" % (
            len(tally.problems), mismatches))
        for text in tally.problems:
            print("  " + text)
        print("threads, descriptors: %r before, %r after" % (quiet, after))
        bad = tally.problems or mismatches or after != quiet
        return 1 if bad else 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


def warm_up(server, context):
    """The server's counts when idle, after one whole connection."""
    client = _connect(server.sock, context)
    client.disconnect()
    client.at_eof()
    client.close()
    return server.quiet_counts()


if __name__ == "__main__":
    sys.exit(main())
