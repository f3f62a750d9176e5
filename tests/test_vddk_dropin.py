"""Command lines written for nbdkit's VDDK plugin behave the same here:
the thumbprint procedure of the manual, and open failures that name the
disk.  Against the fake VDDK."""

import sys

import pytest

from conftest import CLIENT_ENV, ROOT, need, run
from fake_vddk.fixtures import fake_vddk  # noqa: F401

REAL_THUMBPRINT = ("B2:31:BD:DE:9F:DB:9D:E0:78:EF:30:42:8A:41:B0:28:92:93:"
                   "C8:DD")
REAL_SHA256 = ":".join(["5C"] * 32)


def remote_command(fake, thumbprint, *options):
    """vddktool run as the manual's THUMBPRINTS section does: a remote
    disk, -f, --run with a client; the fake's server has REAL_THUMBPRINT
    unless the test says otherwise."""
    name = fake.remote_disk(size=1024 * 1024)
    fake.env.setdefault("FAKE_VDDK_EXPECT_THUMBPRINT", REAL_THUMBPRINT)
    return [sys.executable, "-m", "vddktool", "-f", "-U", "-"] \
        + list(options) + [
            "backend=vddk", "libdir=" + fake.libdir,
            "server=esxi.example.com", "user=root", "password=vmware",
            "vm=moref=2", "thumbprint=" + thumbprint, name,
            "--run", "%s --size \"$uri\"" % need("nbdinfo")]


def run_remote(fake, thumbprint, *options):
    return run(remote_command(fake, thumbprint, *options), check=False,
               env=dict(CLIENT_ENV, **fake.env), cwd=ROOT)


# -- 1. the thumbprint procedure


def test_wrong_thumbprint_on_purpose_reveals_the_real_one(fake_vddk):
    # The manual's trick, word for word: thumbprint=12 with -v.
    proc = run_remote(fake_vddk, "12", "-v")
    assert proc.returncode != 0
    assert ("actual thumbprint=%s expected=12" % REAL_THUMBPRINT) \
        in proc.stderr
    assert "Traceback" not in proc.stderr
    assert fake_vddk.calls("ConnectEx")[-1]["thumbPrint"] == "12"


def test_the_real_thumbprint_reaches_the_user_without_v(fake_vddk):
    proc = run_remote(fake_vddk, "12")
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines()
              if "actual thumbprint=" in line]
    assert len(errors) == 1, proc.stderr
    assert REAL_THUMBPRINT in errors[0]
    assert "vmware" not in proc.stderr


def test_a_value_unlike_a_thumbprint_is_noted_under_v(fake_vddk):
    proc = run_remote(fake_vddk, "12", "-v")
    assert "thumbprint=12 is not a SHA-1 or SHA-256 fingerprint" \
        in proc.stderr


@pytest.mark.parametrize("given", [
    REAL_THUMBPRINT.replace(":", ""), REAL_THUMBPRINT.lower(), REAL_SHA256,
    REAL_SHA256.replace(":", "")])
def test_other_thumbprint_forms_reach_vddk_as_given(fake_vddk, given):
    fake_vddk.expect(thumbprint=given)
    proc = run_remote(fake_vddk, given, "-v")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(1024 * 1024)
    assert fake_vddk.calls("ConnectEx")[-1]["thumbPrint"] == given
    assert "is not a SHA-1 or SHA-256" not in proc.stderr


def test_the_right_thumbprint_connects(fake_vddk):
    proc = run_remote(fake_vddk, REAL_THUMBPRINT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(1024 * 1024)


def test_an_empty_thumbprint_is_refused(fake_vddk):
    proc = run_remote(fake_vddk, "")
    assert proc.returncode == 1
    assert proc.stderr.startswith("vddktool: thumbprint: '' is empty")
    assert len(proc.stderr.splitlines()) == 1


# -- 8. open failures name the disk


def test_open_failure_names_the_disk(fake_vddk):
    fake_vddk.fail_open()
    proc = run_remote(fake_vddk, REAL_THUMBPRINT)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines()
             if "VixDiskLib_Open" in line]
    assert len(lines) == 1, proc.stderr
    assert "cannot open [datastore1] vm/vm.vmdk: VixDiskLib_Open" in lines[0]
