"""The text descriptor: parsing by key, extent lines, rewriting the CID."""

import pytest

from vddktool.vmdk.descriptor import Descriptor, ExtentLine, build
from vddktool.vmdk.extent import VmdkError

VMWARE_STYLE = (
    b"# Disk DescriptorFile\n"
    b"version=1\n"
    b"CID=0a1b2c3d\n"
    b"parentCID=ffffffff\n"
    b"createType=\"twoGbMaxExtentFlat\"\n"
    b"\n"
    b"# Extent description\n"
    b"RW 4192256 FLAT \"disk-f001.vmdk\" 0\n"
    b"RDONLY 2048 FLAT \"disk-f002.vmdk\" 16\n"
    b"RW 100 ZERO\n"
    b"NOACCESS 8 VMFS \"disk-f003.vmdk\"\n"
    b"\n"
    b"ddb.adapterType = \"lsilogic\"\n"
    b"ddb.virtualHWVersion = \"7\"\n")


def test_extent_lines_are_parsed_in_order():
    desc = Descriptor.parse(VMWARE_STYLE)
    got = [(e.access, e.sectors, e.kind, e.filename, e.offset)
           for e in desc.extents]
    assert got == [("RW", 4192256, "FLAT", "disk-f001.vmdk", 0),
                   ("RDONLY", 2048, "FLAT", "disk-f002.vmdk", 16),
                   ("RW", 100, "ZERO", None, 0),
                   ("NOACCESS", 8, "VMFS", "disk-f003.vmdk", 0)]
    assert desc.sectors == 4192256 + 2048 + 100 + 8


def test_keys_are_case_insensitive_and_unquoted():
    desc = Descriptor.parse(b"cid=00000001\nPARENTCID=FFFFFFFF\n"
                            b"CreateType=monolithicSparse\n"
                            b"rw 10 sparse \"x.vmdk\"\n"
                            b"DDB.AdapterType = \"ide\"\n")
    assert desc.cid == "00000001"
    assert desc.parent_cid == "ffffffff"
    assert desc.create_type == "monolithicSparse"
    assert desc.ddb["adaptertype"] == "ide"
    assert desc.extents[0].access == "RW"
    assert desc.extents[0].kind == "SPARSE"


def test_parsing_stops_at_the_first_nul():
    padded = VMWARE_STYLE + b"\0" * 300 + b"garbage that is not a line\n"
    assert len(Descriptor.parse(padded).extents) == 4


def test_setting_the_cid_keeps_every_other_line():
    desc = Descriptor.parse(VMWARE_STYLE)
    desc.set("CID", "deadbeef")
    before = VMWARE_STYLE.decode().splitlines()
    after = desc.text().splitlines()
    assert after[2] == "CID=deadbeef"
    assert after[:2] + after[3:] == before[:2] + before[3:]
    assert Descriptor.parse(desc.encode()).cid == "deadbeef"


def test_a_line_that_is_neither_key_nor_extent_is_refused():
    with pytest.raises(VmdkError) as err:
        Descriptor.parse(b"version=1\nRW 10 FLAT \"a\" 0\nthis is junk\n",
                         "/d/x.vmdk")
    assert "/d/x.vmdk" in str(err.value) and "line 3" in str(err.value)


def test_a_descriptor_without_extents_is_refused():
    with pytest.raises(VmdkError, match="no extent lines"):
        Descriptor.parse(b"version=1\nCID=12345678\n", "/d/y.vmdk")


def test_unknown_extent_types_are_refused():
    with pytest.raises(VmdkError, match="VMFSMAGIC"):
        Descriptor.parse(b"RW 10 VMFSMAGIC \"a\"\n")


def test_built_descriptor_round_trips():
    desc = build("monolithicFlat",
                 [ExtentLine("RW", 2048, "FLAT", "a-flat.vmdk", 0)],
                 [("adapterType", "buslogic"), ("virtualHWVersion", "4")])
    again = Descriptor.parse(desc.encode())
    assert again.create_type == "monolithicFlat"
    assert again.parent_cid == "ffffffff"
    assert len(again.cid) == 8 and again.cid != "ffffffff"
    assert again.ddb == {"adaptertype": "buslogic", "virtualhwversion": "4"}
    assert again.extents[0].text() == 'RW 2048 FLAT "a-flat.vmdk" 0'


def test_cids_compare_as_numbers_padded_or_not():
    from vddktool.vmdk.descriptor import same_cid
    # qemu-img writes e610719 where VMware writes 0e610719.
    assert same_cid("e610719", "0e610719")
    assert same_cid("0E610719", "e610719")
    assert not same_cid("e610719", "e61071a")
    assert not same_cid("fffffffe", "ffffffff")
