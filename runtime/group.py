"""The ranks of an ``mx.distributed`` group: start-up agreement, one-line errors, no hangs.

mlx-lm's pipelined models talk over MLX's global group (``mx.distributed.init()``, configured by
``mlx.launch``). Around that, a command needs: every rank checks it has the same layout before
loading anything; a failure is reported once, by rank 0, and every rank exits non-zero; and no
rank waits forever for one that vanished. A dead process closes its sockets and MLX usually raises
at once, but not always (an evaluation waiting on a failed transfer can hang), and a host that
drops off the network raises nothing: hence the watchdog.
"""

from __future__ import annotations

import atexit
import hashlib
import os
import re
import select
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import mlx.core as mx
import numpy as np

from ..cli import EXIT_USAGE, current_prog, error_line, is_user_error

T = TypeVar("T")

TIMEOUT_ENV = "FLASHMOE_RANK_TIMEOUT"
DEFAULT_TIMEOUT_S = 600.0
_MESSAGE_BYTES = 400  # an error line carried from a rank to rank 0 at start-up
_LOST = "connection to a peer was lost"  # MLX's ring backend, when a peer's socket closes
# What libmlx prints on stderr when a peer's socket closes; it then fails the pending tasks, but
# an evaluation waiting on one of them may never return (seen with mlx-lm's asynchronous step).
_LOST_MARKERS = (b"was closed by the peer", b"Too many send/recv errors", b"failed with errno")
_LOST_GRACE_S = 3.0  # time for the error to surface on its own before the watchdog steps in
_PARTIAL_HOLD_S = 0.2  # an unterminated line waits this long for its rest (a ring message's)


class RankError(RuntimeError):
    """A failure that every rank knows about; rank 0 reports it, the others exit silently."""

    def __init__(self, message: str, *, silent: bool):
        super().__init__(message)
        self.silent = silent  # flashmoe.cli prints nothing for it (exit 2 all the same)


def world(group: mx.distributed.Group | None = None) -> mx.distributed.Group | None:
    """``group``, else MLX's global group: the ranks ``mlx.launch`` started (connecting to them
    under the watchdog), or this process alone (then None)."""
    if group is None:
        rank = os.environ.get("MLX_RANK")
        if rank is None:  # no launcher configured a ring: nothing to connect to, no wait
            group = mx.distributed.init()
        else:
            with _guarded("connecting to the other ranks", rank=int(rank) if rank.isdigit() else 0):
                group = mx.distributed.init()
    if group.size() < 2:
        return None
    _filter_ring_messages()
    return group


def timeout_s() -> float:
    """Seconds a rank waits for the others without progress (``FLASHMOE_RANK_TIMEOUT``)."""
    raw = os.environ.get(TIMEOUT_ENV)
    if raw is None:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0 or value == float("inf"):
        raise ValueError(f"{TIMEOUT_ENV}={raw!r} must be a positive number of seconds")
    return value


def agree(
    group: mx.distributed.Group,
    prepare: Callable[[], T],
    identity: Callable[[T], bytes] | None = None,
    discard: Callable[[T], None] | None = None,
    what: str = "waiting for the other ranks",
    differs: str = "layout",
    compared: str = "",
) -> T:
    """Run ``prepare`` on every rank, then check that all succeeded (and, with ``identity``,
    that all have the same identity, compared by sha256).

    A rank whose ``prepare`` fails still takes part in the exchange, so the others never wait
    for it: every rank raises ``RankError`` naming the first failing rank (or the first whose
    identity differs from rank 0's: "a different ``differs``", ``compared`` naming what was
    hashed), after ``discard``-ing what it prepared. A bug (not a user error) is re-raised where
    it happened. ``what`` names the wait for the watchdog.
    """
    rank = group.rank()
    try:
        value, failure = prepare(), None
        mine = hashlib.sha256(identity(value) if identity else b"").digest()
    except Exception as e:
        value, failure, mine = None, e, bytes(32)
    text = b"" if failure is None else error_line(failure).encode()[:_MESSAGE_BYTES]
    record = np.zeros(1 + 32 + _MESSAGE_BYTES, dtype=np.uint8)
    record[0] = failure is not None
    record[1:33] = np.frombuffer(mine, dtype=np.uint8)
    record[33 : 33 + len(text)] = np.frombuffer(text, dtype=np.uint8)
    with waiting(what, rank=rank):
        rows = np.array(all_gather(group, mx.array(record))).reshape(group.size(), -1)
    if failure is not None and not is_user_error(failure):
        raise failure
    error = None
    for r, row in enumerate(rows):
        if row[0]:
            line = bytes(row[33:]).rstrip(b"\0").decode(errors="replace")
            error = f"rank {r}: {line}"
            break
    else:
        for r, row in enumerate(rows):
            if bytes(row[1:33]) != bytes(rows[0][1:33]):
                error = (
                    f"rank {r} has a different {differs} than rank 0 ({compared}sha256 "
                    f"{bytes(row[1:7]).hex()}... vs {bytes(rows[0][1:7]).hex()}...)"
                )
                break
    if error is not None:
        if failure is None and discard is not None:
            discard(value)
        raise RankError(error, silent=rank != 0)
    return value


def settle() -> None:
    """Wait for the model's work in flight (mlx-lm's generation ends with a step evaluated
    asynchronously, whose collectives would otherwise pair up with ours across ranks)."""
    from mlx_lm.generate import generation_stream

    mx.synchronize(generation_stream)
    mx.synchronize()


def finish(group: mx.distributed.Group) -> None:
    """Wait for this rank's work in flight before it closes or exits (under the watchdog; a
    failure there is the one already being reported, if any)."""
    with waiting("finishing", rank=group.rank()):
        try:
            settle()
        except RuntimeError:
            pass


def all_gather(group: mx.distributed.Group, x: mx.array) -> mx.array:
    """``x`` of every rank, concatenated along axis 0 (evaluated, on the CPU stream)."""
    settle()
    out = mx.distributed.all_gather(x, group=group, stream=mx.cpu)
    mx.eval(out)
    return out


def gather_bytes(group: mx.distributed.Group, blob: bytes, what: str) -> list[bytes]:
    """Every rank's ``blob`` (any lengths), by rank."""
    with waiting(what, rank=group.rank()):
        sizes = np.array(all_gather(group, mx.array([len(blob)], dtype=mx.int64))).tolist()
        longest = max(sizes)
        if longest == 0:
            return [b""] * len(sizes)
        padded = np.zeros(longest, dtype=np.uint8)
        padded[: len(blob)] = np.frombuffer(blob, dtype=np.uint8)
        rows = np.array(all_gather(group, mx.array(padded))).reshape(len(sizes), longest)
    return [row[:n].tobytes() for row, n in zip(rows, sizes, strict=True)]


def gather_rows(group: mx.distributed.Group, values: list[float], what: str) -> list[list[float]]:
    """Every rank's ``values`` (same length everywhere), by rank."""
    with waiting(what, rank=group.rank()):
        out = all_gather(group, mx.array(np.array(values, dtype=np.float32)))
    return np.array(out).reshape(group.size(), -1).tolist()


def shared_seed(group: mx.distributed.Group, seed: int | None) -> int:
    """``seed``, or rank 0's random one: every rank must sample the same tokens."""
    if seed is not None:
        return seed
    mine = int(np.random.default_rng().integers(0, 2**31)) if group.rank() == 0 else 0
    settle()
    with waiting("agreeing on a seed", rank=group.rank()):
        out = mx.distributed.all_sum(mx.array(mine, dtype=mx.int32), group=group, stream=mx.cpu)
        return int(out.item())


def barrier(group: mx.distributed.Group, what: str) -> None:
    """Return once every rank got here."""
    settle()
    with waiting(what, rank=group.rank()):
        mx.eval(mx.distributed.all_sum(mx.array(1.0), group=group, stream=mx.cpu))


def lost_connection(e: BaseException) -> bool:
    """Whether ``e`` is MLX's error for a peer rank that went away."""
    return isinstance(e, RuntimeError) and _LOST in str(e)


@contextmanager
def reporting(group: mx.distributed.Group | None) -> Iterator[None]:
    """Turn MLX's lost-connection error into one ``RankError`` (reported by rank 0 only)."""
    try:
        yield
    except RuntimeError as e:
        if group is None or not lost_connection(e):
            raise
        raise RankError(LOST_LINE, silent=group.rank() != 0) from None


LOST_LINE = "lost the connection to another rank (it exited, or its host is unreachable)"


# --- the watchdog ---


class _Watchdog:
    """Ends the process (exit 2, one line from rank 0) when a wait makes no progress for
    ``timeout_s()`` (a blocked receive from a host that vanished never returns otherwise), or
    does not end within a few seconds of libmlx saying that a peer's socket closed."""

    def __init__(self):
        self._lock = threading.Lock()
        self._armed: tuple[str, int, float, Callable[[], object] | None, object] | None = None
        self._thread: threading.Thread | None = None
        self._since = 0.0
        self._lost_at: float | None = None

    def peer_lost(self) -> None:
        with self._lock:
            if self._lost_at is None:
                self._lost_at = time.monotonic()

    def arm(self, what: str, rank: int, progress: Callable[[], object] | None) -> None:
        limit = timeout_s()
        with self._lock:
            seen = progress() if progress else None
            self._armed = (what, rank, limit, progress, seen)
            self._since = time.monotonic()
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, daemon=True)
                self._thread.start()

    def disarm(self) -> None:
        with self._lock:
            self._armed = None

    def _run(self) -> None:
        while True:
            time.sleep(0.2)
            with self._lock:
                if self._armed is None:
                    continue
                what, rank, limit, progress, seen = self._armed
                lost = self._lost_at is not None
                if lost and time.monotonic() - self._lost_at > _LOST_GRACE_S:
                    break
                now = progress() if progress else None
                if now != seen:
                    self._armed = (what, rank, limit, progress, now)
                    self._since = time.monotonic()
                    continue
                if time.monotonic() - self._since < limit:
                    continue
                lost = False
                break
        if rank == 0:
            say(f"{current_prog()}: error: {LOST_LINE}" if lost else _timeout_line(what, limit))
        os._exit(EXIT_USAGE)


_watchdog = _Watchdog()


def _timeout_line(what: str, limit: float) -> str:
    return (
        f"{current_prog()}: error: no answer from the other ranks for {limit:.0f} s while {what} "
        f"(one died, never started or cannot be reached; {TIMEOUT_ENV} sets the limit)"
    )


# A helper process that kills its parent unless its stdin closes first (EOF: the parent is done,
# or gone). It checks that its parent is still the same process before it kills.
_GUARD = """
import os, select, signal, sys
ready, _, _ = select.select([0], [], [], float(sys.argv[1]))
if not ready and os.getppid() == int(sys.argv[2]):
    if sys.argv[3]:
        os.write(2, sys.argv[3].encode() + b"\\n")
    os.kill(int(sys.argv[2]), signal.SIGKILL)
"""


@contextmanager
def _guarded(what: str, *, rank: int) -> Iterator[None]:
    """``waiting`` for a call that holds the GIL, so no thread of ours runs until it returns
    (MLX's connect: the rank that accepts waits forever for a peer that never starts)."""
    limit = timeout_s()
    line = _timeout_line(what, limit) if rank == 0 else ""
    guard = subprocess.Popen(
        [sys.executable, "-I", "-S", "-c", _GUARD, str(limit), str(os.getpid()), line],
        stdin=subprocess.PIPE,
    )
    try:
        yield
    finally:
        guard.stdin.close()
        guard.wait()


@contextmanager
def waiting(
    what: str, *, rank: int, progress: Callable[[], object] | None = None
) -> Iterator[None]:
    """Watch a block that waits for other ranks: no change of ``progress()`` (if given) for
    ``timeout_s()`` ends the process."""
    _watchdog.arm(what, rank, progress)
    try:
        yield
    finally:
        _watchdog.disarm()


# --- MLX's ring messages on stderr ---

_real_stderr: int | None = None


def say(line: str) -> None:
    """Write one line to the real standard error, past the filter (safe before ``os._exit``)."""
    sys.stderr.flush()
    os.write(2 if _real_stderr is None else _real_stderr, (line + "\n").encode())


def _filter_ring_messages() -> None:
    """Drop libmlx's ``[ring] ...`` lines from stderr (kept with ``MLX_RING_VERBOSE``): when a
    peer goes away it prints a dozen ("Socket N was closed by the peer", ...) before the error,
    which we report in one line; they also tell the watchdog. Everything else passes unchanged
    (a line without its newline yet, after at most ``_PARTIAL_HOLD_S``)."""
    global _real_stderr
    if _real_stderr is not None:
        return
    sys.stderr.flush()
    _real_stderr = os.dup(2)
    read, write = os.pipe()
    os.dup2(write, 2)
    os.close(write)
    keep = bool(os.environ.get("MLX_RING_VERBOSE"))
    pump = threading.Thread(target=_pump, args=(read, _real_stderr, keep), daemon=True)
    pump.start()

    def restore() -> None:  # at exit: fd 2 back, so the pump sees EOF after the last line
        sys.stderr.flush()
        os.dup2(_real_stderr, 2)
        pump.join(timeout=2)

    atexit.register(restore)


# libmlx writes its ring messages a piece at a time ("[ring] Socket ", "4", " was closed by the
# peer", newline), so two threads' messages interleave, and a line of ours can land inside one.
_RING_PIECES = re.compile(
    rb"\[ring\] ?(?:Socket ?\d*|Too many send/recv errors\. Failing pending tasks\.\.\."
    rb"|(?:Sending to|Receiving from) socket ?\d*)"
    rb"|(?:Sending to|Receiving from) socket ?\d*"
    rb"|(?:Send|Recv)? ?\d* ?failed with errno ?=? ?\d*"
    rb"|\d* ?was closed by the peer"
)


def _unring(line: bytes) -> bytes | None:
    """``line`` without libmlx's ring messages; None when nothing else is left."""
    if not line:
        return line
    rest = _RING_PIECES.sub(b"", line)
    if rest.lstrip().startswith(b"[ring]"):  # another ring message, whole
        return None
    if rest == line:
        return line
    return rest.strip(b" ") or None


def _pump(read: int, out: int, keep: bool) -> None:
    pending = b""

    def ours(line: bytes) -> bytes | None:
        return line if keep else _unring(line)

    while True:
        if pending and not select.select([read], [], [], _PARTIAL_HOLD_S)[0]:
            part = ours(pending)  # a partial line (a prompt, a progress bar): now
            if part:
                os.write(out, part)
            pending = b""
            continue
        chunk = os.read(read, 65536)
        if not chunk:
            break
        *lines, pending = (pending + chunk).split(b"\n")
        if any(m in line for line in lines for m in _LOST_MARKERS):
            _watchdog.peer_lost()
        kept = (ours(line) for line in lines)
        text = b"".join(line + b"\n" for line in kept if line is not None)
        if text:
            os.write(out, text)
    part = ours(pending) if pending else None
    if part:
        os.write(out, part)
