"""Parameter mistakes with backend=vddk: one line naming the parameter and
the fix, exit status 1, and never a secret."""

import pytest

from conftest import vddktool
from fake_vddk.fixtures import fake_vddk  # noqa: F401
from vddktool import params
from vddktool.engine import UsageError
from vddktool.vddk.backend import VddkBackend

THUMBPRINT = ":".join(["0A"] * 20)

REMOTE = ["server=esxi.example.com", "thumbprint=" + THUMBPRINT,
          "user=root", "password=Secret-Pa55", "vm=moref=2",
          "[datastore1] vm/vm.vmdk"]


def fails_with(fake, tmp_path, *args):
    """Run vddktool; return its single error line."""
    proc = vddktool("-U", str(tmp_path / "sock"), "backend=vddk",
                    "libdir=" + fake.libdir, *args, check=False)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Secret-Pa55" not in proc.stderr
    return lines[0]


@pytest.mark.parametrize("missing", ["thumbprint", "user", "password", "vm"])
def test_remote_connection_names_the_missing_parameter(fake_vddk, tmp_path,
                                                       missing):
    args = [a for a in REMOTE if not a.startswith(missing + "=")]
    line = fails_with(fake_vddk, tmp_path, *args)
    assert line.startswith("vddktool: %s: " % missing)
    assert "(add %s=" % missing in line


def test_remote_connection_needs_a_file_or_an_export(fake_vddk, tmp_path):
    line = fails_with(fake_vddk, tmp_path, *REMOTE[:-1])
    assert line.startswith("vddktool: file: ")
    assert "export=WILDCARD" in line


def test_file_and_export_together_are_refused(fake_vddk, tmp_path):
    line = fails_with(fake_vddk, tmp_path, *REMOTE + ["export=*"])
    assert line.startswith("vddktool: export: ")


def test_cookie_stands_in_for_the_password(fake_vddk):
    settings = params.defaults()
    settings.update(libdir=fake_vddk.libdir, server="vc", user="u",
                    thumbprint=THUMBPRINT, vm="moref=vm-1",
                    cookie=params.Secret("c"), file="[ds] a.vmdk")
    VddkBackend(settings).config_complete()


def test_remote_disk_cannot_be_created(fake_vddk, tmp_path):
    line = fails_with(fake_vddk, tmp_path, *REMOTE + ["create=true",
                                                      "create-size=1M"])
    assert line.startswith("vddktool: create: ")


def test_relative_local_path_is_refused(fake_vddk, tmp_path):
    line = fails_with(fake_vddk, tmp_path, "disk.vmdk")
    assert line.startswith("vddktool: file: ") and "absolute" in line


def _backend(fake, **values):
    settings = params.defaults()
    settings["libdir"] = fake.libdir
    settings.update(values)
    return VddkBackend(settings)


def test_remote_parameters_without_server_need_a_server(fake_vddk):
    # Only the backend sees these together: user= alone makes it remote.
    with pytest.raises(UsageError) as caught:
        _backend(fake_vddk, user="root", file="[ds] a.vmdk").config_complete()
    assert str(caught.value).startswith("server: ")


def test_create_needs_a_size(fake_vddk, tmp_path):
    with pytest.raises(UsageError) as caught:
        _backend(fake_vddk, create=True,
                 file=str(tmp_path / "new.vmdk")).config_complete()
    assert str(caught.value).startswith("create-size: ")


def test_create_refuses_an_existing_file(fake_vddk, tmp_path):
    existing = fake_vddk.local_disk()
    with pytest.raises(UsageError) as caught:
        _backend(fake_vddk, create=True, file=existing,
                 **{"create-size": 1024 * 1024}).config_complete()
    assert str(caught.value).startswith("file: ")
    assert "already exists" in str(caught.value)


def test_failed_create_is_one_line_naming_the_file(fake_vddk, tmp_path):
    target = str(tmp_path / "no-such-dir" / "new.vmdk")
    line = fails_with(fake_vddk, tmp_path, target, "create=true",
                      "create-size=1M")
    assert line.startswith("vddktool: file: cannot create %s: " % target)
    assert "VixDiskLib_Create" in line
