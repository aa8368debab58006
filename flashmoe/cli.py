"""The console scripts' shared wrapper: one exit-code table, one-line errors, tracebacks on demand.

Every ``flashmoe-*`` command's ``main`` is wrapped by :func:`command`:

====  =========================================================================================
code  meaning
====  =========================================================================================
0     success
1     the command ran and its check failed (the demo's tokens differ; a server's generation
      loop died)
2     a user error: a bad option or input, a refused checkpoint or layout, a Hub or OS error
      (missing file, full disk, permissions); one line ``PROG: error: ...`` on stderr
      (argparse's usage errors exit 2 too)
70    an internal error (a bug, ``EX_SOFTWARE``): one line ``PROG: internal error: ...``
130   interrupted (Ctrl-C)
====  =========================================================================================

``FLASHMOE_DEBUG=1`` prints the full traceback before that line (exit codes stay the same).

In a distributed run (``mlx.launch``), an error every rank knows about carries ``silent = True``
on the ranks other than 0: only rank 0 prints it. Other ranks name themselves in their lines.
"""

from __future__ import annotations

import functools
import os
import sys
import traceback
from collections.abc import Callable

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERNAL = 70
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a Ctrl-C'd process

# What a user causes or can fix: flashmoe's refusals (LayoutError, ConvertError, BenchError and
# the option checks are ValueErrors), the OS (OSError), MLX and Hub failures (RuntimeError).
USER_ERRORS: tuple[type[Exception], ...] = (ValueError, OSError, RuntimeError)
# Subclasses of those that only a bug raises.
_BUGS: tuple[type[Exception], ...] = (NotImplementedError, RecursionError)

RESUME_HINT = "rerun the same command to resume"

_running = ["flashmoe"]  # the command being run, for messages printed outside run_command


def current_prog() -> str:
    """The name of the command ``run_command`` is running (as its error lines print it)."""
    return _running[-1]


def _ranked(prog: str) -> str:
    """``prog``, naming the rank on the ranks other than 0 of a distributed run."""
    rank = os.environ.get("MLX_RANK", "")
    return prog if rank in ("", "0") else f"{prog} (rank {rank})"


def is_user_error(e: BaseException) -> bool:
    """Whether ``e`` is reported as a one-line user error (exit 2) rather than a bug."""
    return isinstance(e, USER_ERRORS) and not isinstance(e, _BUGS)


def error_line(e: BaseException) -> str:
    """One line describing ``e``: ``file: reason`` for an OSError about a file, else the first
    line of its message (or its type name when it has none)."""
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        text = f"{e.filename}: {e.strerror}"
    else:
        text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def debug() -> bool:
    """``FLASHMOE_DEBUG`` is set (and not ``0``): print tracebacks."""
    return os.environ.get("FLASHMOE_DEBUG", "") not in ("", "0")


def run_command(prog: str, body: Callable[[], int | None], *, resumable: bool = False) -> int:
    """Run ``body`` and map its outcome to the exit-code table above (``None`` counts as 0).

    ``resumable``: an interrupted run can be resumed by running it again (say so on Ctrl-C).
    """
    prog = _ranked(prog)
    _running.append(prog)
    try:
        code = body()
    except KeyboardInterrupt:
        if debug():
            traceback.print_exc()
        hint = f" ({RESUME_HINT})" if resumable else ""
        print(f"\n{prog}: interrupted{hint}", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except Exception as e:
        if debug():
            traceback.print_exc()
        if getattr(e, "silent", False):  # rank 0 of a distributed run reports it
            return EXIT_USAGE
        if is_user_error(e):
            print(f"{prog}: error: {error_line(e)}", file=sys.stderr, flush=True)
            return EXIT_USAGE
        print(
            f"{prog}: internal error: {type(e).__name__}: {error_line(e)} "
            "(a bug in flashmoe; FLASHMOE_DEBUG=1 shows the traceback)",
            file=sys.stderr,
            flush=True,
        )
        return EXIT_INTERNAL
    finally:
        _running.pop()
    return EXIT_OK if code is None else code


def command(prog: str, *, resumable: bool = False):
    """Decorate a console script's ``main(argv=None) -> int`` with :func:`run_command`."""

    def wrap(main: Callable[[list[str] | None], int | None]) -> Callable[..., int]:
        @functools.wraps(main)
        def wrapped(argv: list[str] | None = None) -> int:
            return run_command(prog, lambda: main(argv), resumable=resumable)

        return wrapped

    return wrap
