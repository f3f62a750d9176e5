"""--filter on the command line: both spellings, the order of a stack
(the first --filter nearest the client, as in nbdkit, checked against
nbdkit), and one clear line for each kind of mistake."""

import pytest

from conftest import vddktool
from filter_oracle import block_map, nbdsh, side_by_side
from test_cli import disk, fails  # noqa: F401 (a fixture)
from vddktool import filters, params


@pytest.mark.parametrize("order,first_64k", [
    # cow nearest the client: a trimmed block is a hole in its extents.
    (["--filter", "cow", "--filter", "noextents"], 3),
    # noextents nearest the client: everything is data.
    (["--filter=noextents", "--filter=cow"], 0)])
def test_the_first_filter_is_nearest_the_client(tmp_path, start_server,
                                                start_nbdkit, order,
                                                first_64k):
    pair = side_by_side(tmp_path, start_server, start_nbdkit,
                        b"\x01" * 1024 * 1024, order,
                        env={"TMPDIR": str(tmp_path)})
    for server in (pair.ours, pair.theirs):
        nbdsh(server.uri, "h.trim(65536, 0)")
    ours = block_map(pair.ours.uri)
    assert ours == block_map(pair.theirs.uri)
    assert ours[0][2] == first_64k


# --- mistakes: one line naming what is wrong ---------------------------------


@pytest.mark.parametrize("args,message", [
    (["--filter=cache"], "--filter=cache: no such filter (the filters are "
     "blocksize, cacheextents, cow, limit,"),
    (["--filter", "nosuch"], "--filter=nosuch: no such filter"),
    (["colour=blue"], "colour: unknown parameter: no filter or engine "
     "takes it"),
    (["minblock=512"], "minblock: a parameter of --filter=blocksize, which "
     "is not on the command line (add --filter=blocksize"),
    (["--filter=retry", "retry-delay=1", "minblock=512"],
     "minblock: a parameter of --filter=blocksize"),
    (["--filter=blocksize", "minblock=3"],
     "minblock (--filter=blocksize): '3' is not a power of two"),
    (["--filter=blocksize", "minblock=128K"],
     "minblock (--filter=blocksize): '128K' is out of range (use 1 to 64K)"),
    (["--filter=blocksize", "minblock=512", "maxdata=1000"],
     "maxdata (--filter=blocksize): 1000 is not a multiple of minblock=512 "
     "(use a multiple, such as 1024)"),
    (["--filter=blocksize", "maxlen=lots"],
     "maxlen (--filter=blocksize): 'lots' is not a size"),
    (["--filter=cow", "cow-block-size=1K"],
     "cow-block-size (--filter=cow): '1K' is out of range (use 4K to 2G)"),
    (["--filter=cow", "cow-on-read=maybe"],
     "cow-on-read (--filter=cow): 'maybe' is not true, false or an "
     "absolute /PATH"),
    (["--filter=rate", "rate=0"], "rate (--filter=rate): '0' must not be 0"),
    (["--filter=rate", "connection-rate=fast"],
     "connection-rate (--filter=rate): 'fast' is not a size"),
    (["--filter=rate", "burstiness=-1"],
     "burstiness (--filter=rate): '-1' must be a number of seconds above 0"),
    (["--filter=retry", "retries=-1"],
     "retries (--filter=retry): '-1' is not a whole number"),
    (["--filter=retry", "retry-delay=0"],
     "retry-delay (--filter=retry): '0' must not be 0"),
    (["--filter=retry", "retry-exponential=sometimes"],
     "retry-exponential (--filter=retry): 'sometimes' is not a boolean"),
    (["--filter=scan", "scan-size=3M"],
     "scan-size (--filter=scan): '3M' is not a power of two"),
    (["--filter=scan", "scan-size=64M"],
     "scan-size (--filter=scan): '64M' is out of range (use 512 to 32M)"),
    (["--filter=limit", "limit=many"],
     "limit (--filter=limit): 'many' is not a whole number"),
])
def test_mistakes(disk, args, message):
    line = fails(*(args + [disk]))
    assert line.startswith("vddktool: " + message), line


def test_every_filter_parameter_names_its_filter():
    for param in params.PARAMS:
        owner = params.filter_of(param.name)
        if owner is not None:
            assert owner in filters.NAMES, param.name
            assert param in filters.parameters_of(owner)


# --- --help and --dump-plugin -----------------------------------------------


def test_help_lists_every_filter_and_its_parameters():
    text = vddktool("--help").stdout
    section = text.split("\nFilters (")[1]
    for name in filters.NAMES:
        assert "--filter=%s: %s" % (name, filters.filter_class(name).summary) \
            in section
        for param in filters.parameters_of(name):
            assert "%s=%s" % (param.name, param.metavar) in section


def test_dump_plugin_lists_the_filters_and_the_stack():
    lines = vddktool("--dump-plugin").stdout.splitlines()
    assert "vddktool_filters=%s" % ",".join(filters.NAMES) in lines
    assert "thread_model=parallel" in lines
    lines = vddktool("--filter", "cow", "--filter=retry",
                     "--dump-plugin").stdout.splitlines()
    assert "vddktool_filter_stack=cow,retry" in lines
    # nbdkit's retry filter serializes requests; ours keeps them parallel
    # (a reopen waits for the requests in progress instead).
    assert "thread_model=parallel" in lines


# --- the manual -----------------------------------------------------------


def manual_sections():
    """{head2 title: its text} of the FILTERS section of the POD."""
    from test_manual import pod_text
    text = pod_text().split("\n=head1 FILTERS\n")[1].split("\n=head1 ")[0]
    sections = {}
    for part in text.split("\n=head2 ")[1:]:
        title, _, body = part.partition("\n")
        sections[title] = body
    return sections


def test_every_filter_has_a_manual_section_with_an_example():
    sections = manual_sections()
    assert sorted(sections) == filters.NAMES
    for name, body in sections.items():
        examples = [line for line in body.splitlines()
                    if line.startswith(" python3 -m vddktool")]
        assert examples and "--filter=%s" % name in examples[0], name


@pytest.mark.parametrize("seed_line", [
    "--filter=blocksize minblock=512",
    "--filter=blocksize minblock=512 maxdata=2M",
    "--filter=noextents"])
def test_the_seed_advice_is_in_the_manual_as_written(seed_line):
    from test_manual import pod_text
    assert "vddk ... " + seed_line in pod_text()
