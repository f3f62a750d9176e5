"""export=WILDCARD matching: fnmatch(3) rules with backslash escapes."""

import pytest

from vddktool.vddk.wildcard import climbs_out, wildcard_matches

MANUAL_WILDCARD = r"\[datastore1\] Fedora/*.vmdk"


@pytest.mark.parametrize("name", [
    "[datastore1] Fedora/Fedora.vmdk",
    "[datastore1] Fedora/Fedora-flat.vmdk",
    "[datastore1] Fedora/.vmdk",
    "[datastore1] Fedora/sub/dir.vmdk",     # '*' crosses '/' as in fnmatch
])
def test_manual_wildcard_matches(name):
    assert wildcard_matches(MANUAL_WILDCARD, name)


@pytest.mark.parametrize("name", [
    "[datastore2] Fedora/Fedora.vmdk",
    "datastore1 Fedora/Fedora.vmdk",
    "[datastore1] Fedora/Fedora.vmdk.bak",
    "[datastore1] fedora/Fedora.vmdk",
    "",
])
def test_manual_wildcard_refuses(name):
    assert not wildcard_matches(MANUAL_WILDCARD, name)


def test_unescaped_brackets_are_a_character_class():
    assert wildcard_matches("[datastore1] x", "d x")
    assert not wildcard_matches("[datastore1] x", "[datastore1] x")


@pytest.mark.parametrize("pattern,name,expected", [
    ("disk?.vmdk", "disk1.vmdk", True),
    ("disk?.vmdk", "disk12.vmdk", False),
    ("disk[0-3].vmdk", "disk2.vmdk", True),
    ("disk[0-3].vmdk", "disk7.vmdk", False),
    ("disk[!0-3].vmdk", "disk7.vmdk", True),
    ("disk[^0-3].vmdk", "disk2.vmdk", False),
    ("a\\*b", "a*b", True),
    ("a\\*b", "axb", False),
    ("[]]", "]", True),
    ("a[", "a[", True),
    ("a.b", "axb", False),
    ("(x)+", "(x)+", True),
])
def test_wildcard_rules(pattern, name, expected):
    assert wildcard_matches(pattern, name) is expected


@pytest.mark.parametrize("name,climbs", [
    ("[datastore1] Fedora/../Other/Other.vmdk", True),
    ("[datastore1] ../x.vmdk", True),
    ("[datastore1] Fedora/..", True),
    ("/data/../etc/shadow", True),
    ("[datastore1] Fedora/Fedora..vmdk", False),
    ("[datastore1] Fedora/Fedora.vmdk", False),
])
def test_a_dot_dot_component_is_seen(name, climbs):
    assert climbs_out(name) is climbs
