"""The `facelake` command: a thin typer layer over the job modules' library functions.

Each job module exposes ``register(app)`` adding its command(s). COMMANDS names the module of
every command and its one-line summary, so `facelake --help` lists them without importing any
job module (they import Ray, pyarrow, faiss, deepface); a command's module is imported when that
command runs or shows its own help. User errors (facelake.errors.FacelakeError and usage errors)
print one line starting "error:" and exit with code 2; they are logged as one line, other
failures with their traceback, in a log file private to the user (``log_file``). Ray, Ray Data
and OpenCV stay quiet unless --verbose (facelake.progress.quiet_environment, cluster.runtime).
Tested in tests/test_cli.py.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import time
import traceback
from dataclasses import dataclass

import typer
from typer.core import TyperCommand, TyperGroup

from facelake import progress
from facelake.errors import ConfigError, FacelakeError


@dataclass(frozen=True)
class CommandEntry:
    """Where a command lives (a module under facelake.jobs) and the summary `facelake --help` shows."""

    module: str
    summary: str
    hidden: bool = False


# Every command, in the order `facelake --help` lists them. A summary is the first paragraph of
# the command's docstring (tests/test_cli.py checks that they agree).
COMMANDS = {
    "audit": CommandEntry("audit_cmd", "List the audit records of a root, oldest first (or --verify the chain)."),
    "calibrate": CommandEntry("calibrate", "Measure FPIR vs threshold on the live gallery with non-mated probes; "
                                           "identify mode then uses it."),
    "demo": CommandEntry("demo", "Run embed -> index -> search on the bundled sample photos (local Ray, local folder)."),
    "embed": CommandEntry("embed", "Detect and embed every face of a manifest's images into a faces table."),
    "erase": CommandEntry("erase", "Remove photos' faces from the record and publish an index version without them."),
    "evaluate": CommandEntry("evaluate", "Measure verification, identification and calibration on a labeled manifest."),
    "index": CommandEntry("index_cmd", "Train an IVF index on FACES, add shards in parallel, publish a new version "
                                       "of ROOT."),
    "rebuild": CommandEntry("rebuild", "Embed new and changed photos, drop removed ones, publish a new index version."),
    "search": CommandEntry("search", "Search probe photos against a root's live index; write reviewable results; "
                                     "audit the job."),
    "status": CommandEntry("status", "Show versions, the live version, counts, the lock, last jobs and last errors "
                                     "of ROOT."),
    "submit": CommandEntry("submit_cmd", "Run `facelake COMMAND ...` as a Ray job on the cluster; print its id (and "
                                         "follow it with --wait)."),
    "jobs": CommandEntry("submit_cmd", "List, inspect, follow and stop facelake's Ray jobs."),
    "sleep": CommandEntry("submit_cmd", "Debug: print a line, sleep, print a line (tests use it as a long job to stop).",
                          hidden=True),
    "weights": CommandEntry("weights_cmd", "Put the model's weight files in deepface's folder, checked by sha256; "
                                           "never downloads."),
}


def load_module_commands(module: str) -> dict[str, TyperCommand]:
    """The click commands that facelake.jobs.<module>'s ``register(app)`` adds, by name."""
    commands = _loaded.get(module)
    if commands is None:
        holder = typer.Typer()
        importlib.import_module(f"facelake.jobs.{module}").register(holder)
        commands = _loaded[module] = dict(typer.main.get_group(holder).commands)
    return commands


_loaded: dict[str, dict[str, TyperCommand]] = {}


class LazyCommands(TyperGroup):
    """The `facelake` group: lists COMMANDS from their summaries; imports a command's module only
    to run it or to show its own help."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._listing = False

    def list_commands(self, ctx: typer.Context) -> list[str]:
        return list(COMMANDS) + [name for name in super().list_commands(ctx) if name not in COMMANDS]

    def get_command(self, ctx: typer.Context, cmd_name: str) -> TyperCommand | TyperGroup | None:
        entry = COMMANDS.get(cmd_name)
        if entry is None:
            return super().get_command(ctx, cmd_name)
        if self._listing:
            return TyperCommand(cmd_name, help=entry.summary, hidden=entry.hidden)
        return load_module_commands(entry.module).get(cmd_name)

    def format_help(self, ctx: typer.Context, formatter) -> None:
        self._listing = True
        try:
            super().format_help(ctx, formatter)
        finally:
            self._listing = False


app = typer.Typer(cls=LazyCommands, no_args_is_help=True, add_completion=False,
                  help="facelake: distributed batch face search over image archives.")


def _register_all() -> None:
    """Import every command now (tests that drive the app in-process); the CLI itself never needs it."""
    for entry in COMMANDS.values():
        load_module_commands(entry.module)


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="print the full traceback of an error (it is always logged)"),
    quiet: bool = typer.Option(False, "--quiet", help="no progress display (it is also off when stderr is not a terminal)"),
    verbose: bool = typer.Option(False, "--verbose", help="let Ray, Ray Data and OpenCV print their own log lines "
                                 f"(also {progress.VERBOSE_ENV}=1)"),
) -> None:
    """facelake: distributed batch face search over image archives."""
    # all three are read by main() before the command runs; declared here for --help


# Commands that only read ROOT (or must find it already there): a mistyped root is refused
# instead of being created (status, audit) or filled with a failed audit record (search, erase).
# Values: (the ROOT parameter, options the command itself refuses first when missing).
EXISTING_ROOT_COMMANDS = {"status": ("root", ()), "audit": ("root", ()), "search": ("root", ("purpose",)),
                          "erase": ("root", ())}


def log_file() -> str:
    """The user's own log: $FACELAKE_LOG, else $XDG_STATE_HOME/facelake/facelake.log
    (XDG_STATE_HOME defaulting to ~/.local/state)."""
    state = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return os.environ.get("FACELAKE_LOG") or os.path.join(state, "facelake", "facelake.log")


def _log(argv: list[str], text: str) -> str | None:
    """Append ``text`` under a dated header to the log; return its path (None if unwritable).

    The folder is made private to the user (0700) and the file is created readable by the user
    alone (0600): tracebacks carry paths, arguments and data.
    """
    path = log_file()
    try:
        folder = os.path.dirname(path)
        if folder and not os.path.isdir(folder):
            os.makedirs(folder, mode=0o700, exist_ok=True)
        descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        with os.fdopen(descriptor, "a", encoding="utf-8") as handle:
            handle.write(f"--- {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} facelake "
                         f"{argv[0] if argv else ''}\n{text.rstrip()}\n")
        return path
    except OSError:
        return None


def _split_flags(argv: list[str]) -> tuple[list[str], set[str]]:
    """Take the global --debug / --quiet / --verbose out of argv (before any `--`, wherever they appear)."""
    cut = argv.index("--") if "--" in argv else len(argv)
    head, tail = argv[:cut], argv[cut:]
    flags = {a for a in head if a in GLOBAL_FLAGS}
    return [a for a in head if a not in GLOBAL_FLAGS] + tail, flags


GLOBAL_FLAGS = ("--debug", "--quiet", "--verbose")


def _check_root_exists(argv: list[str]) -> None:
    """For commands that need ROOT to exist, refuse a missing one before anything is written."""
    if not argv or argv[0] not in EXISTING_ROOT_COMMANDS:
        return
    from facelake import storage

    command = typer.main.get_command(app)
    ctx = command.make_context("facelake", list(argv), resilient_parsing=True)
    sub = command.get_command(ctx, argv[0])
    if sub is None:
        return
    params = sub.make_context(argv[0], list(argv[1:]), parent=ctx, resilient_parsing=True).params
    name, first = EXISTING_ROOT_COMMANDS[argv[0]]
    root = params.get(name)
    if not root or any(h in argv for h in ("--help", "-h")) or not all(params.get(p) for p in first):
        return
    storage.check_uri(root)
    if not storage.exists(root, storage.StorageOptions.from_env(params.get("endpoint_url"))):
        raise ConfigError(f"ROOT {storage.redact(root)} does not exist; check the path (`facelake index` "
                          "or `facelake rebuild` creates a root)")


def _click_error(err: BaseException, *kinds: str) -> str | None:
    """The name of the click exception class ``err`` is (typer vendors its own click), or None;
    ``kinds``: only these names."""
    names = {c.__name__ for c in type(err).__mro__}
    for name in kinds or ("NoArgsIsHelpError", "UsageError", "Abort", "Exit"):
        if name in names:
            return name
    return None


def _run_click(args: list[str]):
    """Run the typer app; usage errors become one "error:" line with exit code 2."""
    try:
        return app(args=args, prog_name="facelake", standalone_mode=False)
    except Exception as err:
        kind = _click_error(err)
        if kind == "NoArgsIsHelpError":
            typer.echo(err.ctx.get_help() if getattr(err, "ctx", None) else err.format_message())
            sys.exit(0)
        if kind == "UsageError":
            ctx = getattr(err, "ctx", None)
            path = ctx.command_path if ctx is not None else "facelake"
            _say(f"{_usage_message(err)} (see `{path} --help`)")
            sys.exit(2)
        if kind == "Abort":
            _say("interrupted")
            sys.exit(130)
        if kind == "Exit":
            sys.exit(getattr(err, "exit_code", 0))
        raise


def _usage_message(err: Exception) -> str:
    """click's message; a missing option is named with what it is for (its help)."""
    param = getattr(err, "param", None)
    if (_click_error(err, "MissingParameter") and getattr(param, "param_type_name", "") == "option"
            and getattr(param, "help", None)):
        return f"{param.opts[-1]} is required: {param.help}"
    return err.format_message()


def _say(message: str) -> None:
    first = " ".join(str(message).split())  # one line, whatever the library put in the message
    typer.secho(f"error: {first}", fg=typer.colors.RED, err=True)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `facelake` console script.

    Exit codes: 0 done; 1 the job failed (or an unexpected error); 2 a user error, printed as one
    line starting "error:" that names what to change. An unexpected error's traceback goes to the
    log file always and to the terminal only with --debug; a user error is logged as its line.
    """
    args, flags = _split_flags(list(sys.argv[1:] if argv is None else argv))
    debug = "--debug" in flags
    if "--quiet" in flags:
        os.environ[progress.QUIET_ENV] = "1"
    if "--verbose" in flags:
        os.environ[progress.VERBOSE_ENV] = "1"
    progress.quiet_environment()   # before any command imports OpenCV or starts Ray
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        _check_root_exists(args)
        code = _run_click(args)
    except FacelakeError as err:
        _log(args, f"{type(err).__name__}: {err}")
        if debug:
            traceback.print_exc()
        _say(str(err))
        sys.exit(2)
    except KeyboardInterrupt:
        _say("interrupted")
        sys.exit(130)
    except Exception as err:  # not a user error: a failed job, a bug or the environment
        if _click_error(err):
            raise
        from facelake.record.audit import interruption  # pyarrow: loaded only once a command has failed

        path = _log(args, traceback.format_exc())
        if interruption(err) is not None:   # a cleanup that failed after SIGTERM/SIGINT: still an interrupt
            _say("interrupted")
            sys.exit(130)
        if debug:
            traceback.print_exc()
        where = f"traceback in {path}" if path else "no log file could be written"
        _say(f"{type(err).__name__}: {err} ({where}; rerun with --debug to print it)")
        sys.exit(1)
    if isinstance(code, int) and code:
        sys.exit(code)


if __name__ == "__main__":
    main()
