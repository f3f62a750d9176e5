"""The command line: --help, --version, --dump-plugin, and one clear line
(exit 1, no traceback) for every kind of mistake."""

import os
import re

import pytest

from conftest import CLIENT_ENV, vddktool
from fake_vddk.fixtures import fake_vddk  # noqa: F401 (a fixture)
from vddktool import __version__, cli, params
from vddktool.engine import UsageError


def fails(*args, **kwargs):
    """Run vddktool expecting a user mistake; return its one error line."""
    proc = vddktool(*args, check=False, **kwargs)
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("vddktool: "), lines[0]
    assert proc.stdout == ""
    return lines[0]


@pytest.fixture
def disk(tmp_path):
    """An existing file for parameters that only need file= to exist."""
    path = tmp_path / "disk.vmdk"
    path.write_bytes(b"")
    return str(path)


# ---------------------------------------------------------------------------
# --help, --version, --dump-plugin


def test_version_prints_name_and_version():
    assert vddktool("--version").stdout == "vddktool %s\n" % __version__
    assert vddktool("-V").stdout == "vddktool %s\n" % __version__


def test_help_lists_every_parameter_with_its_summary():
    text = vddktool("--help").stdout
    for param in params.PARAMS:
        assert re.search(r"(?<![\w-])%s=\]?%s" % (
            re.escape(param.name), re.escape(param.metavar)), text), param.name
        assert param.summary in text, param.name


def test_help_lists_the_server_options():
    text = vddktool("-h").stdout
    for option in ("--unix", "--port", "--run", "--single", "--pidfile",
                   "--exit-with-parent", "--readonly", "--exportname",
                   "--threads", "--debug", "--log", "--dump-plugin"):
        assert option in text, option


def test_dump_plugin_prints_the_generic_lines():
    lines = vddktool("--dump-plugin").stdout.splitlines()
    assert lines[0].startswith("path=/")
    assert "name=vddk" in lines
    assert "version=%s" % __version__ in lines
    assert "thread_model=parallel" in lines
    assert "magic_config_key=file" in lines
    assert "has_pread=1" in lines
    assert all(re.match(r"^[\w.]+=", line) for line in lines), lines


def test_dump_plugin_without_vddk_still_prints_the_vddk_facts(tmp_path):
    lines = vddktool("vddk", "--dump-plugin",
                     "libdir=%s" % tmp_path).stdout.splitlines()
    assert "name=vddk" in lines
    assert "vddk_has_nfchostport=1" in lines
    assert not any(line.startswith("vddk_library_version=")
                   for line in lines)


def test_dump_plugin_reports_the_loaded_library(fake_vddk):
    lines = vddktool("--dump-plugin", "libdir=" + fake_vddk.libdir,
                     env=dict(CLIENT_ENV, **fake_vddk.env)).stdout.splitlines()
    assert lines.index("name=vddk") < lines.index("vddk_library_version=8")
    assert "vddk_dll=%s" % fake_vddk.library in lines


# ---------------------------------------------------------------------------
# options


def test_unknown_option():
    assert fails("--no-such-option").startswith(
        "vddktool: --no-such-option: unknown option")


def test_option_without_its_value():
    assert fails("/x", "-U").startswith("vddktool: -U: needs a value")


@pytest.mark.parametrize("port", ["0", "65536", "ten", "-1x"])
def test_bad_port(port):
    assert fails("-p", port, "/x").startswith("vddktool: -p: ")


@pytest.mark.parametrize("threads", ["many", "-3", "1.5"])
def test_bad_threads(threads):
    assert fails("--threads=" + threads, "/x").startswith(
        "vddktool: --threads: ")


@pytest.mark.parametrize("flag", ["vddk", "vddk.stats", "vddk.stats=x",
                                  ".x=1"])
def test_bad_debug_flag(flag):
    assert fails("-D", flag, "/x").startswith("vddktool: -D: ")


def test_bad_log_destination():
    assert "--log: 'files' is not one of" in fails("--log=files", "/x")


def test_unknown_tls_mode():
    assert fails("--tls=maybe", "/x").startswith("vddktool: --tls: ")


def test_an_unknown_filter_is_refused_by_name():
    assert fails("--filter=cache", "/x").startswith(
        "vddktool: --filter=cache: no such filter")


def test_oldstyle_is_refused():
    assert fails("-o", "/x").startswith("vddktool: -o: the oldstyle")


def test_export_name_longer_than_nbd_allows():
    assert fails("-e", "x" * 4097, "/x").startswith("vddktool: -e: ")


@pytest.mark.parametrize("args,named", [
    (["-s", "-U", "SOCK"], "-U"),
    (["-s", "-p", "10999"], "-p"),
    (["-s", "--run", "true"], "--run"),
    (["-U", "SOCK", "-p", "10999"], "-p"),
    (["-U", "SOCK", "-i", "127.0.0.1"], "-i"),
])
def test_conflicting_options(tmp_path, disk, args, named):
    args = [str(tmp_path / "s") if a == "SOCK" else a for a in args]
    line = fails(*(args + [disk]))
    assert named in line and "cannot be combined" in line, line


def test_combined_short_flags_and_intermixed_parameters():
    options = cli.parse_command_line(
        ["vddk", "-rfv", "/d.vmdk", "-t", "4", "single-link=true",
         "--exportname=x"])
    assert options.readonly and options.foreground and options.verbose
    assert options.threads == 4 and options.export_name == "x"
    assert options.values["file"] == "/d.vmdk"
    assert options.values["single-link"] is True


def test_debug_flags_are_parsed_as_integers():
    options = cli.parse_command_line(["-D", "vddk.stats=1",
                                      "--debug=nbdkit.backend.datapath=0x0"])
    assert options.debug_flags == [("vddk.stats", 1),
                                   ("nbdkit.backend.datapath", 0)]


def test_port_may_be_a_service_name():
    options = cli.parse_command_line(["-p", "nbd", "/x"])
    assert options.port == 10809


def test_relative_pidfile_is_made_absolute(tmp_path):
    options = cli.parse_command_line(["-P", "run/v.pid"])
    assert options.pidfile == os.path.abspath("run/v.pid")


# ---------------------------------------------------------------------------
# parameters


def test_unknown_parameter():
    assert fails("/x", "colour=blue").startswith(
        "vddktool: colour: unknown parameter")


@pytest.mark.parametrize("threads,count", [("0", cli.DEFAULT_THREADS),
                                           ("1", 1), ("64", 64)])
def test_threads_0_means_the_default(threads, count):
    assert cli.parse_command_line(["-t", threads, "/d.vmdk"]).threads == \
        count


def test_a_parameter_given_twice_takes_the_last_value():
    # Wrappers append overrides to a command line, as with nbdkit.
    options = cli.parse_command_line(
        ["/a.vmdk", "single-link=true", "file=/b.vmdk", "single-link=false",
         "/c.vmdk"])
    assert options.values["file"] == "/c.vmdk"
    assert options.values["single-link"] is False
    assert options.given == ["file", "single-link"]
    assert options.repeated == ["file", "single-link", "file"]


def test_bad_parameter_value_names_the_parameter(disk):
    line = fails(disk, "create-type=floppy")
    assert line.startswith("vddktool: create-type: 'floppy' is not one of")


def test_bad_size_names_the_parameter(tmp_path):
    line = fails(str(tmp_path / "n.vmdk"), "create=true",
                 "create-size=12Q")
    assert line.startswith("vddktool: create-size: '12Q' is not a size")


def test_bad_password_fd_never_shows_the_password():
    line = fails("password=-77", "server=esx", "/x")
    assert line.startswith("vddktool: password: ")
    assert "77" in line and "'-77'" not in line


def test_password_value_is_never_echoed():
    proc = vddktool("-v", "password=hunter2secret", "server=esx",
                    "[ds] vm/vm.vmdk", check=False)
    assert proc.returncode == 1
    assert "hunter2secret" not in proc.stderr + proc.stdout


def test_no_disk_given():
    assert fails().startswith("vddktool: file: no disk given")


def test_relative_local_path():
    line = fails("disk.vmdk")
    assert line.startswith("vddktool: file: 'disk.vmdk' is a relative path")


def test_missing_file(tmp_path):
    missing = str(tmp_path / "missing.vmdk")
    line = fails(missing)
    assert line == ("vddktool: file: %s does not exist (check the path, or "
                    "add create=true create-size=SIZE to make a new disk)"
                    % missing)


def test_create_refuses_an_existing_file(disk):
    line = fails(disk, "create=true", "create-size=1M")
    assert line.startswith("vddktool: file: %s already exists" % disk)


def test_create_needs_a_size(tmp_path):
    line = fails(str(tmp_path / "new.vmdk"), "create=true")
    assert line.startswith("vddktool: create-size: needed with create=true")


def test_create_is_local_only():
    line = fails("[ds] vm/vm.vmdk", "server=esx", "create=true",
                 "create-size=1M")
    assert line.startswith("vddktool: create: only local files")


def test_remote_file_name_is_not_a_local_path():
    """'[datastore] dir/name.vmdk' is relative-looking but remote: the
    path checks must not reject it (whatever the backend says next)."""
    params.check_disk(dict(params.defaults(), file="[ds1] vm/vm.vmdk",
                           server="esx.example.com"))


def test_file_name_with_equals_sign_is_the_magic_parameter():
    options = cli.parse_command_line(["/vms/a=b.vmdk"])
    assert options.values["file"] == "/vms/a=b.vmdk"


def test_plugin_word_is_only_skipped_first():
    with pytest.raises(UsageError):
        params.check_disk(cli.parse_command_line(["vddk", "vddk"]).values)


def test_backend_native_with_a_remote_disk_is_refused():
    line = fails("backend=native", "server=esx", "[ds] a/a.vmdk")
    assert line.startswith("vddktool: backend=native serves local files")
