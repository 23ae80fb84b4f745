"""The `facelake` command: a thin typer layer over the job modules' library functions.

Each job module exposes ``register(app)`` adding its command(s); the list below wires them.
User errors (facelake.errors.FacelakeError and usage errors) print one line starting "error:"
and exit with code 2; tracebacks are logged always and printed only with --debug.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import time
import traceback

import typer

from facelake.record.audit import interruption
from facelake.errors import ConfigError, FacelakeError

app = typer.Typer(no_args_is_help=True, add_completion=False,
                  help="facelake: distributed batch face search over image archives.")

# Modules under facelake.jobs that add commands. Keep alphabetical.
COMMAND_MODULES = (
    "audit_cmd",
    "calibrate",
    "demo",
    "embed",
    "erase",
    "evaluate",
    "index_cmd",
    "rebuild",
    "search",
    "status",
    "submit_cmd",
    "weights_cmd",
)


def _register_all() -> None:
    for name in COMMAND_MODULES:
        module = importlib.import_module(f"facelake.jobs.{name}")
        module.register(app)


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="print the full traceback of an error (it is always logged)"),
    quiet: bool = typer.Option(False, "--quiet", help="no progress display (it is also off when stderr is not a terminal)"),
) -> None:
    """facelake: distributed batch face search over image archives."""
    # both are read by main() and facelake.progress before the command runs; declared here for --help


# Commands that only read ROOT (or must find it already there): a mistyped root is refused
# instead of being created (status, audit) or filled with a failed audit record (search, erase).
# Values: (the ROOT parameter, options the command itself refuses first when missing).
EXISTING_ROOT_COMMANDS = {"status": ("root", ()), "audit": ("root", ()), "search": ("root", ("purpose",)),
                          "erase": ("root", ())}


def log_file() -> str:
    """Where tracebacks are always written: $FACELAKE_LOG, else ~/.cache/facelake/facelake.log."""
    return os.environ.get("FACELAKE_LOG") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "facelake", "facelake.log")


def _log_traceback(argv: list[str]) -> str | None:
    """Append the current exception's traceback to the log file; return its path (None if unwritable)."""
    path = log_file()
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(f"--- {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} facelake "
                         f"{argv[0] if argv else ''}\n{traceback.format_exc()}")
        return path
    except OSError:
        return None


def _split_flags(argv: list[str]) -> tuple[list[str], bool, bool]:
    """Take the global --debug / --quiet out of argv (before any `--`, wherever they appear)."""
    cut = argv.index("--") if "--" in argv else len(argv)
    head, tail = argv[:cut], argv[cut:]
    debug, quiet = "--debug" in head, "--quiet" in head
    head = [a for a in head if a not in ("--debug", "--quiet")]
    return head + tail, debug, quiet


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


def _click_error(err: BaseException) -> str | None:
    """The name of the click exception class ``err`` is (typer may vendor its own click), or None."""
    names = {c.__name__ for c in type(err).__mro__}
    for name in ("NoArgsIsHelpError", "UsageError", "Abort", "Exit"):
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
            _say(f"{err.format_message()} (see `{path} --help`)")
            sys.exit(2)
        if kind == "Abort":
            _say("interrupted")
            sys.exit(130)
        if kind == "Exit":
            sys.exit(getattr(err, "exit_code", 0))
        raise


def _say(message: str) -> None:
    first = " ".join(str(message).split())  # one line, whatever the library put in the message
    typer.secho(f"error: {first}", fg=typer.colors.RED, err=True)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `facelake` console script.

    Exit codes: 0 done; 1 the job failed (or an unexpected error); 2 a user error, printed as one
    line starting "error:" that names what to change. Tracebacks go to the log file always and to
    the terminal only with --debug.
    """
    args, debug, quiet = _split_flags(list(sys.argv[1:] if argv is None else argv))
    if quiet:
        os.environ["FACELAKE_QUIET"] = "1"
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    _register_all()
    try:
        _check_root_exists(args)
        code = _run_click(args)
    except FacelakeError as err:
        _log_traceback(args)
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
        path = _log_traceback(args)
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
