"""Describe the machine a benchmark ran on, and read the block device statistics of a path."""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path


def _read(path: str | Path, default: str = "") -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return default


def block_device(path: str | Path) -> str | None:
    """``/sys/dev/block/MAJ:MIN`` of the device holding ``path`` (a disk or partition), or None."""
    st = os.stat(path)
    sysdir = f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
    return sysdir if os.path.exists(f"{sysdir}/stat") else None


def sectors_read(sysdir: str | None) -> int | None:
    """Bytes read so far from a block device (``stat`` field 3 is 512-byte sectors)."""
    if not sysdir:
        return None
    fields = _read(f"{sysdir}/stat").split()
    return int(fields[2]) * 512 if len(fields) > 2 else None


def proc_read_bytes() -> int | None:
    """Bytes this process caused to be fetched from storage (``/proc/self/io`` read_bytes)."""
    for line in _read("/proc/self/io").splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    return None


def _disk(path: str | Path) -> dict:
    sysdir = block_device(path)
    if not sysdir:
        return {"path": str(path)}
    real = Path(os.path.realpath(sysdir))
    disk = real.parent if (real / "partition").exists() else real
    queue = disk / "queue"
    fs = ""
    mount = ""
    target = os.path.realpath(path)
    for line in _read("/proc/mounts").splitlines():
        parts = line.split()
        if len(parts) > 2 and target.startswith(parts[1]) and len(parts[1]) >= len(mount):
            mount, fs = parts[1], parts[2]
    return {
        "path": str(path),
        "device": real.name,
        "disk": disk.name,
        "model": _read(disk / "device" / "model") or _read(disk / "device" / "vendor") or None,
        "size_gb": round(int(_read(disk / "size", "0")) * 512 / 1e9, 1),
        "rotational": _read(queue / "rotational") == "1",
        "read_ahead_kb": int(_read(queue / "read_ahead_kb", "0") or 0),
        "scheduler": _read(queue / "scheduler") or None,
        "filesystem": fs or None,
        "mount": mount or None,
    }


def _cpu() -> dict:
    model = ""
    for line in _read("/proc/cpuinfo").splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    if not model and sys.platform == "darwin":
        import subprocess

        model = subprocess.run(
            ["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True
        ).stdout.strip()
    return {
        "model": model or platform.processor() or platform.machine(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "arch": platform.machine(),
    }


def _ram_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return None


def cgroup_version() -> str | None:
    if os.path.exists("/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        return "v1"
    if os.path.exists("/sys/fs/cgroup/cgroup.controllers"):
        return "v2"
    return None


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version(), "kernel": platform.release()}
    for pkg in ("mlx", "mlx-lm", "flashmoe", "numpy", "transformers"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def _backend() -> dict:
    import mlx.core as mx

    metal = bool(getattr(mx, "metal", None) and mx.metal.is_available())
    return {"device": str(mx.default_device()), "metal": metal}


def describe(path: str | Path | None = None) -> dict:
    """CPU, RAM, disk (of ``path``), backend, versions, page size and cgroup version."""
    ram = _ram_bytes()
    return {
        "system": f"{platform.system()} {platform.release()}",
        "hostname_hash": hash(platform.node()) & 0xFFFF,
        "cpu": _cpu(),
        "ram_gb": round(ram / 2**30, 1) if ram else None,
        "page_size": os.sysconf("SC_PAGE_SIZE"),
        "disk": _disk(path) if path else None,
        "backend": _backend(),
        "versions": _versions(),
        "cgroup": cgroup_version(),
    }


def summary(m: dict) -> str:
    """One line for tables: CPU, RAM, disk, backend, versions."""
    d = m.get("disk") or {}
    v = m["versions"]
    return (
        f"{m['cpu']['model']} ({m['cpu']['usable_cpus'] or m['cpu']['logical_cpus']} CPUs), "
        f"{m['ram_gb']} GiB RAM, page {m['page_size']} B; disk {d.get('disk')} "
        f"({d.get('filesystem')}, read_ahead {d.get('read_ahead_kb')} KiB, "
        f"{'rotational' if d.get('rotational') else 'non-rotational'}); "
        f"MLX {v['mlx']} ({m['backend']['device']}), mlx-lm {v['mlx-lm']}, "
        f"Python {v['python']}, kernel {v['kernel']}, cgroup {m['cgroup']}"
    )
