"""Fake VDDK set-ups for tests: ``from fake_vddk.fixtures import fake_vddk``.

A FakeVddk lays out a libdir holding the fake libvixDiskLib.so.N, a place
for "remote" datastores, and the environment that steers the fake.  Pass
``fake.env`` to ``start_server(..., env=fake.env)`` (or set it in
os.environ for in-process ctypes tests); the fake reads it at each call.

What the environment does (see fake_vixdisklib.c):
  FAKE_VDDK_RECORD=PATH        one line per call; ``calls()`` parses them
  FAKE_VDDK_REMOTE_ROOT=DIR    "[ds] dir/f.vmdk" is DIR/ds/dir/f.vmdk
  FAKE_VDDK_EXPECT_<FIELD>=V   ConnectEx fails unless FIELD was V; FIELD is
                               SERVER THUMBPRINT USER PASSWORD COOKIE VM
                               SNAPSHOT TRANSPORTS PORT NFCHOSTPORT.
                               THUMBPRINT is the server's real one: any
                               other is refused with VDDK's message
                               "actual thumbprint=REAL expected=GIVEN"
  FAKE_VDDK_FAIL_READ_AT=N     reads covering byte N fail
  FAKE_VDDK_FAIL_WRITE_AT=N    writes covering byte N fail
  FAKE_VDDK_FAIL_READ_TIMES=K  ... only the first K reads covering it
  FAKE_VDDK_FAIL_WRITE_TIMES=K ... only the first K writes covering it
                               (counted process-wide: reopening the
                               disk does not reset the count)
  FAKE_VDDK_FAIL_OPEN=1        Open fails with VDDK's "Error 1"
  FAKE_VDDK_MAX_REQUEST_BYTES=N  remote reads and writes above N bytes fail
                               with the NFC out-of-memory error
  FAKE_VDDK_ASYNC_DELAY_US=N   async requests wait up to N us (default
                               2000) before running, so they finish out
                               of order
  FAKE_VDDK_COMPLETION_THREADS=N  N long-lived threads (1-256) run async
                               requests and call back, as VDDK's own
                               background threads do; by default each
                               request gets a new thread
  FAKE_VDDK_HANDLE_PAUSE_US=N  every call on a handle lasts N us longer,
                               so that two threads inside one handle at
                               once (VDDK forbids it) are caught: each such
                               call is recorded as "HandleOverlap" and
                               warned about
  FAKE_VDDK_RECORD_COMPLETIONS=1  also record each async request as it
                               completes ("Completed op=WriteAsync ...")

Open and Close calls that overlap in time (VDDK needs them serialized) are
recorded as "Overlap" calls, warned about, and make Open fail; each takes
FAKE_VDDK_OPEN_CLOSE_PAUSE_MS (default 2) so that overlaps happen.  A local
disk opened for writing in a directory without write permission fails
with VDDK's FileLockCreateEntryDirectory error.
"""

import ctypes
import os
import re

import pytest

from vddktool.vddk import abi
from vddktool.vddk.library import Library

from .build import build

# The fields each recorded line carries, in the order the fake writes them.
RECORD_FIELDS = {
    "InitEx": ("major", "minor", "libdir", "config"),
    "ConnectEx": ("readOnly", "snapshot", "transports", "params", "vmxSpec",
                  "serverName", "thumbPrint", "userName", "password",
                  "cookie", "port", "nfcHostPort", "credType"),
    "Open": ("path", "flags"),
    "Create": ("path", "params", "diskType", "adapterType", "hwVersion",
               "capacity"),
    "Read": ("sector", "count"),
    "Write": ("sector", "count"),
    "ReadAsync": ("sector", "count"),
    "WriteAsync": ("sector", "count"),
    "QueryAllocatedBlocks": ("start", "count", "chunk"),
    # Open or Close entered while another Open or Close was running.
    "Overlap": ("call",),
    # A call on a handle entered while another call was inside it.
    "HandleOverlap": ("call",),
    # An async request done (FAKE_VDDK_RECORD_COMPLETIONS=1), and the
    # thread that called back.
    "Completed": ("op", "sector", "count", "thread"),
}

# Values may hold spaces ("[ds] dir/f.vmdk"), so each call's line is
# matched against its own field list rather than split on blanks.
_LINE_PATTERNS = dict(
    (name, re.compile(
        re.escape(name)
        + "".join(r" %s=(?P<%s>.*?)" % (field, field) for field in fields)
        + "$"))
    for name, fields in RECORD_FIELDS.items())


class Call(object):
    """One recorded library call: ``call.name`` and ``call["field"]``
    (a str, or None where the fake saw a NULL pointer)."""

    def __init__(self, name, fields):
        self.name = name
        self.fields = fields

    def __getitem__(self, field):
        return self.fields[field]

    def number(self, field):
        return int(self.fields[field])

    def raw(self, field):
        """The bytes of a hex-dumped structure (ConnectEx/Create params)."""
        return bytes.fromhex(self.fields[field])

    def __repr__(self):
        return "Call(%r, %r)" % (self.name, self.fields)


def parse_record_line(line):
    name = line.split(" ", 1)[0]
    pattern = _LINE_PATTERNS.get(name)
    if pattern is None:
        return Call(name, {})
    match = pattern.match(line)
    assert match, "fake VDDK record line not understood: %r" % line
    fields = dict((key, None if value == "(null)" else value)
                  for key, value in match.groupdict().items())
    return Call(name, fields)


class FakeVddk(object):
    """A fake VDDK installation under ``root`` and the knobs of the fake."""

    def __init__(self, root, major=8, optional=True, subdir="lib64"):
        root = str(root)
        self.major = major
        self.optional = optional
        self.libdir = os.path.join(root, "vmware-vix-disklib-distrib")
        self.library = build(self.libdir, major, optional, subdir)
        self.record_path = os.path.join(root, "vddk-calls.txt")
        self.remote_root = os.path.join(root, "datastores")
        self.disk_dir = os.path.join(root, "disks")
        for directory in (self.remote_root, self.disk_dir):
            if not os.path.isdir(directory):
                os.makedirs(directory)
        self.env = {
            "FAKE_VDDK_RECORD": self.record_path,
            "FAKE_VDDK_REMOTE_ROOT": self.remote_root,
        }

    # -- steering the fake

    def expect(self, **fields):
        """ConnectEx will insist on these values, e.g. expect(port=902,
        user="root", vm="moref=vm-16")."""
        for field, value in fields.items():
            self.env["FAKE_VDDK_EXPECT_" + field.upper()] = str(value)

    def fail_read_at(self, offset, times=None):
        """Reads covering ``offset`` fail (the first ``times`` only)."""
        self.env["FAKE_VDDK_FAIL_READ_AT"] = str(offset)
        if times is not None:
            self.env["FAKE_VDDK_FAIL_READ_TIMES"] = str(times)

    def fail_write_at(self, offset, times=None):
        self.env["FAKE_VDDK_FAIL_WRITE_AT"] = str(offset)
        if times is not None:
            self.env["FAKE_VDDK_FAIL_WRITE_TIMES"] = str(times)

    def fail_open(self):
        self.env["FAKE_VDDK_FAIL_OPEN"] = "1"

    def limit_remote_requests(self, max_bytes):
        """Remote requests above max_bytes fail as if ESXi ran out of
        memory (what --filter=blocksize maxdata= avoids)."""
        self.env["FAKE_VDDK_MAX_REQUEST_BYTES"] = str(max_bytes)

    # -- disks

    def local_disk(self, name="disk.raw", size=1024 * 1024, data=None):
        """A raw file served through a local connection; its path."""
        return _write_disk(os.path.join(self.disk_dir, name), size, data)

    def remote_disk(self, datastore="datastore1", path="vm/vm.vmdk",
                    size=1024 * 1024, data=None):
        """A disk reachable as "[datastore] path" remotely; that name."""
        _write_disk(os.path.join(self.remote_root, datastore, path),
                    size, data)
        return "[%s] %s" % (datastore, path)

    def remote_file(self, vddk_path):
        """The file behind a remote "[ds] path" name."""
        datastore, rest = re.match(r"\[(.*?)\] *(.*)$", vddk_path).groups()
        return os.path.join(self.remote_root, datastore, rest)

    # -- what the fake saw

    def calls(self, name=None):
        """Recorded calls in order, all or those of one function."""
        if not os.path.exists(self.record_path):
            return []
        with open(self.record_path) as f:
            calls = [parse_record_line(line.rstrip("\n"))
                     for line in f if line.strip()]
        return [c for c in calls if name is None or c.name == name]

    def call_names(self):
        return [c.name for c in self.calls()]

    def forget_calls(self):
        if os.path.exists(self.record_path):
            os.unlink(self.record_path)


def _write_disk(path, size, data):
    directory = os.path.dirname(path)
    if not os.path.isdir(directory):
        os.makedirs(directory)
    with open(path, "wb") as f:
        if data is not None:
            f.write(data)
        if size is not None:
            # A sparse tail: holes are what QueryAllocatedBlocks reports.
            f.truncate(max(size, len(data or b"")))
    return path


def load_helpers(library_path):
    """The fake's test-only exports, through ctypes in this process."""
    dll = ctypes.CDLL(library_path)
    dll.fake_vddk_layout.restype = ctypes.c_char_p
    dll.fake_vddk_layout.argtypes = []
    dll.fake_vddk_outstanding.restype = ctypes.c_int
    dll.fake_vddk_outstanding.argtypes = []
    return dll


def compiled_layout(library_path):
    """{"Struct": size, "Struct.field": (offset, size)} as gcc laid out
    the fake's structures."""
    text = load_helpers(library_path).fake_vddk_layout().decode()
    layout = {}
    for line in text.splitlines():
        key, value = line.split("=", 1)
        numbers = tuple(int(n) for n in value.split())
        layout[key] = numbers[0] if len(numbers) == 1 else numbers
    return layout


class BindingSession(object):
    """The binding loaded in this process against a fresh copy of the
    fake (each test's copy is a separate library with its own state), the
    fake's environment set and InitEx done.  What the fake logs and warns
    lands, formatted by the binding, in ``messages`` and ``warnings``."""

    def __init__(self, fake, monkeypatch):
        for key, value in fake.env.items():
            monkeypatch.setenv(key, value)
        self.fake = fake
        self.lib = Library(fake.library, fake.major)
        self.helpers = load_helpers(fake.library)
        self.messages = []
        self.warnings = []
        router = abi.MessageRouter()
        router.log_func = abi.LogFunc(
            lambda fmt, args: self.messages.append(router.text(fmt, args)))
        router.warn_func = abi.LogFunc(
            lambda fmt, args: self.warnings.append(router.text(fmt, args)))
        self.router = router
        self.lib.check("InitEx", 6, 7, router.log_func, router.warn_func,
                       router.panic_func, None, None)

    def connect(self, params=None, read_only=False, snapshot=None,
                transports=None):
        """ConnectEx; a default (zeroed) ConnectParams is a local one."""
        connection = abi.ConnectionPtr()
        self.lib.check("ConnectEx", ctypes.byref(params or
                                                 abi.ConnectParams()),
                       b"\x01" if read_only else b"\x00", snapshot,
                       transports, ctypes.byref(connection))
        return connection

    def open(self, connection, path, flags=0):
        handle = abi.HandlePtr()
        self.lib.check("Open", connection, path.encode(), flags,
                       ctypes.byref(handle))
        return handle

    def outstanding(self):
        """Objects the library handed out and nobody freed yet."""
        return self.helpers.fake_vddk_outstanding()


@pytest.fixture
def fake_vddk(tmp_path):
    """A fake VDDK 8 with every optional function."""
    return FakeVddk(tmp_path / "fake-vddk")


@pytest.fixture
def make_fake_vddk(tmp_path):
    """make_fake_vddk(major=8, optional=True, subdir="lib64") for other
    variants; each call gets its own directory."""
    made = []

    def make(major=8, optional=True, subdir="lib64"):
        root = tmp_path / ("fake-vddk-%d" % len(made))
        fake = FakeVddk(root, major, optional, subdir)
        made.append(fake)
        return fake

    return make


@pytest.fixture
def session(fake_vddk, monkeypatch):
    """A BindingSession on the default fake."""
    return BindingSession(fake_vddk, monkeypatch)
