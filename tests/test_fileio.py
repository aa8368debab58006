"""flashmoe.fileio: the one atomic-write rule (temp beside the target, fsync, rename, fsync dir)."""

from __future__ import annotations

import errno
import os
import stat
import threading

import pytest

from flashmoe.fileio import atomic_write, commit


def test_atomic_write_replaces_and_leaves_nothing_behind(tmp_path):
    path = tmp_path / "index.json"
    atomic_write(path, "first")
    atomic_write(path, b"second \xff")
    assert path.read_bytes() == b"second \xff"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert os.listdir(tmp_path) == ["index.json"]


def test_a_failed_write_keeps_the_old_file(tmpfs):
    root = tmpfs("64k")
    path = root / "index.json"
    atomic_write(path, "old")
    with pytest.raises(OSError) as e:
        atomic_write(path, b"x" * (1 << 20))  # the filesystem is full long before this
    assert e.value.errno in (errno.ENOSPC, errno.EDQUOT)
    assert path.read_text() == "old"
    assert os.listdir(root) == ["index.json"]


def test_concurrent_writers_never_mix(tmp_path):
    path = tmp_path / "marker"
    contents = [bytes([65 + i]) * 200_000 for i in range(8)]
    threads = [threading.Thread(target=atomic_write, args=(path, c)) for c in contents]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert path.read_bytes() in contents
    assert os.listdir(tmp_path) == ["marker"]


def test_commit_renames_a_file_written_through_its_fd(tmp_path):
    temp, final = tmp_path / "layer.bin.partial", tmp_path / "layer.bin"
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(fd, b"record")
    commit(fd, temp, final, drop_cache=True)
    assert final.read_bytes() == b"record" and not temp.exists()
    with pytest.raises(OSError):
        os.fstat(fd)  # closed


def test_converter_direct_writes_fall_back_when_unaligned(tmp_path):
    """flashmoe.convert.fileio: a layer file opened for direct I/O takes aligned records straight
    to disk; an unaligned write or read on it (refused by the kernel) is done the ordinary way."""
    import fcntl

    from flashmoe.convert import fileio

    def is_direct(fd: int) -> bool:
        return bool(fileio.DIRECT and fcntl.fcntl(fd, fcntl.F_GETFL) & fileio.DIRECT)

    path = tmp_path / "layer.bin"
    fd = fileio.open_for_write(path, 4 * 4096, direct=True)
    try:
        opened_direct = is_direct(fd)  # Linux on a filesystem with direct I/O
        records = fileio.aligned_buffer(2 * 4096)
        records[:] = os.urandom(2 * 4096)
        fileio.pwrite_full(fd, records, 4096)
        assert is_direct(fd) == opened_direct  # aligned: written directly
        odd = memoryview(bytearray(os.urandom(5001)))[1:]  # unaligned address and length
        fileio.pwrite_full(fd, odd, 3 * 4096 + 10)
        assert not is_direct(fd)
    finally:
        os.close(fd)
    data = path.read_bytes()
    assert data[:4096] == bytes(4096) and data[4096 : 3 * 4096] == records
    assert data[3 * 4096 + 10 :] == odd

    fd = os.open(path, os.O_RDONLY | fileio.DIRECT)
    try:
        back = memoryview(bytearray(5001))[1:]
        fileio.preadv_full(fd, [back], 3 * 4096 + 10, path)
        assert back == odd and not is_direct(fd)
    finally:
        os.close(fd)
