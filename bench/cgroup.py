"""Child memory cgroups for memory-capped benchmark runs (cgroup v1 or v2, whichever exists).

The child group is created under the memory cgroup this process already belongs to, so the
capped measurement stays inside whatever limits apply to the caller. Page cache is charged to
the group that first faulted a page in: drop the benchmark files' cache before a capped run.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path

V1_ROOT = Path("/sys/fs/cgroup/memory")
V2_ROOT = Path("/sys/fs/cgroup")
_counter = itertools.count()


class CgroupError(RuntimeError):
    """No memory cgroup can be created here."""


def _own_path(version: str) -> str:
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if version == "v1" and "memory" in controllers.split(","):
            return path
        if version == "v2" and controllers == "":
            return path
    return "/"


def _detect() -> tuple[str, Path]:
    """(version, parent directory) for a new child group, or CgroupError saying why not."""
    if (V1_ROOT / "memory.limit_in_bytes").exists():
        return "v1", V1_ROOT / _own_path("v1").lstrip("/")
    if (V2_ROOT / "cgroup.controllers").exists():
        parent = V2_ROOT / _own_path("v2").lstrip("/")
        subtree = (parent / "cgroup.subtree_control").read_text().split()
        if "memory" not in subtree:
            raise CgroupError(
                f"cgroup v2: the memory controller is not enabled for children of {parent} "
                "(cgroup.subtree_control); run under a delegated cgroup (e.g. systemd-run --user "
                "--scope -p Delegate=yes) or as root"
            )
        return "v2", parent
    raise CgroupError("no memory cgroup hierarchy (neither /sys/fs/cgroup/memory nor cgroup v2)")


class MemoryCgroup:
    """A child memory cgroup with a hard limit; ``preexec`` moves a child process into it."""

    def __init__(self, limit_bytes: int, name: str | None = None):
        self.version, parent = _detect()
        self.limit = int(limit_bytes)
        self.path = parent / (name or f"flashmoe-bench-{os.getpid()}-{next(_counter)}")
        try:
            self.path.mkdir()
        except OSError as e:
            raise CgroupError(
                f"cannot create memory cgroup {self.path}: {e.strerror} "
                "(memory-capped runs need root or a delegated cgroup)"
            ) from None
        try:
            if self.version == "v1":
                self._write("memory.limit_in_bytes", self.limit)
                if (self.path / "memory.memsw.limit_in_bytes").exists():
                    self._write("memory.memsw.limit_in_bytes", self.limit)  # no swap escape
            else:
                self._write("memory.max", self.limit)
                if (self.path / "memory.swap.max").exists():
                    self._write("memory.swap.max", 0)
        except OSError as e:
            self.remove()
            raise CgroupError(f"cannot set the limit of {self.path}: {e.strerror}") from None

    def _write(self, name: str, value: int | str) -> None:
        (self.path / name).write_text(str(value))

    def _read(self, name: str) -> str:
        try:
            return (self.path / name).read_text()
        except OSError:
            return ""

    def preexec(self) -> None:
        """For ``subprocess.Popen(preexec_fn=...)``: join the group before exec."""
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def peak_bytes(self) -> int | None:
        """Peak memory charged to the group (RSS + page cache), if the kernel reports it."""
        name = "memory.max_usage_in_bytes" if self.version == "v1" else "memory.peak"
        text = self._read(name).strip()
        return int(text) if text.isdigit() else None

    def oom_kills(self) -> int | None:
        """OOM kills inside the group (v1 ``memory.oom_control``, v2 ``memory.events``)."""
        name = "memory.oom_control" if self.version == "v1" else "memory.events"
        for line in self._read(name).splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return None

    def remove(self) -> None:
        try:
            if self.version == "v1" and (self.path / "memory.force_empty").exists():
                try:
                    self._write("memory.force_empty", 0)
                except OSError:
                    pass
            self.path.rmdir()
        except OSError:
            pass

    def __enter__(self) -> MemoryCgroup:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def check_available() -> None:
    """Raise CgroupError if a child memory group cannot be created and limited here."""
    MemoryCgroup(1 << 30).remove()
