"""A test program (not part of the package): serve a raw file or RAM
through vddktool.server, so the server can be tested against real NBD
clients without the CLI or a VMDK engine.

    python tests/rawserver.py --socket SOCK [--file F | --ram SIZE] ...

Switches inject what the tests need: read-only, extents from
SEEK_DATA/SEEK_HOLE, an EIO at an offset, a delay at an offset (to force
out-of-order replies), several exports.  SIGTERM calls Server.shutdown()
from the signal handler, as the real CLI does.

Imported by the tests, this module also provides the ``raw_server``
fixture that starts it and always stops it.
"""

import argparse
import errno
import os
import signal
import socket
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
THIS = os.path.abspath(__file__)


def _parse_offsets(values):
    return set(int(v, 0) for v in values or [])


def _parse_delays(values):
    delays = {}
    for value in values or []:
        offset, seconds = value.split(":")
        delays[int(offset, 0)] = float(seconds)
    return delays


def _import_vddktool():
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    from vddktool import engine, log, server
    return engine, log, server


def build_backend(options):
    engine, log, server = _import_vddktool()
    failing_reads = _parse_offsets(options.fail_read)
    failing_writes = _parse_offsets(options.fail_write)
    delays = _parse_delays(options.delay_read)

    class RawEngine(engine.Engine):
        """One open file or RAM buffer, with injected faults."""

        def __init__(self, backend, name, readonly):
            self.backend = backend
            self.name = name
            self.readonly = readonly
            self.flushes = 0
            self.ram = backend.ram
            self.fd = None
            if self.ram is None:
                mode = os.O_RDONLY if readonly else os.O_RDWR
                self.fd = os.open(options.file, mode)
            if options.serialize:
                self.thread_model = engine.SERIALIZE_REQUESTS

        def get_size(self):
            if self.ram is not None:
                return len(self.ram)
            return os.fstat(self.fd).st_size

        def block_size(self):
            if options.block_size:
                return tuple(int(v) for v in options.block_size.split(","))
            return super().block_size()

        def can_write(self):
            return not self.readonly

        def can_flush(self):
            return True

        def can_fua(self):
            return engine.FUA_NATIVE if options.native_fua else \
                engine.FUA_EMULATE

        def can_trim(self):
            return True

        def can_fast_zero(self):
            return options.fast_zero

        def can_extents(self):
            return options.sparse

        def can_cache(self):
            return engine.CACHE_EMULATE

        def can_multi_conn(self):
            return True

        def _check(self, faults, count, offset, what):
            for bad in faults:
                if offset <= bad < offset + count:
                    raise engine.EngineError(
                        errno.EIO, "injected %s error at %d" % (what, bad))

        def pread(self, count, offset, flags=0):
            self._check(failing_reads, count, offset, "read")
            for at, seconds in delays.items():
                if offset <= at < offset + count:
                    time.sleep(seconds)
            if self.ram is not None:
                return memoryview(self.ram)[offset:offset + count]
            return os.pread(self.fd, count, offset)

        def pread_sparse(self, count, offset, flags=0):
            if not options.sparse:
                return super().pread_sparse(count, offset, flags)
            pieces = []
            for extent in self.extents(count, offset):
                if extent.flags & engine.EXTENT_HOLE:
                    self._check(failing_reads, extent.length,
                                extent.offset, "read")
                    pieces.append((extent.offset, None))
                else:
                    pieces.append((extent.offset,
                                   self.pread(extent.length, extent.offset)))
            return pieces

        def _note(self, fmt, *args):
            if options.log_calls:
                log.warning("call: " + fmt, *args)

        def pwrite(self, buf, offset, flags=0):
            fua = bool(flags & engine.FLAG_FUA)
            self._note("pwrite %d %d fua=%s", len(buf), offset, fua)
            self._check(failing_writes, len(buf), offset, "write")
            if self.ram is not None:
                self.ram[offset:offset + len(buf)] = buf
            else:
                os.pwrite(self.fd, buf, offset)
            if fua:
                self.flush()

        def flush(self, flags=0):
            self._note("flush")
            self.flushes += 1
            if self.fd is not None:
                os.fdatasync(self.fd)

        def trim(self, count, offset, flags=0):
            fua = bool(flags & engine.FLAG_FUA)
            self._note("trim %d %d fua=%s", count, offset, fua)
            self._fill_zeros(count, offset)
            if fua:
                self.flush()

        def zero(self, count, offset, flags=0):
            fua = bool(flags & engine.FLAG_FUA)
            self._note("zero %d %d may_trim=%s fua=%s", count, offset,
                       bool(flags & engine.FLAG_MAY_TRIM), fua)
            self._fill_zeros(count, offset)
            if fua:
                self.flush()

        def _fill_zeros(self, count, offset):
            if self.ram is not None:
                self.ram[offset:offset + count] = bytes(count)
            else:
                os.pwrite(self.fd, bytes(count), offset)

        def extents(self, count, offset, flags=0):
            if self.fd is None:
                return [engine.Extent(offset, count, 0)]
            end = offset + count
            out = []
            position = offset
            while position < end:
                try:
                    data = os.lseek(self.fd, position, os.SEEK_DATA)
                except OSError:
                    data = end  # ENXIO: only a hole remains
                data = min(data, end)
                if data > position:
                    out.append(engine.Extent(position, data - position,
                                             engine.EXTENT_HOLE |
                                             engine.EXTENT_ZERO))
                    position = data
                    continue
                hole = min(os.lseek(self.fd, position, os.SEEK_HOLE), end)
                out.append(engine.Extent(position, hole - position, 0))
                position = hole
            return out

        def close(self):
            if self.fd is not None:
                os.close(self.fd)
            log.warning("closed export %r after %d flushes", self.name,
                        self.flushes)

    class RawBackend(engine.Backend):
        name = "raw"

        def __init__(self):
            super().__init__({}, options.readonly)
            self.ram = (bytearray(options.ram) if options.ram is not None
                        else None)
            self.exports = dict(e.split("=", 1) if "=" in e else (e, "")
                                for e in options.export or [""])

        def list_exports(self, is_tls=False):
            return sorted(self.exports.items())

        def describe(self, export_name):
            return self.exports.get(export_name, "")

        def open(self, export_name, readonly, is_tls=False):
            if export_name not in self.exports:
                raise engine.EngineError(errno.ENOENT, "no such export")
            return RawEngine(self, export_name, readonly)

    return RawBackend()


def parse_args(argv):
    parser = argparse.ArgumentParser()
    parser.add_argument("--socket", action="append", default=[])
    parser.add_argument("--tcp-port-file")
    parser.add_argument("--stdio", action="store_true")
    parser.add_argument("--file")
    parser.add_argument("--ram", type=int)
    parser.add_argument("--readonly", action="store_true")
    parser.add_argument("--sparse", action="store_true",
                        help="extents and holes from SEEK_DATA/SEEK_HOLE")
    parser.add_argument("--fail-read", action="append")
    parser.add_argument("--fail-write", action="append")
    parser.add_argument("--delay-read", action="append",
                        help="OFFSET:SECONDS")
    parser.add_argument("--export", action="append", help="NAME[=DESC]")
    parser.add_argument("--export-name", default="")
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--block-size", help="MIN,PREFERRED,MAX")
    parser.add_argument("--fast-zero", action="store_true")
    parser.add_argument("--native-fua", action="store_true")
    parser.add_argument("--log-calls", action="store_true",
                        help="log every write, zero, trim and flush call")
    parser.add_argument("--serialize", action="store_true")
    parser.add_argument("--tls", default="off")
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--shutdown-grace", type=float,
                        help="seconds before shutdown cuts clients off")
    return parser.parse_args(argv)


def listen(options):
    sockets = []
    for path in options.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(path + ".tmp")
        sock.listen(16)
        # Appear under the final name only when ready to accept.
        os.rename(path + ".tmp", path)
        sockets.append(sock)
    if options.tcp_port_file:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        with open(options.tcp_port_file + ".tmp", "w") as f:
            f.write(str(sock.getsockname()[1]))
        os.rename(options.tcp_port_file + ".tmp", options.tcp_port_file)
        sockets.append(sock)
    return sockets


def main(argv):
    options = parse_args(argv)
    engine, log, server = _import_vddktool()
    log.configure(verbose=options.verbose)
    backend = build_backend(options)
    settings = server.ServerSettings(
        readonly=options.readonly, export_name=options.export_name,
        threads=options.threads, tls=options.tls)
    nbd_server = server.Server(backend, settings)
    if options.shutdown_grace is not None:
        nbd_server.shutdown_grace = options.shutdown_grace
    signal.signal(signal.SIGTERM, lambda signum, frame: nbd_server.shutdown())
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    if options.stdio:
        nbd_server.serve_connection(0, 1)
    else:
        nbd_server.serve_forever(listen(options))
    alive = [t.name for t in threading.enumerate()
             if t is not threading.main_thread()]
    log.warning("server stopped; threads left: %d %s", len(alive), alive)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
else:
    import subprocess

    import pytest
    from conftest import Server, need, run, wait_for_socket

    def nbdsh(script, check=True):
        """Run a Python script inside nbdsh (``h`` is a fresh handle)."""
        return run([need("nbdsh"), "-c", script], check=check)

    def make_disk(path, size=4 << 20, data=((1 << 20, 65536),
                                            (3 << 20, 4096))):
        """A sparse file with random data at the given (offset, length)
        runs; returns its bytes."""
        content = bytearray(size)
        with open(path, "wb") as f:
            f.truncate(size)
            for offset, length in data:
                chunk = os.urandom(length)
                f.seek(offset)
                f.write(chunk)
                content[offset:offset + length] = chunk
        return bytes(content)

    @pytest.fixture
    def raw_server(tmp_path):
        """raw_server(*args) -> conftest.Server running this program on
        tmp_path/rawN.sock; every one started is stopped afterwards."""
        started = []

        def start(*args):
            sock = str(tmp_path / ("raw%d.sock" % len(started)))
            log_path = str(tmp_path / ("raw%d.log" % len(started)))
            with open(log_path, "wb") as log_file:
                proc = subprocess.Popen(
                    [sys.executable, THIS, "--socket", sock] + list(args),
                    stdin=subprocess.DEVNULL, stdout=log_file,
                    stderr=log_file)
            server = Server(proc, sock, log_path)
            started.append(server)
            wait_for_socket(sock, proc, log_path)
            return server

        yield start
        for server in started:
            server.stop()
