"""Every KEY=VALUE parameter, declared once.

The CLI parses with this table, --help lists it, and the manual test checks
that every name in it is documented.  A parser takes the text after ``=``
and returns the value or raises UsageError with a message that says what
would be accepted.
"""

import os
import re

from .engine import UsageError

# ---------------------------------------------------------------------------
# value parsers


def parse_bool(text):
    """Booleans as nbdkit spells them (t, y, f and n too)."""
    low = text.strip().lower()
    if low in ("1", "true", "t", "yes", "y", "on"):
        return True
    if low in ("0", "false", "f", "no", "n", "off", ""):
        return False
    raise ValueError("is not a boolean (use true or false)")


_SIZE_RE = re.compile(r"^\s*([0-9]+)\s*([bkmgtpe]?)(i?b)?\s*$", re.IGNORECASE)
_SIZE_SHIFT = {"": 0, "b": 0, "k": 10, "m": 20, "g": 30, "t": 40,
               "p": 50, "e": 60}


def parse_size(text):
    """Sizes like nbdkit's: a number of bytes with an optional K, M, G, T,
    P or E (powers of 1024)."""
    m = _SIZE_RE.match(text)
    if not m:
        raise ValueError("is not a size (use a number of bytes, optionally "
                         "followed by K, M, G or T)")
    value = int(m.group(1)) << _SIZE_SHIFT[m.group(2).lower()]
    if value >= 1 << 63:
        raise ValueError("is too large")
    return value


def parse_unsigned(text):
    if not text.strip().isdigit():
        raise ValueError("is not a whole number (use 0 or more, such as 5)")
    return int(text)


def parse_positive(text):
    value = parse_unsigned(text)
    if value == 0:
        raise ValueError("must not be 0")
    return value


def parse_seconds(text):
    """A time in seconds, fractions allowed (burstiness=2.5)."""
    try:
        value = float(text)
    except ValueError:
        raise ValueError("is not a number of seconds (such as 2 or 0.5)")
    if not value > 0 or value == float("inf"):
        raise ValueError("must be a number of seconds above 0")
    return value


def size_limited(low, high, power_of_two=False):
    """A parse_size that insists on low <= size <= high (and a power of
    two): the message says which rule was broken."""
    def parse(text):
        value = parse_size(text)
        if power_of_two and value & (value - 1):
            raise ValueError("is not a power of two (such as %s)"
                             % _size_text(max(low, 1)))
        if not low <= value <= high:
            raise ValueError("is out of range (use %s to %s)"
                             % (_size_text(low), _size_text(high)))
        return value
    return parse


def _size_text(value):
    for suffix, shift in (("G", 30), ("M", 20), ("K", 10)):
        if value >= 1 << shift and not value % (1 << shift):
            return "%d%s" % (value >> shift, suffix)
    return str(value)


def parse_bits_per_second(text):
    """A rate in bits per second, with nbdkit's size suffixes: 8M is
    8388608 bits (1 MiB) per second."""
    value = parse_size(text)
    if value == 0:
        raise ValueError("must not be 0 (drop the parameter for no limit)")
    return value


def parse_absolute_path(text):
    """A path, made absolute now: the daemon later runs in /."""
    return os.path.abspath(parse_nonempty(text))


def parse_bool_or_path(text):
    """true, false, or an absolute /PATH (on while PATH exists)."""
    if text.startswith("/"):
        return text
    try:
        return parse_bool(text)
    except ValueError:
        raise ValueError("is not true, false or an absolute /PATH")


def parse_port(text):
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise ValueError("is not a port number (use 1 to 65535)")
    return int(text)


def parse_string(text):
    return text


def parse_nonempty(text):
    if not text:
        raise ValueError("is empty")
    return text


def choice(*names):
    def parse(text):
        if text not in names:
            raise ValueError("is not one of %s" % ", ".join(names))
        return text
    parse.choices = names
    return parse


# create-type names and the VixDiskLib disk type numbers they map to.
CREATE_TYPES = {
    "monolithic-sparse": 1, "monolithic-flat": 2, "split-sparse": 3,
    "split-flat": 4, "vmfs-flat": 5, "stream-optimized": 6,
    "vmfs-thin": 7, "vmfs-sparse": 8,
}

ADAPTER_TYPES = {"ide": 1, "scsi-buslogic": 2, "scsi-lsilogic": 3}

HWVERSIONS = {
    "workstation4": 3, "workstation5": 4, "workstation6": 6, "esx30": 4,
    "esx4x": 7, "esx50": 8, "esx51": 9, "esx55": 10, "esx60": 11,
    "esx65": 13,
}


def parse_hwversion(text):
    if text in HWVERSIONS:
        return HWVERSIONS[text]
    if text.isdigit() and int(text) <= 0xffff:
        return int(text)
    raise ValueError("is not a hardware version (use a name such as "
                     "workstation5 or esx65, or a number up to 65535)")


def parse_create_size(text):
    size = parse_size(text)
    if size == 0 or size % 512:
        raise ValueError("must be a non-zero multiple of 512 bytes")
    return size


# What a certificate fingerprint looks like: 20 bytes (SHA-1) or 32 bytes
# (SHA-256) in hex, pairs separated by colons or not at all.
_HEX_PAIRS_RE = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2})*$")
_HEX_RE = re.compile(r"^[0-9a-fA-F]*$")
THUMBPRINT_BYTES = (20, 32)


def looks_like_thumbprint(text):
    if _HEX_PAIRS_RE.match(text):
        count = len(text.split(":")) if ":" in text else len(text) // 2
    elif _HEX_RE.match(text) and len(text) % 2 == 0:
        count = len(text) // 2
    else:
        return False
    return count in THUMBPRINT_BYTES


def parse_thumbprint(text):
    """Passed to VDDK as given: VDDK is the judge, and a wrong value on
    purpose (thumbprint=12) is how its error reveals the real one."""
    if not text:
        raise ValueError("is empty (give the server's certificate "
                         "fingerprint, see THUMBPRINTS in vddktool(1))")
    return text


def parse_vm(text):
    if not text.startswith("moref=") or len(text) == len("moref="):
        raise ValueError("must have the form moref=ID (for example "
                         "vm=moref=vm-16)")
    return text


def parse_transports(text):
    modes = text.split(":")
    if not all(modes):
        raise ValueError("must be a colon-separated list of transport "
                         "modes, such as nbdssl:nbd")
    return text


# The re-exec for VDDK (vddk/reexec.py) hands password= over as -FD of a
# pipe it has filled and closed, and names that fd here: such a pipe is
# read to its end, so that a password holding newlines survives.
REEXEC_PASSWORD_FD = "VDDKTOOL_PASSWORD_FD"


class Secret(object):
    """A password or cookie: never printed, never in repr()."""

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value

    def __repr__(self):
        return "Secret(***)"

    __str__ = __repr__


def read_password(text, interactive_prompt="Password: "):
    """password=PASSWORD | - (ask) | +FILENAME | -FD, as nbdkit does.  A
    file or descriptor gives its first line: launchers keep their end of
    a pipe open, so waiting for end of file would wait for ever."""
    if text == "-":
        import getpass
        if not os.isatty(0):
            raise ValueError("- asks on the terminal, but standard input is "
                             "not a terminal (use password=+FILENAME or "
                             "password=-FD)")
        return Secret(getpass.getpass(interactive_prompt))
    if text.startswith("+"):
        path = text[1:]
        try:
            with open(path, "rb") as f:
                data = f.readline()
        except OSError as e:
            raise ValueError("cannot read password file %s: %s"
                             % (path, e.strerror))
        return Secret(_first_line(data))
    if text.startswith("-"):
        if not text[1:].isdigit():
            raise ValueError("starts with - but is not -FD (use - to be "
                             "asked, -FD for a file descriptor number, or "
                             "+FILENAME)")
        fd = int(text[1:])
        if fd <= 2:
            raise ValueError("file descriptor %d is one of stdin, stdout or "
                             "stderr (use 3 or higher)" % fd)
        ours = os.environ.get(REEXEC_PASSWORD_FD) == str(fd)
        os.environ.pop(REEXEC_PASSWORD_FD, None)
        try:
            data = _read_line(fd, to_the_end=ours)
        except OSError as e:
            raise ValueError("cannot read the password from file descriptor "
                             "%d: %s" % (fd, e.strerror))
        if ours:
            return Secret(data[:-1].decode("utf-8") if data.endswith(b"\n")
                          else data.decode("utf-8"))
        return Secret(_first_line(data))
    return Secret(text)


def _read_line(fd, to_the_end=False):
    """Bytes from ``fd`` up to its first newline (or end of file); the
    descriptor is closed after."""
    chunks = []
    try:
        while True:
            chunk = os.read(fd, 4096)
            chunks.append(chunk)
            if not chunk or (b"\n" in chunk and not to_the_end):
                return b"".join(chunks)
    finally:
        try:
            os.close(fd)
        except OSError:
            pass


def _first_line(data):
    return data.split(b"\n", 1)[0].decode("utf-8", "replace")


def parse_cookie(text):
    return Secret(text)


# ---------------------------------------------------------------------------
# the table


class Param(object):
    __slots__ = ("name", "parse", "default", "metavar", "summary", "group")

    def __init__(self, name, parse, default, metavar, summary, group):
        self.name = name
        self.parse = parse
        self.default = default
        self.metavar = metavar
        self.summary = summary
        self.group = group


# group: "disk" applies to every backend; "create" to create=true;
# "remote" needs VDDK; "vddk" is VDDK-specific but also local; "native"
# only matters to the native engine.
PARAMS = [
    Param("file", parse_nonempty, None, "FILENAME",
          "the VMDK to serve: an absolute local path, or "
          "'[datastore] dir/name.vmdk' on a remote server", "disk"),
    Param("export", parse_nonempty, None, "WILDCARD",
          "remote only: let the client choose the file by export name, "
          "if it matches WILDCARD", "remote"),
    Param("backend", choice("auto", "vddk", "native"), "auto",
          "auto|vddk|native",
          "the disk engine: VDDK when its library is found, else native",
          "disk"),
    Param("single-link", parse_bool, False, "true",
          "open only this link of a snapshot chain", "disk"),
    Param("force-share", parse_bool, False, "true",
          "with -r: read an image even while another process writes it "
          "(qemu's -U)", "native"),
    Param("create", parse_bool, False, "true",
          "create a new local VMDK (the file must not exist)", "create"),
    Param("create-size", parse_create_size, None, "SIZE",
          "virtual size of the created disk (multiple of 512)", "create"),
    Param("create-type", choice(*CREATE_TYPES), "monolithic-sparse",
          "|".join(CREATE_TYPES), "sub-format of the created disk",
          "create"),
    Param("create-adapter-type", choice(*ADAPTER_TYPES), "scsi-buslogic",
          "|".join(ADAPTER_TYPES), "adapter type written to the descriptor",
          "create"),
    Param("create-hwversion", parse_hwversion, HWVERSIONS["workstation5"],
          "NAME|N", "virtual hardware version written to the descriptor",
          "create"),
    Param("libdir", parse_nonempty, None, "PATHNAME",
          "where VDDK is unpacked", "vddk"),
    Param("config", parse_nonempty, None, "FILENAME",
          "VDDK configuration file", "vddk"),
    Param("unbuffered", parse_bool, False, "true",
          "open with VIXDISKLIB_FLAG_OPEN_UNBUFFERED (no host cache)",
          "vddk"),
    Param("compression", choice("none", "zlib", "fastlz", "skipz"), "none",
          "none|zlib|fastlz|skipz", "network compression (remote)",
          "remote"),
    Param("cookie", parse_cookie, None, "COOKIE",
          "vmware_soap_session cookie of an existing session", "remote"),
    Param("nfchostport", parse_port, None, "PORT",
          "NFC port on ESXi (default 902)", "remote"),
    Param("password", read_password, None,
          "PASSWORD|-|+FILENAME|-FD", "password of the remote user",
          "remote"),
    Param("port", parse_port, None, "PORT",
          "HTTPS port of vCenter or ESXi (default 443)", "remote"),
    Param("server", parse_nonempty, None, "HOSTNAME",
          "vCenter or ESXi host name or address", "remote"),
    Param("snapshot", parse_nonempty, None, "MOREF",
          "managed object reference of a snapshot", "remote"),
    Param("thumbprint", parse_thumbprint, None, "xx:xx:...:xx",
          "SHA-1 thumbprint of the server's certificate (python3 -m "
          "vddktool --thumbprint HOST prints it)", "remote"),
    Param("transports", parse_transports, None, "MODE:MODE:...",
          "transport modes to try, such as nbdssl:nbd", "remote"),
    Param("user", parse_nonempty, None, "USERNAME", "remote user name",
          "remote"),
    Param("vm", parse_vm, None, "moref=ID",
          "managed object reference of the virtual machine", "remote"),
    Param("vimapiver", parse_string, None, "APIVER",
          "accepted and ignored, for old command lines", "remote"),
]

# The filters' parameters: group "filter:NAME" is --filter=NAME's.  Sizes
# and defaults are nbdkit's.
UINT32_MAX = 0xffffffff
FILTER_PARAMS = [
    Param("minblock", size_limited(1, 64 * 1024, power_of_two=True), None,
          "SIZE", "alignment and smallest request passed down (a power "
          "of two to 64K)", "filter:blocksize"),
    Param("maxdata", size_limited(1, UINT32_MAX), None, "SIZE",
          "largest read or write passed down (default 64M)",
          "filter:blocksize"),
    Param("maxlen", size_limited(1, UINT32_MAX), None, "SIZE",
          "largest trim, zero or extents query passed down",
          "filter:blocksize"),
    Param("cow-block-size", size_limited(4096, 1 << 31, power_of_two=True),
          64 * 1024, "SIZE", "unit of the overlay (a power of two from "
          "4K; default 64K)", "filter:cow"),
    Param("cow-on-read", parse_bool_or_path, False, "true|false|/PATH",
          "also keep what is read in the overlay (/PATH: while PATH "
          "exists)", "filter:cow"),
    Param("cow-on-cache", parse_bool, False, "true",
          "keep what cache (prefetch) requests read in the overlay",
          "filter:cow"),
    Param("rate", parse_bits_per_second, None, "BITSPERSEC",
          "limit the bandwidth of all connections together", "filter:rate"),
    Param("connection-rate", parse_bits_per_second, None, "BITSPERSEC",
          "limit the bandwidth of each connection", "filter:rate"),
    Param("rate-file", parse_absolute_path, None, "FILENAME",
          "read the total rate from this file while serving",
          "filter:rate"),
    Param("connection-rate-file", parse_absolute_path, None, "FILENAME",
          "read the per-connection rate from this file while serving",
          "filter:rate"),
    Param("burstiness", parse_seconds, 2.0, "SECS",
          "how long a client may go at full speed after a pause "
          "(default 2)", "filter:rate"),
    Param("retries", parse_unsigned, 5, "N",
          "how many times a failed request is retried (default 5, 0: "
          "never)", "filter:retry"),
    Param("retry-delay", parse_positive, 2, "N",
          "seconds to wait before the first retry (default 2)",
          "filter:retry"),
    Param("retry-exponential", parse_bool, True, "yes|no",
          "double the wait at each retry (default yes)", "filter:retry"),
    Param("retry-readonly", parse_bool, False, "yes|no",
          "after a failure, reopen the disk read-only (default no)",
          "filter:retry"),
    Param("scan-ahead", parse_bool, True, "false",
          "skip ahead of the client's reads (default true)", "filter:scan"),
    Param("scan-clock", parse_bool, True, "false",
          "resume where the last client left off (default true)",
          "filter:scan"),
    Param("scan-forever", parse_bool, False, "true",
          "start again at the end of the disk (default false)",
          "filter:scan"),
    Param("scan-size", size_limited(512, 32 * 1024 * 1024,
                                    power_of_two=True),
          2 * 1024 * 1024, "SIZE", "size of each prefetch (a power of two, "
          "512 to 32M; default 2M)", "filter:scan"),
    Param("limit", parse_unsigned, 1, "N",
          "clients served at once (default 1, 0: no limit)",
          "filter:limit"),
]
PARAMS.extend(FILTER_PARAMS)

BY_NAME = dict((p.name, p) for p in PARAMS)

# The first bare word on the command line (no '=') is file=.
MAGIC_PARAM = "file"

# Any of these makes the disk remote (compression and transports also
# apply to VDDK's local "file" transport, so they do not).
REMOTE_PARAMS = ("server", "thumbprint", "user", "password", "cookie", "vm",
                 "snapshot", "port", "nfchostport", "export")


def defaults():
    return dict((p.name, p.default) for p in PARAMS)


def filter_of(name):
    """The filter a parameter belongs to, or None for the engines'."""
    group = BY_NAME[name].group
    return group[len("filter:"):] if group.startswith("filter:") else None


def parse_assignment(name, text):
    """Parse one KEY=VALUE; raise UsageError naming the parameter (and
    the filter whose it is)."""
    param = BY_NAME.get(name)
    if param is None:
        raise UsageError("%s: unknown parameter: no filter or engine takes "
                         "it (see --help for the list of parameters)"
                         % name)
    try:
        return param.parse(text)
    except ValueError as e:
        shown = "***" if name in ("password", "cookie") else text
        owner = filter_of(name)
        raise UsageError("%s%s: %r %s" % (
            name, " (--filter=%s)" % owner if owner else "", shown, e))


def is_remote(values):
    """True when the parameters describe a remote (ESXi/vCenter) disk."""
    return any(values.get(name) is not None for name in REMOTE_PARAMS)


def check_disk(values):
    """The checks of file= and create= that hold whichever engine serves
    the disk; the CLI runs them before an engine is chosen, and each
    backend again, since backends are also built without the CLI."""
    if is_remote(values):
        if values.get("create"):
            raise UsageError("create: only local files can be created (drop "
                             "create=true, or drop the remote parameters)")
        return
    path = values.get("file")
    if path is None:
        raise UsageError("file: no disk given (name the VMDK by its absolute "
                         "path, for example /var/tmp/disk.vmdk)")
    if not os.path.isabs(path):
        raise UsageError("file: %r is a relative path (local disks need an "
                         "absolute path, such as %s)"
                         % (path, os.path.abspath(path)))
    exists = os.path.lexists(path)
    if values.get("create"):
        if exists:
            raise UsageError("file: %s already exists and create=true never "
                             "overwrites (remove it, or drop create=true to "
                             "serve it)" % path)
        if values.get("create-size") is None:
            raise UsageError("create-size: needed with create=true (add "
                             "create-size=SIZE, for example create-size=1G)")
    elif not exists:
        raise UsageError("file: %s does not exist (check the path, or add "
                         "create=true create-size=SIZE to make a new disk)"
                         % path)
    elif os.path.isdir(path):
        raise UsageError("file: %s is a directory (name the .vmdk "
                         "descriptor file)" % path)
    elif not os.path.isfile(path):
        # A FIFO or device would block or mislead the VMDK parser.
        raise UsageError("file: %s is not a regular file (name the .vmdk "
                         "descriptor file)" % path)
