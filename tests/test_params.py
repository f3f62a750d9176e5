"""The parameter table: parsers accept what nbdkit's VDDK plugin accepts and
refuse the rest with a message naming the parameter."""

import os

import pytest

from vddktool import params
from vddktool.engine import UsageError


@pytest.mark.parametrize("text,value", [
    ("512", 512), ("1K", 1024), ("1k", 1024), ("100M", 100 << 20),
    ("2G", 2 << 30), ("1T", 1 << 40), ("3MiB", 3 << 20), ("4KB", 4096),
    (" 8M ", 8 << 20),
])
def test_sizes(text, value):
    assert params.parse_size(text) == value


@pytest.mark.parametrize("text", ["", "12Q", "-1", "1.5G", "M", "1 0"])
def test_bad_sizes(text):
    with pytest.raises(ValueError):
        params.parse_size(text)


def test_create_size_must_be_whole_sectors():
    assert params.parse_create_size("1M") == 1 << 20
    with pytest.raises(UsageError) as e:
        params.parse_assignment("create-size", "1000")
    assert str(e.value).startswith("create-size: '1000'")
    assert "multiple of 512" in str(e.value)


@pytest.mark.parametrize("text,value", [
    ("true", True), ("1", True), ("yes", True), ("on", True),
    ("false", False), ("0", False), ("no", False), ("off", False)])
def test_booleans(text, value):
    assert params.parse_bool(text) is value


def test_bad_boolean_names_the_parameter():
    with pytest.raises(UsageError) as e:
        params.parse_assignment("single-link", "maybe")
    assert str(e.value).startswith("single-link:")


def test_hwversion_names_and_numbers():
    assert params.parse_hwversion("workstation5") == 4
    assert params.parse_hwversion("esx65") == 13
    assert params.parse_hwversion("21") == 21
    with pytest.raises(ValueError):
        params.parse_hwversion("esx99")
    with pytest.raises(ValueError):
        params.parse_hwversion("70000")


def test_thumbprint_goes_to_vddk_as_given():
    # VDDK judges it: "12" on purpose is the manual's way to learn the
    # real one from VDDK's error.
    for given in ("12", ":".join(["ab"] * 20), "AB" * 32, "anything"):
        assert params.parse_thumbprint(given) == given
    with pytest.raises(ValueError):
        params.parse_thumbprint("")


@pytest.mark.parametrize("text,looks", [
    (":".join(["ab"] * 20), True), ("AB" * 20, True),
    (":".join(["5C"] * 32), True), ("5c" * 32, True),
    ("12", False), (":".join(["ab"] * 19), False), ("zz" * 20, False),
    (":".join(["ab"] * 21), False), ("ab:" * 20, False), ("A" * 41, False),
])
def test_what_looks_like_a_thumbprint(text, looks):
    assert params.looks_like_thumbprint(text) is looks


def test_vm_needs_moref_prefix():
    assert params.parse_vm("moref=vm-16") == "moref=vm-16"
    for bad in ("vm-16", "moref="):
        with pytest.raises(ValueError):
            params.parse_vm(bad)


def test_transports_are_a_colon_list():
    assert params.parse_transports("nbdssl:nbd") == "nbdssl:nbd"
    with pytest.raises(ValueError):
        params.parse_transports("nbd::san")


def test_choices_are_listed_in_the_error():
    with pytest.raises(UsageError) as e:
        params.parse_assignment("create-type", "qcow2")
    assert "monolithic-sparse" in str(e.value)
    assert "vmfs-sparse" in str(e.value)


def test_unknown_parameter():
    with pytest.raises(UsageError) as e:
        params.parse_assignment("sever", "x")
    assert str(e.value).startswith("sever: unknown parameter: no filter or "
                                   "engine takes it")


def test_password_literal_is_hidden_from_repr():
    secret = params.parse_assignment("password", "hunter2")
    assert secret.value == "hunter2"
    assert "hunter2" not in repr(secret) and "hunter2" not in str(secret)


def test_password_from_file_drops_one_newline(tmp_path):
    path = tmp_path / "pw"
    path.write_bytes(b"s3cret\n")
    assert params.parse_assignment("password", "+" + str(path)).value == \
        "s3cret"


def test_password_from_missing_file_does_not_echo_anything_secret(tmp_path):
    with pytest.raises(UsageError) as e:
        params.parse_assignment("password", "+" + str(tmp_path / "nope"))
    assert str(e.value).startswith("password:")
    assert "nope" in str(e.value)


def test_password_from_fd():
    r, w = os.pipe()
    os.write(w, b"from-a-pipe\n")
    os.close(w)
    assert params.parse_assignment("password", "-%d" % r).value == \
        "from-a-pipe"
    with pytest.raises(OSError):
        os.fstat(r)  # read to the end and closed


@pytest.mark.parametrize("content", [b"secret\n\n", b"secret\nsecond",
                                     b"secret", b"secret\n"])
def test_password_file_gives_its_first_line(tmp_path, content):
    path = tmp_path / "pw"
    path.write_bytes(content)
    assert params.parse_assignment("password", "+" + str(path)).value == \
        "secret"


def test_password_fd_gives_its_first_line():
    r, w = os.pipe()
    os.write(w, b"secret\n\nnot this\n")
    os.close(w)
    assert params.parse_assignment("password", "-%d" % r).value == "secret"


def test_password_fd_does_not_wait_for_the_writer_to_close():
    # Launchers keep their end of the pipe open while the server runs.
    import threading
    r, w = os.pipe()
    try:
        os.write(w, b"secret\n")
        result = []
        reader = threading.Thread(target=lambda: result.append(
            params.parse_assignment("password", "-%d" % r)))
        reader.daemon = True
        reader.start()
        reader.join(20)
        assert not reader.is_alive(), "password=-FD waits for end of file"
        assert result[0].value == "secret"
    finally:
        os.close(w)


def test_password_fd_of_stdio_is_refused():
    with pytest.raises(UsageError) as e:
        params.parse_assignment("password", "-0")
    assert "3 or higher" in str(e.value)


def test_interactive_password_needs_a_terminal(monkeypatch):
    monkeypatch.setattr(os, "isatty", lambda fd: False)
    with pytest.raises(UsageError) as e:
        params.parse_assignment("password", "-")
    assert "terminal" in str(e.value)


def test_every_parameter_of_the_seed_is_declared():
    seed = {"file", "export", "compression", "config", "cookie", "create",
            "create-adapter-type", "create-hwversion", "create-size",
            "create-type", "libdir", "nfchostport", "password", "port",
            "server", "single-link", "snapshot", "thumbprint", "transports",
            "unbuffered", "user", "vm", "vimapiver"}
    assert seed <= set(params.BY_NAME)


def test_every_parameter_has_a_summary_and_metavar():
    for p in params.PARAMS:
        assert p.summary and p.metavar, p.name


def test_remote_is_told_by_any_remote_parameter():
    assert params.is_remote({"server": "esxi"})
    assert params.is_remote({"export": "*"})
    assert params.is_remote({"user": "root", "file": "[ds] a/a.vmdk"})
    assert not params.is_remote({"file": "/x.vmdk", "transports": "file"})


def test_password_dash_word_is_refused_not_taken_literally():
    with pytest.raises(UsageError) as e:
        params.parse_assignment("password", "-bad")
    assert str(e.value).startswith("password: '***'")
    assert "-FD" in str(e.value) and "bad" not in str(e.value)


def test_a_fifo_is_not_a_disk(tmp_path):
    fifo = str(tmp_path / "disk.vmdk")
    os.mkfifo(fifo)
    with pytest.raises(UsageError) as e:
        params.check_disk(dict(params.defaults(), file=fifo))
    assert str(e.value) == ("file: %s is not a regular file (name the .vmdk "
                            "descriptor file)" % fifo)
