"""The one-file build: tools/build_pyz.py makes a zipapp that runs alone."""

import os
import subprocess
import sys
import zipfile

import pytest

from conftest import ROOT, run


@pytest.fixture(scope="module")
def pyz(tmp_path_factory):
    target = str(tmp_path_factory.mktemp("pyz") / "vddktool.pyz")
    subprocess.check_call([sys.executable,
                           os.path.join(ROOT, "tools", "build_pyz.py"),
                           "-o", target], stdout=subprocess.DEVNULL)
    return target


def run_pyz(pyz, *args, **kwargs):
    # Run from a directory without the source tree, so nothing but the
    # archive can provide the package.
    kwargs.setdefault("cwd", os.path.dirname(pyz))
    return run([sys.executable, pyz] + list(args), **kwargs)


def test_archive_holds_sources_only(pyz):
    with zipfile.ZipFile(pyz) as z:
        names = z.namelist()
    assert "__main__.py" in names
    assert "vddktool/cli.py" in names
    assert "vddktool/server/__init__.py" in names
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
    assert not [n for n in names if n.startswith("tests/")]


def test_archive_starts_with_a_shebang(pyz):
    with open(pyz, "rb") as f:
        assert f.readline() == b"#!/usr/bin/env python3\n"


def test_version_from_the_archive(pyz):
    from vddktool import __version__
    assert run_pyz(pyz, "--version").stdout.split() == ["vddktool",
                                                        __version__]


def test_archive_creates_and_serves_a_disk(pyz, tmp_path):
    disk = str(tmp_path / "disk.vmdk")
    proc = run_pyz(pyz, "-U", "-", disk, "create=true", "create-size=1M",
                   "--run", 'nbdinfo --size "$uri"')
    assert proc.stdout.strip() == str(1024 * 1024)
    with open(disk, "rb") as f:
        assert f.read(4) == b"KDMV"


def test_archive_reports_user_errors_in_one_line(pyz):
    proc = run_pyz(pyz, "relative.vmdk", check=False)
    assert proc.returncode == 1
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "Traceback" not in proc.stderr
