"""The text descriptor of a VMDK: header keys, extent lines, disk database.

A descriptor is either a file of its own (monolithicFlat, split and VMFS
disks, snapshots) or embedded in a hosted sparse file.  Producers differ in
their first line, quoting and padding, so parsing is by key (case-
insensitive) and stops at the first NUL of a padded, rewritten descriptor.

The original lines are kept, so rewriting the CID leaves everything else,
comments included, as the producer wrote it.
"""

import os
import re

from .extent import VmdkError

NO_PARENT_CID = "ffffffff"

ACCESS_MODES = ("RW", "RDONLY", "NOACCESS")

# Extent types: which need a file, which hold flat data.
FLAT_TYPES = ("FLAT", "VMFS", "VMFSRDM", "VMFSRAW")
EXTENT_TYPES = FLAT_TYPES + ("SPARSE", "ZERO", "VMFSSPARSE", "SESPARSE")

# Largest descriptor we read as text: real ones are a few hundred bytes, so
# anything bigger is some other kind of file.
MAX_DESCRIPTOR_BYTES = 1024 * 1024

_EXTENT_RE = re.compile(
    r'^(RW|RDONLY|NOACCESS)\s+(\d+)\s+([A-Za-z]+)'
    r'(?:\s+(?:"([^"]*)"|(\S+))(?:\s+(\d+))?)?\s*$', re.IGNORECASE)
_KEY_RE = re.compile(r'^([A-Za-z0-9_.\-]+)\s*=\s*(.*)$')


class ExtentLine(object):
    """One line `ACCESS SECTORS TYPE ["FILE" [OFFSET]]`."""

    __slots__ = ("access", "sectors", "kind", "filename", "offset")

    def __init__(self, access, sectors, kind, filename=None, offset=0):
        self.access = access
        self.sectors = sectors
        self.kind = kind
        self.filename = filename
        self.offset = offset

    def text(self):
        line = "%s %d %s" % (self.access, self.sectors, self.kind)
        if self.filename is not None:
            line += ' "%s"' % self.filename
            # VMware writes an offset on FLAT lines only; qemu refuses
            # one on VMFS lines.
            if self.kind == "FLAT" or self.offset:
                line += " %d" % self.offset
        return line

    def __repr__(self):
        return "ExtentLine(%r)" % self.text()


def _unquote(value):
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] == '"':
        return value[1:-1]
    return value


class Descriptor(object):
    """A parsed descriptor.  ``header`` and ``ddb`` map lower-case keys to
    unquoted values; ``extents`` is the list of ExtentLine in disk order."""

    def __init__(self, lines, header, extents, ddb, source="descriptor"):
        self.lines = lines
        self.header = header
        self.extents = extents
        self.ddb = ddb
        self.source = source

    # --- reading -----------------------------------------------------------
    @classmethod
    def parse(cls, data, source="descriptor"):
        """Parse text (str or bytes); ``source`` names the file in errors."""
        if isinstance(data, (bytes, bytearray, memoryview)):
            data = bytes(data).split(b"\0", 1)[0]
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError:
                text = data.decode("latin-1")
        else:
            text = data.split("\0", 1)[0]
        lines = text.splitlines()
        header, ddb, extents = {}, {}, []
        for number, raw in enumerate(lines, 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            m = _EXTENT_RE.match(line)
            if m:
                extents.append(cls._extent_from_match(m, source, number))
                continue
            m = _KEY_RE.match(line)
            if m:
                key = m.group(1).lower()
                value = _unquote(m.group(2))
                if key.startswith("ddb."):
                    ddb[key[4:]] = value
                else:
                    header[key] = value
                continue
            raise VmdkError("%s: line %d of the descriptor is neither a "
                            "KEY=VALUE nor an extent line: %.60r"
                            % (source, number, line))
        if not extents:
            raise VmdkError("%s: the descriptor has no extent lines"
                            % source)
        return cls(lines, header, extents, ddb, source)

    @staticmethod
    def _extent_from_match(m, source, number):
        access = m.group(1).upper()
        kind = m.group(3).upper()
        if kind not in EXTENT_TYPES:
            raise VmdkError("%s: line %d: extent type %s is not supported "
                            "(supported: %s)" % (source, number, kind,
                                                 ", ".join(EXTENT_TYPES)))
        filename = m.group(4) if m.group(4) is not None else m.group(5)
        if kind != "ZERO" and not filename:
            raise VmdkError("%s: line %d: a %s extent needs a file name"
                            % (source, number, kind))
        offset = int(m.group(6) or 0)
        return ExtentLine(access, int(m.group(2)), kind, filename, offset)

    def get(self, key, default=None):
        return self.header.get(key.lower(), default)

    @property
    def create_type(self):
        return self.get("createType", "")

    @property
    def cid(self):
        return self.get("CID", "")

    @property
    def parent_cid(self):
        return self.get("parentCID", NO_PARENT_CID).lower()

    @property
    def parent_hint(self):
        return self.get("parentFileNameHint")

    @property
    def sectors(self):
        return sum(e.sectors for e in self.extents)

    # --- writing -----------------------------------------------------------
    def set(self, key, value):
        """Change (or add) a header key, keeping every other line as is."""
        low = key.lower()
        for i, raw in enumerate(self.lines):
            m = _KEY_RE.match(raw.strip())
            if m and m.group(1).lower() == low:
                self.lines[i] = "%s=%s" % (m.group(1), value)
                break
        else:
            self.lines.insert(self._header_end(), "%s=%s" % (key, value))
        self.header[low] = _unquote(value)

    def _header_end(self):
        """Index after the last header KEY=VALUE line (before the extents)."""
        end = 0
        for i, raw in enumerate(self.lines):
            line = raw.strip()
            if _EXTENT_RE.match(line):
                break
            m = _KEY_RE.match(line)
            if m and not m.group(1).lower().startswith("ddb."):
                end = i + 1
        return end

    def text(self):
        return "\n".join(self.lines) + "\n"

    def encode(self):
        return self.text().encode("utf-8")


def same_cid(one, other):
    """CIDs are 32-bit numbers in hex, written with or without leading
    zeros (VMware pads them to 8 digits, qemu-img does not)."""
    try:
        return int(one, 16) == int(other, 16)
    except ValueError:
        return one.lower() == other.lower()


def new_cid():
    """A random content id; never the values that mean "no parent"."""
    while True:
        value = "%08x" % int.from_bytes(os.urandom(4), "little")
        if value not in ("ffffffff", "fffffffe", "00000000"):
            return value


def build(create_type, extents, ddb, parent_cid=NO_PARENT_CID,
          parent_hint=None, cid=None):
    """A new descriptor in the layout VMware writes."""
    lines = ["# Disk DescriptorFile", "version=1", 'encoding="UTF-8"',
             "CID=%s" % (cid or new_cid()), "parentCID=%s" % parent_cid,
             'createType="%s"' % create_type]
    if parent_hint is not None:
        lines.append('parentFileNameHint="%s"' % parent_hint)
    lines += ["", "# Extent description"]
    lines += [e.text() for e in extents]
    lines += ["", "# The Disk Data Base", "#DDB", ""]
    lines += ['ddb.%s = "%s"' % (key, value) for key, value in ddb]
    return Descriptor.parse("\n".join(lines) + "\n")
