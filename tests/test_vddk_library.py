"""Finding and loading libvixDiskLib, and --dump-plugin's VDDK lines."""

import os
import subprocess

import pytest

from conftest import vddktool
from fake_vddk.fixtures import fake_vddk, make_fake_vddk  # noqa: F401
from vddktool.backends import choose_backend
from vddktool.engine import UsageError
from vddktool.vddk.backend import VddkBackend
from vddktool.vddk.library import (DEFAULT_LIBDIR, Library, find_library,
                                   library_name)


def touch(path):
    directory = os.path.dirname(path)
    if not os.path.isdir(directory):
        os.makedirs(directory)
    open(path, "wb").close()
    return path


# -- find_library (it only looks at file names)


def test_newest_major_wins(tmp_path):
    libdir = str(tmp_path)
    touch(os.path.join(libdir, "lib64", library_name(7)))
    newest = touch(os.path.join(libdir, "lib64", library_name(9)))
    assert find_library(libdir) == (newest, 9)


def test_lib64_is_preferred_to_libdir_itself(tmp_path):
    libdir = str(tmp_path)
    touch(os.path.join(libdir, library_name(8)))
    in_lib64 = touch(os.path.join(libdir, "lib64", library_name(8)))
    assert find_library(libdir) == (in_lib64, 8)


def test_library_directly_in_libdir_is_found(tmp_path):
    path = touch(os.path.join(str(tmp_path), library_name(6)))
    assert find_library(str(tmp_path)) == (path, 6)


@pytest.mark.parametrize("name", ["libvixDiskLib.so.5", "libvixDiskLib.so",
                                  "libvixDiskLib.so.8.0.1"])
def test_other_names_are_not_vddk(tmp_path, name):
    touch(os.path.join(str(tmp_path), "lib64", name))
    assert find_library(str(tmp_path)) is None


def test_default_libdir_is_nbdkits():
    assert DEFAULT_LIBDIR == "/usr/lib64/vmware-vix-disklib"


def test_auto_backend_picks_vddk_when_the_library_is_there(fake_vddk):
    assert choose_backend({"backend": "auto", "libdir": fake_vddk.libdir,
                           "file": "/x.vmdk"}) is VddkBackend


# -- loading


@pytest.mark.parametrize("major", [6, 7, 8, 9])
def test_every_major_loads(make_fake_vddk, major):
    fake = make_fake_vddk(major=major)
    lib = Library(fake.library, major)
    assert lib.has("QueryAllocatedBlocks") and lib.has("Wait")


def test_old_library_lacks_only_the_optional_functions(make_fake_vddk):
    fake = make_fake_vddk(major=6, optional=False)
    lib = Library(fake.library, 6)
    for name in ("QueryAllocatedBlocks", "FreeBlockList",
                 "AllocateConnectParams"):
        assert not lib.has(name), name
    assert lib.has("ReadAsync")


def test_library_without_required_functions_is_refused(tmp_path):
    source = tmp_path / "empty.c"
    source.write_text("int VixDiskLib_Exit;\n")
    path = str(tmp_path / library_name(8))
    subprocess.check_call(["gcc", "-shared", "-fPIC", "-o", path,
                           str(source)])
    with pytest.raises(UsageError) as caught:
        Library(path, 8)
    message = str(caught.value)
    assert message.startswith("libdir: ")
    assert "VixDiskLib_InitEx" in message and "VixDiskLib_Wait" in message
    assert "LIBRARY LOCATION" in message


def test_unloadable_file_is_refused(tmp_path):
    path = touch(os.path.join(str(tmp_path), "lib64", library_name(8)))
    with pytest.raises(UsageError) as caught:
        Library(path, 8)
    assert "cannot load" in str(caught.value)


def test_missing_library_is_one_line_pointing_at_the_manual(tmp_path):
    disk = tmp_path / "disk.raw"
    disk.write_bytes(bytes(4096))
    proc = vddktool("-U", str(tmp_path / "sock"), "backend=vddk",
                    "libdir=" + str(tmp_path / "nowhere"), str(disk),
                    check=False)
    assert proc.returncode == 1
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("vddktool: libdir: ")
    assert "LIBRARY LOCATION" in lines[0]
    assert "Traceback" not in proc.stderr


def test_broken_library_is_one_line_at_start_up(tmp_path):
    libdir = tmp_path / "vddk"
    touch(os.path.join(str(libdir), "lib64", library_name(9)))
    disk = tmp_path / "disk.raw"
    disk.write_bytes(bytes(4096))
    proc = vddktool("-U", str(tmp_path / "sock"), "backend=vddk",
                    "libdir=" + str(libdir), str(disk), check=False)
    assert proc.returncode == 1
    assert len(proc.stderr.splitlines()) == 1, proc.stderr
    assert "libdir: cannot load" in proc.stderr


# -- --dump-plugin


def dump_plugin(*args):
    lines = vddktool("--dump-plugin", *args).stdout.splitlines()
    return dict(line.split("=", 1) for line in lines)


@pytest.mark.parametrize("major", [6, 7, 8, 9])
def test_dump_plugin_reports_the_library(make_fake_vddk, major):
    fake = make_fake_vddk(major=major)
    facts = dump_plugin("libdir=" + fake.libdir)
    assert facts["vddk_default_libdir"] == DEFAULT_LIBDIR
    assert facts["vddk_has_nfchostport"] == "1"
    assert facts["vddk_library_version"] == str(major)
    assert facts["vddk_dll"] == os.path.realpath(fake.library)
    assert facts["vddk_transport_modes"] == "file:san:hotadd:nbdssl:nbd"
    for name in ("VixDiskLib_Open", "VixDiskLib_ReadAsync",
                 "VixDiskLib_Flush", "VixDiskLib_QueryAllocatedBlocks"):
        assert facts[name] == "1", name


def test_dump_plugin_leaves_out_missing_functions(make_fake_vddk):
    fake = make_fake_vddk(major=6, optional=False)
    facts = dump_plugin("libdir=" + fake.libdir)
    assert facts["VixDiskLib_Wait"] == "1"
    assert "VixDiskLib_QueryAllocatedBlocks" not in facts
    assert "VixDiskLib_AllocateConnectParams" not in facts


def test_dump_plugin_without_a_library(tmp_path):
    facts = dump_plugin("libdir=" + str(tmp_path))
    assert facts["vddk_default_libdir"] == DEFAULT_LIBDIR
    assert "vddk_library_version" not in facts
    assert not [k for k in facts if k.startswith("VixDiskLib_")]


def test_dump_plugin_finds_a_library_directly_in_libdir(make_fake_vddk):
    fake = make_fake_vddk(major=7, subdir="")
    assert dump_plugin("libdir=" + fake.libdir)["vddk_library_version"] \
        == "7"
