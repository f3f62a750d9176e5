"""The command line: nbdkit's options, the VDDK plugin's parameters.

``python3 -m vddktool [OPTIONS] [vddk] [file=]FILENAME [KEY=VALUE ...]``

Options and parameters may be mixed in any order (GNU getopt).  Parsing
gives an ``Options``; ``run_server`` then takes the start-up steps in the
order VDDK needs: configure the backend, get it ready (it may re-exec the
process), listen, daemonize, write the pidfile, finish the backend's set-up
in the final process, serve.
"""

import getopt
import os
import re
import socket
import sys
import threading
import traceback

from . import __version__, exposure, filters, lifecycle, log, params
from .backends import choose_backend
from .engine import EngineError, UsageError
from .usage import PLUGIN_WORD, dump_plugin_lines, help_text
from .vmdk.extent import VmdkError

# The command line as it was, for anything that must re-exec the process
# (VDDK needs LD_LIBRARY_PATH set before the program starts).
ORIGINAL_ARGV = list(sys.argv)

DEFAULT_THREADS = 16
MAX_EXPORT_NAME = 4096

SHORT_OPTIONS = "D:e:fhi:noP:p:rsU:t:vV"
LONG_OPTIONS = [
    "debug=", "dump-plugin", "exportname=", "export-name=", "export=",
    "exit-with-parent", "filter=", "foreground", "no-fork", "help",
    "ipaddr=", "ip-addr=", "log=", "newstyle", "oldstyle", "pidfile=",
    "pid-file=", "port=", "readonly", "read-only", "run=", "single",
    "stdin", "threads=", "thumbprint=", "unix=", "verbose", "version",
] + exposure.LONG_OPTIONS

# Set once the process has forked into the background: from then on
# errors can only reach the log, never the terminal.
_daemonized = False

LOG_DESTINATIONS = ("stderr", "syslog", "null")

# A KEY=VALUE word has a key like these; anything else with '=' in it (a
# path such as /vm/a=b.vmdk) is the file name.
_KEY_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]*$")


class Options(object):
    """Everything the command line says."""

    def __init__(self):
        self.unix_socket = None
        self.port = None
        self.ipaddr = None
        self.single = False
        self.run_command = None
        self.foreground = False
        self.pidfile = None
        self.exit_with_parent = False
        self.readonly = False
        self.export_name = ""
        self.threads = DEFAULT_THREADS
        self.verbose = False
        self.debug_flags = []
        self.log_destination = None     # None: stderr, syslog for a daemon
        self.show_help = False
        self.show_version = False
        self.dump_plugin = False
        self.thumbprint_of = None       # --thumbprint HOST[:PORT]
        self.filters = []               # names, nearest the client first
        self.exposure = exposure.ExposureOptions()
        self.values = params.defaults()
        self.given = []                 # parameter names, in order given
        self.repeated = []              # names given more than once

    @property
    def listens_on_tcp(self):
        return self.port is not None or self.ipaddr is not None


# ---------------------------------------------------------------------------
# parsing


def parse_command_line(argv):
    try:
        pairs, words = getopt.gnu_getopt(argv, SHORT_OPTIONS, LONG_OPTIONS)
    except getopt.GetoptError as e:
        raise UsageError(_getopt_message(e))
    options = Options()
    for option, value in pairs:
        _apply_option(options, option, value)
    if words and words[0] == PLUGIN_WORD:
        words = words[1:]
    for word in words:
        _apply_parameter(options, word)
    filters.check_parameters(options.filters, options.given)
    return options


def _getopt_message(error):
    option = "-" + error.opt if len(error.opt) == 1 else "--" + error.opt
    if "requires argument" in error.msg:
        return "%s: needs a value (see --help)" % option
    if "must not have an argument" in error.msg:
        return "%s: takes no value (see --help)" % option
    if "not a unique prefix" in error.msg:
        return "%s: is ambiguous (spell the option out, see --help)" % option
    return "%s: unknown option (see --help for the options)" % option


def _apply_option(options, option, value):
    if option in ("-U", "--unix"):
        options.unix_socket = _nonempty(option, value)
    elif option in ("-p", "--port"):
        options.port = parse_listen_port(option, value)
    elif option in ("-i", "--ipaddr", "--ip-addr"):
        options.ipaddr = _nonempty(option, value)
    elif option in ("-s", "--single", "--stdin"):
        options.single = True
    elif option == "--run":
        options.run_command = _nonempty(option, value)
    elif option in ("-f", "--foreground", "--no-fork"):
        options.foreground = True
    elif option in ("-P", "--pidfile", "--pid-file"):
        options.pidfile = os.path.abspath(_nonempty(option, value))
    elif option == "--exit-with-parent":
        options.exit_with_parent = True
    elif option in ("-r", "--readonly", "--read-only"):
        options.readonly = True
    elif option in ("-e", "--exportname", "--export-name", "--export"):
        options.export_name = parse_export_name(option, value)
    elif option in ("-t", "--threads"):
        options.threads = parse_threads(option, value)
    elif option in ("-v", "--verbose"):
        options.verbose = True
    elif option in ("-D", "--debug"):
        options.debug_flags.append(parse_debug_flag(option, value))
    elif option == "--log":
        options.log_destination = _choice(option, value, LOG_DESTINATIONS)
    elif option in ("-V", "--version"):
        options.show_version = True
    elif option in ("-h", "--help"):
        options.show_help = True
    elif option == "--dump-plugin":
        options.dump_plugin = True
    elif option == "--thumbprint":
        options.thumbprint_of = _nonempty(option, value)
    elif option == "--filter":
        filters.filter_class(value)     # refuses an unknown name now
        options.filters.append(value)
    elif exposure.apply_option(options.exposure, option, value):
        pass
    elif option in ("-n", "--newstyle"):
        pass    # the only protocol there is
    elif option in ("-o", "--oldstyle"):
        raise UsageError("%s: the oldstyle protocol is not supported (drop "
                         "%s: every current NBD client speaks newstyle)"
                         % (option, option))
    else:   # getopt only returns options listed above
        raise UsageError("%s: unknown option (see --help)" % option)


def _nonempty(option, value):
    if not value:
        raise UsageError("%s: needs a value (see --help)" % option)
    return value


def _choice(option, value, choices):
    if value not in choices:
        raise UsageError("%s: %r is not one of %s (use %s=%s)" % (
            option, value, ", ".join(choices), option, choices[0]))
    return value


def parse_listen_port(option, value):
    """A port number, or a service name from /etc/services as nbdkit
    allows (-p nbd)."""
    try:
        return params.parse_port(value)
    except ValueError:
        pass
    try:
        return socket.getservbyname(value, "tcp")
    except OSError:
        raise UsageError("%s: %r is not a port number (use 1 to 65535, for "
                         "example %s %d)" % (option, value, option,
                                             lifecycle.DEFAULT_PORT))


def parse_export_name(option, value):
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        # Bytes the locale could not decode: NBD names are UTF-8 text.
        raise UsageError("%s: the export name is not valid UTF-8 (NBD "
                         "export names are UTF-8 text; use another name)"
                         % option)
    if len(value.encode("utf-8")) > MAX_EXPORT_NAME:
        raise UsageError("%s: the export name is longer than %d bytes (NBD's "
                         "limit; use a shorter name)" % (option,
                                                         MAX_EXPORT_NAME))
    return value


def parse_threads(option, value):
    """-t N; 0 means the default, as in nbdkit."""
    if not value.isdigit():
        raise UsageError("%s: %r is not a number of threads (use a whole "
                         "number, for example %s 16; 0 means the default)"
                         % (option, value, option))
    return int(value) or DEFAULT_THREADS


def parse_debug_flag(option, value):
    """NAME.FLAG=N, N an integer (decimal, 0x hex or 0o octal)."""
    name, sep, number = value.partition("=")
    valid_name = "." in name and all(
        _KEY_RE.match(part) for part in name.split("."))
    if sep and valid_name:
        try:
            return name, int(number, 0)
        except ValueError:
            try:
                return name, int(number, 10)
            except ValueError:
                pass
    raise UsageError("%s: %r is not NAME.FLAG=N (for example %s "
                     "vddk.stats=1)" % (option, value, option))


def _apply_parameter(options, word):
    key, sep, text = word.partition("=")
    if not (sep and _KEY_RE.match(key)):
        key, text = params.MAGIC_PARAM, word
    # As with nbdkit, the last one wins: wrappers append overrides.  An
    # unknown key is refused by parse_assignment, naming it.
    options.values[key] = params.parse_assignment(key, text)
    if key in options.given:
        options.repeated.append(key)
    else:
        options.given.append(key)


# ---------------------------------------------------------------------------
# checks that need the whole command line


def check_options(options, activated):
    """Combinations nbdkit refuses, each with the way out."""
    if options.unix_socket and options.listens_on_tcp:
        which = "-p" if options.port is not None else "-i"
        raise UsageError("-U: cannot be combined with %s (listen on a Unix "
                         "socket or on TCP, not both)" % which)
    if options.unix_socket == "-" and not options.run_command:
        # Its path is known only to --run's command: no one else could
        # ever connect.
        raise UsageError("-U -: a private socket is only reachable by the "
                         "--run command (add --run 'COMMAND', or give "
                         "-U a path)")
    if options.single:
        for given, name in ((options.unix_socket, "-U"),
                            (options.port is not None, "-p"),
                            (options.ipaddr, "-i"),
                            (options.run_command, "--run")):
            if given:
                raise UsageError("-s: cannot be combined with %s (-s serves "
                                 "one client on stdin/stdout; drop one of "
                                 "them)" % name)
    if activated:
        for given, name in ((options.unix_socket, "-U"),
                            (options.port is not None, "-p"),
                            (options.ipaddr, "-i"),
                            (options.run_command, "--run"),
                            (options.single, "-s")):
            if given:
                raise UsageError("%s: cannot be used with socket activation "
                                 "(LISTEN_FDS is set: the listening sockets "
                                 "are given; drop %s)" % (name, name))


# ---------------------------------------------------------------------------
# running


def main(argv=None):
    """Run the program; return its exit status."""
    if argv is None:
        argv = sys.argv[1:]
    try:
        options = parse_command_line(argv)
        if options.show_help:
            sys.stdout.write(help_text())
            return 0
        if options.show_version:
            sys.stdout.write("vddktool %s\n" % __version__)
            return 0
        if options.thumbprint_of:
            from .thumbprint import main as print_thumbprint
            return print_thumbprint(options.thumbprint_of)
        log.configure(options.verbose, options.log_destination or "stderr")
        from .vddk.reexec import restarted
        for name, value in options.debug_flags:
            log.set_debug_flag(name, value, warn=not restarted())
        for name in [] if restarted() else options.repeated:
            log.debug("%s= is given more than once: the last one counts",
                      name)
        if options.dump_plugin:
            lines = dump_plugin_lines(options.values, options.filters)
            sys.stdout.write("".join(line + "\n" for line in lines))
            return 0
        status = run_server(options)
        _exit_if_threads_linger(status)
        return status
    except (UsageError, VmdkError) as e:
        return _fail(str(e))
    except EngineError as e:
        return _fail(e.message)
    except OSError as e:
        # The system refused something at start-up (fork, a temp dir, an
        # inherited fd that is not a socket): say what, without a traceback.
        return _fail("%s%s" % (e.strerror or e, ": %s" % e.filename
                               if e.filename else ""))
    except KeyboardInterrupt:
        return 130


def _fail(message):
    """One line on stderr, whatever --log says: the user must see it.  A
    daemon has no stderr, so there it goes to the log (syslog)."""
    if _daemonized:
        log.error("%s", message)
        return 1
    line = "%s: %s\n" % (log.PROGRAM, message)
    try:
        os.write(2, line.encode("utf-8", "replace"))
    except OSError:
        pass
    return 1


def run_server(options):
    activated = lifecycle.activated_fds()
    check_options(options, activated)
    serving = exposure.server_settings(options.exposure)
    params.check_disk(options.values)

    backend = filters.build_stack(options.filters,
                                  choose_backend(options.values),
                                  options.values, options.readonly)
    backend.config_complete()
    # May re-exec this process: the activation variables must survive it.
    backend.get_ready()
    # From here on the backend may hold a created or open disk: whatever
    # fails next (a port in use, an unwritable pidfile), it must be closed
    # cleanly, or a sparse disk is left marked as not shut down.
    # Before anything listens: a client (or a test) that sees the socket
    # may stop the server at once, and must find it ready to stop cleanly.
    stopper = Stopper()
    lifecycle.install_signal_handlers(stopper.stop)
    try:
        if activated:
            lifecycle.forget_activation()
        listeners = open_listeners(options, activated)
        try:
            return _serve(options, backend, listeners, serving, stopper)
        finally:
            if listeners:
                listeners.close()
    finally:
        _cleanup(backend)


def open_listeners(options, activated):
    if options.single:
        return None
    if activated:
        return lifecycle.listen_activated(activated)
    if options.unix_socket:
        return lifecycle.listen_unix(options.unix_socket)
    return lifecycle.listen_tcp(options.ipaddr,
                                options.port or lifecycle.DEFAULT_PORT)


def should_daemonize(options, listeners):
    """nbdkit's rule: fork unless something needs this very process."""
    return not (options.foreground or options.single or options.run_command
                or options.exit_with_parent
                or (listeners is not None and listeners.activated))


def _serve(options, backend, listeners, serving, stopper):
    from .server import Server, ServerSettings
    from .vddk.reexec import caller_environment

    if should_daemonize(options, listeners):
        _become_daemon(options, listeners)
    if options.pidfile:
        lifecycle.write_pidfile(options.pidfile)

    settings = ServerSettings(readonly=options.readonly,
                              export_name=options.export_name,
                              threads=options.threads, **serving)
    if options.exit_with_parent:
        lifecycle.exit_with_parent(stopper.stop)

    backend.after_fork()
    status = 0
    try:
        server = Server(backend, settings)
        stopper.attach(server)
        if options.single:
            # The protocol owns stdout: keep stray prints off it.
            sys.stdout = sys.stderr
            server.serve_connection(0, 1)
        else:
            command = None
            if options.run_command:
                command = lifecycle.CaptiveCommand(
                    options.run_command,
                    lifecycle.run_environment(listeners, options.export_name,
                                              serving["tls"],
                                              base=caller_environment()),
                    stopper.stop)
                command.start()
            if not stopper.requested:
                server.serve_forever(listeners.sockets)
            if command:
                status = command.wait()
    except Exception as e:
        # A bug, not a user mistake: say what happened and make sure the
        # process ends rather than hanging on a half-stopped server.
        log.error("internal error: %s: %s", type(e).__name__, e)
        if log.verbose():
            log.debug("%s", traceback.format_exc())
        stopper.stop()
        status = 1
    return status


def _become_daemon(options, listeners):
    global _daemonized
    _check_pidfile_writable(options.pidfile)
    lifecycle.daemonize()
    _daemonized = True
    listeners.adopt()
    if options.log_destination is None:
        log.configure(options.verbose, "syslog")


class Stopper(object):
    """Stops the server once, from a signal, --run's end or the parent's
    death, even if that happens before the server exists."""

    def __init__(self):
        self._lock = threading.Lock()
        self._server = None
        self.requested = False

    def attach(self, server):
        with self._lock:
            self._server = server
            requested = self.requested
        if requested:
            server.shutdown()

    def stop(self):
        with self._lock:
            first = not self.requested
            self.requested = True
            server = self._server
        if first and server is not None:
            server.shutdown()


def _cleanup(backend):
    try:
        backend.cleanup()
    except Exception as e:
        log.error("while closing the backend: %s", e)


def _check_pidfile_writable(path):
    """Fail in the foreground, where the message can be seen, rather than
    in the daemon whose stderr is /dev/null."""
    if path and not os.access(os.path.dirname(path), os.W_OK):
        raise UsageError("-P: cannot write %s: its directory is not writable "
                         "(choose a writable path)" % path)


def _exit_if_threads_linger(status):
    """After a stop every worker thread should be gone; if a stuck one
    remains (a bug), exit anyway rather than hang."""
    others = [t for t in threading.enumerate()
              if t is not threading.current_thread() and not t.daemon]
    if others:
        log.debug("exiting with %d threads still running", len(others))
        _exit_now(status)


def _exit_now(status):
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(status)
