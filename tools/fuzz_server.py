"""The live half of tools/fuzz.py: sessions against a running vddktool.

Each session is one connection of one kind:

  noise        a handshake stream (valid, mutated or random) sent whole
               or in pieces, then the write side closed: the server must
               answer in well-framed replies and hang up
  tls-noise    STARTTLS, then garbage where the TLS handshake goes
  requests     a real negotiation (plain or TLS, simple or structured
               replies), then a batch of random requests: each must get
               exactly one final, well-framed reply with an NBD errno
  broken       a real negotiation, then a mutated request stream: the
               server must answer or hang up, never hang

Afterwards the server must still be running, have written no traceback,
and be back to the threads and descriptors it had before.
"""

import os
import random
import socket
import threading
import time

import fuzz_cases as cases
from fuzz import Findings, check_framing
from liveserver import HANG_SECONDS, LiveServer
from nbdclient import ClientError, NbdClient, client_context
from testpki import PKI
from vddktool import protocol as nbd

DISK_SIZE = 8 * 1024 * 1024
NBD_ERRNOS = {0, nbd.NBD_EPERM, nbd.NBD_EIO, nbd.NBD_ENOMEM, nbd.NBD_EINVAL,
              nbd.NBD_ENOSPC, nbd.NBD_EOVERFLOW, nbd.NBD_ENOTSUP,
              nbd.NBD_ESHUTDOWN}
HANDSHAKE_LIMIT = 3
MAX_CONNECTIONS = 64
KINDS = ("noise", "noise", "tls-noise", "requests", "requests", "broken")


def connect(server):
    client = NbdClient.unix(server.sock, timeout=HANG_SECONDS)
    return client


def drain(client):
    """Everything the server sends until it hangs up."""
    out = bytearray()
    while True:
        try:
            piece = client.transport.recv_some(65536)
        except (ConnectionResetError, BrokenPipeError):
            return bytes(out)
        if not piece:
            return bytes(out)
        out += piece


def session_noise(rng, server, client, tls):
    stream = cases.handshake_stream(rng)
    inputs = 1 + stream.count(b"IHAVEOPT")
    try:
        for piece in ([stream] if rng.random() < 0.5
                      else [stream[i:i + 7] for i in range(0, len(stream),
                                                           7)]):
            client.send(piece)
    except (BrokenPipeError, ConnectionResetError):
        pass    # the server hung up on what it got so far: fine
    client.transport.sock.shutdown(socket.SHUT_WR)
    problem = check_framing(drain(client), encrypted_after_starttls=True)
    if problem is not None:
        raise ClientError("%s after %r" % (problem, stream[:80]))
    return inputs


def session_tls_noise(rng, server, client, tls):
    client.greet()
    client.option(nbd.OPT_STARTTLS)
    if client.reply()[1] != nbd.REP_ACK:
        raise ClientError("STARTTLS refused by a server offering TLS")
    hello = cases.rng_bytes(rng, rng.randint(0, 300))
    if rng.random() < 0.5:
        hello = b"\x16\x03\x01" + cases.mutate(rng, hello)
    try:
        client.send(hello)
    except (BrokenPipeError, ConnectionResetError):
        pass
    client.transport.sock.shutdown(socket.SHUT_WR)
    drain(client)
    return 2


def negotiate(rng, client, tls):
    client.greet()
    inputs = 1
    if tls is not None:
        client.starttls(tls)
        inputs += 1
    client.go(structured=rng.random() < 0.7)
    return inputs + 3


def session_requests(rng, server, client, tls):
    inputs = negotiate(rng, client, tls)
    requests = [cases.request(rng, DISK_SIZE, cookie)
                for cookie in range(1, rng.randint(2, 60))]
    stream = cases.encode(requests)
    for command, _, cookie, offset, length, _ in requests:
        client._pending[cookie] = (command, offset, length)
    sender = threading.Thread(target=_send_quietly, args=(client, stream))
    sender.start()
    try:
        answered = set()
        while len(answered) < len(requests):
            reply = client.receive()
            if reply.cookie in answered:
                raise ClientError("two final replies to cookie %d"
                                  % reply.cookie)
            if reply.error not in NBD_ERRNOS:
                raise ClientError("errno %d is not NBD's" % reply.error)
            answered.add(reply.cookie)
    finally:
        sender.join()
    client.disconnect()
    if not client.at_eof():
        raise ClientError("the server sent more after the last reply")
    return inputs + len(requests)


def _send_quietly(client, data):
    try:
        client.send(data)
    except OSError:
        pass    # the reader reports what went wrong


def session_broken(rng, server, client, tls):
    inputs = negotiate(rng, client, tls)
    requests = [cases.request(rng, DISK_SIZE, cookie)
                for cookie in range(1, rng.randint(2, 20))]
    stream = cases.mutate(rng, cases.encode(requests))
    _send_quietly(client, stream)
    if tls is None:
        client.transport.sock.shutdown(socket.SHUT_WR)
    else:
        client.transport.raw.sock.shutdown(socket.SHUT_WR)
    drain(client)
    return inputs + len(requests)


SESSIONS = {
    "noise": session_noise, "tls-noise": session_tls_noise,
    "requests": session_requests, "broken": session_broken,
}


def run_session(rng, server, context, findings, lock):
    kind = rng.choice(KINDS)
    tls = context if kind in ("requests", "broken") and rng.random() < 0.3 \
        else None
    label = "%s%s" % (kind, " over TLS" if tls else "")
    client = connect(server)
    try:
        inputs = SESSIONS[kind](rng, server, client, tls)
        problem = None
    except socket.timeout:
        inputs, problem = 1, ("hang: %s" % label, "no answer in %d s"
                              % HANG_SECONDS)
    except ClientError as exc:
        inputs, problem = 1, ("crash: %s: protocol broken" % label, str(exc))
    except (OSError, EOFError) as exc:
        # Hung up on during negotiation or requests that were valid.
        inputs, problem = 1, ("crash: %s: dropped" % label, repr(exc))
    finally:
        client.close()
    with lock:
        findings.inputs += inputs
        findings.sessions += 1
        if problem is not None:
            findings.add(*problem)


def fuzz_server(count, seed, work, python, workers, progress=None):
    pki = PKI(os.path.join(work, "pki"))
    context = client_context(pki.client)
    server = LiveServer(work, python, [
        "--tls=on", "--tls-certificates=" + pki.server,
        "--handshake-limit=%d" % HANDSHAKE_LIMIT,
        "--max-connections=%d" % MAX_CONNECTIONS, "-t", "4",
        os.path.join(work, "disk.vmdk"), "create=true",
        "create-size=%d" % DISK_SIZE])
    findings = Findings()
    lock = threading.Lock()
    try:
        warm = connect(server)
        negotiate(random.Random(0), warm, None)
        warm.disconnect()
        warm.at_eof()
        warm.close()
        quiet = server.quiet_counts()

        def worker(number):
            rng = random.Random(seed * 1000 + number)
            while findings.inputs < count and server.proc.poll() is None:
                run_session(rng, server, context, findings, lock)

        threads = [threading.Thread(target=worker, args=(n,))
                   for n in range(workers)]
        for thread in threads:
            thread.start()
        highest = 0
        while any(thread.is_alive() for thread in threads):
            time.sleep(1)
            if server.proc.poll() is None:
                highest = max(highest, server.counts()[0])
            if progress and int(time.monotonic()) % 20 == 0:
                progress("server: %d inputs, %d sessions, %d threads at "
                         "most" % (findings.inputs, findings.sessions,
                                   highest))
        for thread in threads:
            thread.join()
        if server.proc.poll() is not None:
            findings.add("crash: server exited", "status %d"
                         % server.proc.returncode)
        else:
            after = server.quiet_counts()
            if after != quiet:
                findings.add("leak: threads and descriptors",
                             "%r before, %r after" % (quiet, after))
            bound = MAX_CONNECTIONS * 4 + 4
            if highest > bound:
                findings.add("leak: threads above the bound",
                             "%d > %d" % (highest, bound))
    finally:
        server.stop()
    log_text = server.log()
    for marker in ("Traceback", "internal error"):
        if marker in log_text:
            at = log_text.index(marker)
            findings.add("crash: %s in the server's log" % marker,
                         log_text[at:at + 300].replace("\n", " | "))
    return findings

