#!/usr/bin/env python3
"""Fuzz vddktool: the sans-IO protocol module in this process, then a
live server (python3 -m vddktool on a Unix socket, TLS offered) over
real connections.  Reports crashes, hangs, and threads or descriptors
the server keeps once the clients have gone; exits 1 if any.

    python3 tools/fuzz.py [--protocol N] [--server N] [--seed S]
                          [--python EXE] [--workers W]

N counts inputs: client streams and request headers for the protocol
module; options, requests and raw blobs sent for the live server
(default 1000000 each).  What is sent: fuzz_cases.py.
"""

import argparse
import os
import random
import shutil
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import fuzz_cases as cases  # noqa: E402
from vddktool import engine as eng  # noqa: E402
from vddktool import protocol as nbd  # noqa: E402

# One input taking this long counts as a hang.
SLOW_INPUT_SECONDS = 2.0
# A handshake needing more steps than this loops.
MAX_STEPS = 10000
# The most a NeedData may ask for: an option header, or a whole payload.
MAX_READ = nbd.MAX_OPTION_LENGTH + nbd.OPTION_HEADER.size


class Findings(object):
    """Counts, and the first few examples of each kind of problem."""

    EXAMPLES = 3

    def __init__(self):
        self.inputs = 0
        self.sessions = 0
        self.problems = {}      # kind -> [count, [examples]]

    def add(self, kind, example):
        entry = self.problems.setdefault(kind, [0, []])
        entry[0] += 1
        if len(entry[1]) < self.EXAMPLES:
            entry[1].append(example)

    def count(self, prefix):
        return sum(n for kind, (n, _) in self.problems.items()
                   if kind.startswith(prefix))

    def report(self, title, out=sys.stdout):
        out.write("%s: %d inputs in %d sessions; crashes %d, hangs %d, "
                  "leaks %d\n" % (title, self.inputs, self.sessions,
                                  self.count("crash"), self.count("hang"),
                                  self.count("leak")))
        for kind, (count, examples) in sorted(self.problems.items()):
            out.write("  %s: %d\n" % (kind, count))
            for example in examples:
                out.write("    %s\n" % example)

    @property
    def clean(self):
        return not self.problems


# ---------------------------------------------------------------------------
# the protocol module


EXPORT = nbd.ExportInfo("", 1 << 20, nbd.TFLAG_HAS_FLAGS | nbd.TFLAG_SEND_FUA
                        | nbd.TFLAG_SEND_FLUSH, (512, 4096, 1 << 25),
                        "the disk")


def cut(rng, stream):
    pieces, pos = [], 0
    while pos < len(stream):
        step = rng.choice([1, 3, 16, 100, len(stream)])
        pieces.append(stream[pos:pos + step])
        pos += step
    return pieces


def check_framing(sent, encrypted_after_starttls=False):
    """The server's bytes: a greeting, option replies, and at the very
    end perhaps EXPORT_NAME's reply (or, on a real connection, TLS after
    STARTTLS's ACK).  Returns a problem or None."""
    if sent[:16] != nbd.GREETING.pack(nbd.NBDMAGIC, nbd.IHAVEOPT, 0)[:16]:
        return "bad greeting"
    pos = nbd.GREETING.size
    while pos < len(sent):
        if len(sent) - pos >= nbd.OPTION_REPLY_HEADER.size:
            magic, option, reply, length = \
                nbd.OPTION_REPLY_HEADER.unpack_from(sent, pos)
            if magic == nbd.OPTION_REPLY_MAGIC:
                pos += nbd.OPTION_REPLY_HEADER.size + length
                if encrypted_after_starttls and (option, reply) == (
                        nbd.OPT_STARTTLS, nbd.REP_ACK):
                    return None
                continue
        if len(sent) - pos in (nbd.EXPORT_NAME_REPLY.size,
                               nbd.EXPORT_NAME_REPLY.size + 124):
            return None
        return "unframed reply bytes at %d" % pos
    return None if pos == len(sent) else "reply overruns its length"


def drive_handshake(rng, stream, tls):
    """Run the machine the way the server does, deciding at random.
    Returns (bytes sent, Ready or None, problem or None)."""
    handshake = nbd.Handshake(tls)
    sent = [handshake.greeting()]
    pieces = cut(rng, stream)
    upgraded = False
    ready = None
    for _ in range(MAX_STEPS):
        event = handshake.next_event()
        sent.append(handshake.data_to_send())
        if isinstance(event, nbd.NeedData):
            if not 0 < event.count <= MAX_READ:
                return b"".join(sent), None, "asks for %d bytes" % event.count
            if not pieces:
                break
            handshake.receive_data(pieces.pop(0))
            continue
        if isinstance(event, nbd.Closed):
            break
        if tls == "require" and not upgraded and not isinstance(
                event, nbd.TlsRequest):
            return b"".join(sent), None, "asked about exports before TLS"
        if isinstance(event, nbd.ExportRequest):
            outcome = handshake.answer_export(
                EXPORT if rng.random() < 0.7 else None,
                rng.choice(["", "no such disk"]))
            if isinstance(outcome, nbd.Ready):
                ready = outcome
                break
            if isinstance(outcome, nbd.Closed):
                break
        elif isinstance(event, nbd.ListRequest):
            handshake.answer_list([("", "the disk"), ("é", None)][
                :rng.randint(0, 2)])
        elif rng.random() < 0.5:
            handshake.accept_tls()
            sent.append(handshake.data_to_send())
            early = handshake.trailing_data
            handshake.tls_started()
            upgraded = True
            if early:
                pieces.insert(0, early)
        else:
            handshake.refuse_tls()
    else:
        return b"".join(sent), None, "hang: %d steps" % MAX_STEPS
    sent.append(handshake.data_to_send())
    return b"".join(sent), ready, None


def fuzz_request_checks(rng, ready, findings):
    """Request headers (random and well formed) through decoding and
    validation, as the server checks them after GO."""
    export = ready.export
    limits = nbd.Limits(export.size, export.flags, export.block_size,
                        ready.structured, bool(ready.meta_contexts))
    for cookie in range(rng.randint(1, 20)):
        if rng.random() < 0.3:
            header = cases.rng_bytes(rng, nbd.REQUEST.size)
        else:
            command, flags, _, offset, length, _ = cases.request(
                rng, export.size, cookie)
            header = nbd.encode_request(command, cookie, offset, length,
                                        flags)
        findings.inputs += 1
        try:
            request = nbd.Request(header)
        except nbd.ProtocolError:
            continue
        error = nbd.validate_request(request.command, request.flags,
                                     request.offset, request.length, limits)
        if not error and (request.command in (nbd.CMD_READ, nbd.CMD_WRITE)
                          and request.length > nbd.MAX_REQUEST_SIZE):
            findings.add("crash: oversized request passed", repr(request))
        if not error and request.offset + request.length > export.size \
                and request.command not in (nbd.CMD_FLUSH, nbd.CMD_DISC):
            findings.add("crash: request past the end passed", repr(request))


def fuzz_extents(rng, findings):
    extents, position = [], rng.randint(0, 4096)
    for _ in range(rng.randint(0, 30)):
        length = rng.choice([0, 1, 512, rng.randint(0, 1 << 20)])
        extents.append(eng.Extent(position, length, rng.randint(0, 7)))
        position += length + rng.choice([0, 0, 0, 1])
    offset = rng.randint(0, position + 1)
    count = rng.randint(1, 1 << 21)
    req_one = rng.random() < 0.3
    findings.inputs += 1
    out = nbd.normalize_extents(extents, offset, count, req_one)
    if any(length <= 0 for length, _ in out) \
            or sum(length for length, _ in out) > count \
            or (req_one and len(out) > 1):
        findings.add("crash: extents a client would refuse",
                     repr((extents[:3], offset, count, req_one)))


def fuzz_protocol(count, seed, progress=None):
    rng = random.Random(seed)
    findings = Findings()
    last = time.monotonic()
    while findings.inputs < count:
        findings.sessions += 1
        tls = rng.choice(["off", "on", "require"])
        stream = cases.handshake_stream(rng)
        started = time.monotonic()
        findings.inputs += 1
        try:
            sent, ready, problem = drive_handshake(rng, stream, tls)
            if problem is None:
                problem = check_framing(sent)
            if problem is not None:
                kind = "hang" if problem.startswith("hang") else "crash"
                findings.add("%s: handshake %s" % (kind, problem),
                             "tls=%s %r" % (tls, stream[:80]))
            if ready is not None:
                fuzz_request_checks(rng, ready, findings)
            if rng.random() < 0.2:
                fuzz_extents(rng, findings)
        except nbd.ProtocolError:
            pass
        except Exception as exc:
            findings.add("crash: %s" % type(exc).__name__,
                         "%s: tls=%s %r" % (exc, tls, stream[:80]))
        if time.monotonic() - started > SLOW_INPUT_SECONDS:
            findings.add("hang: slow input", "tls=%s %r" % (tls, stream[:80]))
        if progress and time.monotonic() - last > 10:
            last = time.monotonic()
            progress("protocol: %d inputs" % findings.inputs)
    return findings


# ---------------------------------------------------------------------------
# the command line


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--protocol", type=int, default=1000000,
                        help="inputs for the protocol module (0: skip)")
    parser.add_argument("--server", type=int, default=1000000,
                        help="inputs for the live server (0: skip)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--python", default=sys.executable,
                        help="the Python that runs the server")
    parser.add_argument("--workers", type=int, default=4,
                        help="client threads against the live server")
    options = parser.parse_args(argv)

    def progress(text):
        sys.stderr.write(text + "\n")

    clean = True
    if options.protocol:
        started = time.monotonic()
        findings = fuzz_protocol(options.protocol, options.seed, progress)
        findings.report("protocol module (%.0f s)"
                        % (time.monotonic() - started))
        clean = clean and findings.clean
    if options.server:
        from fuzz_server import fuzz_server
        work = tempfile.mkdtemp(prefix="vddktool-fuzz-")
        try:
            started = time.monotonic()
            findings = fuzz_server(options.server, options.seed, work,
                                   options.python, options.workers,
                                   progress)
            findings.report("live server (%.0f s)"
                            % (time.monotonic() - started))
            clean = clean and findings.clean
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main())
