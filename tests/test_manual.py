"""The manual page documents everything the program accepts."""

import os
import re
import subprocess

from conftest import ROOT, run, vddktool
from vddktool import params

POD = os.path.join(ROOT, "man", "vddktool.pod")
MAN = os.path.join(ROOT, "man", "vddktool.1")


def pod_text():
    with open(POD, encoding="utf-8") as f:
        return f.read()


def pod_items():
    return [line[len("=item "):] for line in pod_text().splitlines()
            if line.startswith("=item ")]


def test_podchecker_is_clean():
    proc = run(["podchecker", "-warnings", "-warnings", POD], check=False)
    assert proc.returncode == 0, proc.stderr
    assert "WARNING" not in proc.stderr and "ERROR" not in proc.stderr, \
        proc.stderr


def test_every_parameter_has_an_item():
    items = pod_items()
    missing = [p.name for p in params.PARAMS
               if not any(re.search(r"B<%s=" % re.escape(p.name), item)
                          for item in items)]
    assert missing == [], "parameters missing from the manual: %s" % missing


def test_every_choice_of_a_parameter_has_an_item():
    items = pod_items()
    missing = []
    for p in params.PARAMS:
        for value in getattr(p.parse, "choices", ()):
            if "B<%s=%s>" % (p.name, value) not in items:
                missing.append("%s=%s" % (p.name, value))
    for name in params.HWVERSIONS:
        if "B<create-hwversion=%s>" % name not in items:
            missing.append("create-hwversion=" + name)
    assert missing == []


def help_options():
    """Every option spelled in --help: '-x' and '--long'."""
    text = vddktool("--help").stdout.split("Parameters:")[0]
    return set(re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", text))


def test_every_option_in_help_has_an_item():
    items = " ".join(pod_items())
    options = help_options()
    assert "--run" in options and "-U" in options  # the parse found them
    missing = sorted(o for o in options if "B<%s>" % o not in items)
    assert missing == [], "options missing from the manual: %s" % missing


def debug_flags_in_the_code():
    """Every NAME in a debug_flag("NAME") call of the package."""
    flags = set()
    for folder, _, files in os.walk(os.path.join(ROOT, "vddktool")):
        for name in files:
            if name.endswith(".py"):
                with open(os.path.join(folder, name), encoding="utf-8") as f:
                    flags.update(re.findall(
                        r"debug_flag\(\s*[\"']([\w.]+)[\"']", f.read()))
    return flags


def test_every_debug_flag_in_the_code_is_documented():
    flags = debug_flags_in_the_code()
    text = pod_text()
    missing = sorted(f for f in flags if "B<-D %s=" % f not in text)
    assert missing == [], "debug flags missing from the manual: %s" % missing


def test_rendered_page_matches_the_pod(tmp_path):
    out = str(tmp_path / "vddktool.1")
    subprocess.check_call([os.path.join(ROOT, "man", "render.sh"), out])
    with open(out, encoding="utf-8") as f:
        fresh = f.read()
    with open(MAN, encoding="utf-8") as f:
        committed = f.read()
    assert fresh == committed, "run man/render.sh and commit man/vddktool.1"
