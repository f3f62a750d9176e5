"""What the program says about itself: --help and --dump-plugin.

--help is built from the parameter table, so a new parameter appears
there by being declared; --dump-plugin reports what nbdkit would for an
equivalent plugin, plus the VDDK engine's own facts.
"""

import os
import sys

from . import __version__, exposure, filters, log, params
from .backends import backend_class

# The plugin name nbdkit command lines put before the parameters.
PLUGIN_WORD = "vddk"


HELP_OPTIONS = """\
Options:
  -U, --unix SOCKET     listen on a Unix socket (-U - : a private one)
  -p, --port PORT       listen on this TCP port (default 10809)
  -i, --ipaddr ADDRESS  listen on this address only
  -s, --single          serve one client on stdin/stdout
  --run 'COMMAND'       run COMMAND with $uri set, stop when it exits
  -f, --foreground      do not fork into the background
  -P, --pidfile FILE    write the server's process ID to FILE
  --exit-with-parent    stop when the parent process exits
  -r, --readonly        serve the disk read-only
  -e, --exportname NAME the export name to announce and put in $uri
  -t, --threads N       requests in flight per connection (default 16)
  -v, --verbose         print debug messages
  -D, --debug NAME.FLAG=N  set a debug flag
  --log=stderr|syslog|null  where messages go
  --filter=NAME         insert a filter (see Filters below; the first
                        --filter is nearest the client)
  --dump-plugin         print facts about the engines and exit
  --thumbprint HOST[:PORT]  print the server's certificate thumbprint
  -V, --version         print the version and exit
  -h, --help            print this help and exit
"""


def _parameter_lines(param_list):
    lines = []
    for param in param_list:
        spelling = "%s=%s" % (param.name, param.metavar)
        if param.name == params.MAGIC_PARAM:
            spelling = "[%s=]%s" % (param.name, param.metavar)
        lines.append("  %s" % spelling)
        lines.append("      %s" % param.summary)
    return lines


def help_text():
    lines = [
        "usage: vddktool [OPTIONS] [vddk] [file=]FILENAME "
        "[KEY=VALUE ...]",
        "",
        "Serve a VMware virtual disk over NBD, like nbdkit's VDDK plugin.",
        "",
        HELP_OPTIONS + exposure.HELP_OPTIONS,
        "Parameters:",
    ]
    lines.extend(_parameter_lines(
        [p for p in params.PARAMS if params.filter_of(p.name) is None]))
    lines.append("")
    lines.append("Filters (--filter=NAME; their parameters go with the "
                 "others):")
    for name in filters.NAMES:
        summary = filters.filter_class(name).summary
        lines.append("  --filter=%s: %s" % (name, summary))
        lines.extend("  " + line for line in
                     _parameter_lines(filters.parameters_of(name)))
    lines.append("")
    lines.append("See vddktool(1) for the details.")
    return "\n".join(lines) + "\n"


# The plugin interface nbdkit would report for an equivalent plugin.
PLUGIN_CALLBACKS = (
    "dump_plugin", "config", "config_complete", "config_help", "get_ready",
    "after_fork", "cleanup", "list_exports", "export_description", "open",
    "close", "get_size", "block_size", "can_write", "can_flush", "can_fua",
    "can_zero", "can_extents", "can_multi_conn", "pread", "pwrite", "flush",
    "zero", "extents",
)


def program_path():
    """The file this program runs from: the zipapp, or the package."""
    archive = sys.argv[0] if sys.argv and sys.argv[0].endswith(".pyz") \
        else None
    return os.path.abspath(archive or os.path.dirname(__file__))


def dump_plugin_lines(values, filter_names=()):
    """nbdkit's lines for the plugin; thread_model is that of the stack
    the given filters make.  vddktool_filters lists the filters there
    are, vddktool_filter_stack those given (nearest the client first)."""
    lines = [
        "path=%s" % program_path(),
        "name=%s" % PLUGIN_WORD,
        "version=%s" % __version__,
        "api_version=2",
        "max_thread_model=parallel",
        "thread_model=%s" % filters.thread_model(filter_names),
        "errno_is_preserved=1",
        "magic_config_key=%s" % params.MAGIC_PARAM,
    ]
    lines.extend("has_%s=1" % name for name in PLUGIN_CALLBACKS)
    lines.append("vddktool_filters=%s" % ",".join(filters.NAMES))
    if filter_names:
        lines.append("vddktool_filter_stack=%s" % ",".join(filter_names))
    try:
        vddk_backend = backend_class("vddk")
    except ImportError as e:
        log.debug("--dump-plugin: the VDDK engine is unavailable: %s", e)
    else:
        lines.extend(vddk_backend.dump_plugin(values))
    return lines
