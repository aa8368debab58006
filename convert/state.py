"""Resumable conversions: what was asked for, and which output files are finished.

``OUT/.flashmoe-convert/`` holds ``source.json`` (a fingerprint of the source and the options)
and one small JSON record per finished output file (its size and checksums). A file counts as
finished only if it has a record *and* exists with the recorded size; anything else is redone.
The directory is removed once the index is written.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from ..fileio import atomic_write, fsync_dir, rename
from ..layouts import EXPERTS_DIR, INDEX_FILE, Index
from ..layouts.index import validate
from .errors import ConvertError
from .lock import LOCK_FILE

STATE_DIR = ".flashmoe-convert"
_TMP_STATE = STATE_DIR + ".tmp"


def _write_json(path: Path, data: dict) -> None:
    atomic_write(path, json.dumps(data, sort_keys=True))


def _record_name(name: str) -> str:
    return name.replace("/", "__") + ".json"


class ConversionState:
    def __init__(self, out: Path, fresh: bool = False) -> None:
        self.out = out
        self.dir = out / STATE_DIR
        self.fresh = fresh  # begun by this run in an empty directory

    @classmethod
    def begin(cls, out: Path, fingerprint: dict) -> ConversionState:
        """Start a new conversion in an empty ``out`` (created if missing)."""
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / _TMP_STATE
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "done").mkdir(parents=True)
        _write_json(tmp / "source.json", fingerprint)
        rename(tmp, out / STATE_DIR)
        return cls(out, fresh=True)

    @classmethod
    def resume(cls, out: Path, fingerprint: dict) -> ConversionState | None:
        """The state of an earlier run of the same conversion, or None if ``out`` holds none."""
        path = out / STATE_DIR / "source.json"
        if not path.is_file():
            return None
        try:
            previous = json.loads(path.read_text())
        except (OSError, ValueError):
            previous = None
        if previous != fingerprint:
            raise ConvertError(
                out,
                "holds an unfinished conversion of a different source or with different options; "
                "rerun that conversion, or remove the directory or choose another one",
            )
        return cls(out)

    def finished(self, name: str) -> dict | None:
        """The record of output file ``name`` if it is finished and still has its size."""
        try:
            record = json.loads((self.dir / "done" / _record_name(name)).read_text())
            if os.path.getsize(self.out / name) == record["size"]:
                return record
        except (OSError, ValueError, KeyError, TypeError):
            pass
        return None

    def mark_finished(self, name: str, record: dict) -> None:
        _write_json(self.dir / "done" / _record_name(name), record)

    def mark_part(self, name: str) -> None:
        """Record a step that is not an output file (a streamed conversion's fetched shard, or
        the dense tensors of one shard written in place)."""
        _write_json(self.dir / "done" / ("part--" + _record_name(name)), {})

    def has_part(self, name: str) -> bool:
        return (self.dir / "done" / ("part--" + _record_name(name))).is_file()

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
        fsync_dir(self.out)

    def any_finished(self) -> bool:
        try:
            return any((self.dir / "done").iterdir())
        except OSError:
            return False

    def discard(self) -> None:
        """Undo a fresh run that finished no file: the directory is empty again, so a retry
        (with any options) starts over instead of being refused as another conversion."""
        self.remove()
        for d in (self.out, self.out / EXPERTS_DIR):
            for p in d.glob("*.partial"):
                p.unlink(missing_ok=True)
        for p in self.out.glob(f".{INDEX_FILE}.*.tmp"):  # atomic_write's temporary name
            p.unlink(missing_ok=True)
        try:
            (self.out / EXPERTS_DIR).rmdir()
        except OSError:
            pass


def is_empty_output(out: Path) -> bool:
    """True if ``out`` is missing or holds nothing but a state directory that never got started
    (and the lock file of the run asking)."""
    if not out.exists():
        return True
    if not out.is_dir():
        raise ConvertError(out, "exists and is not a directory")
    return all(p.name in (_TMP_STATE, LOCK_FILE) for p in out.iterdir())


def has_index(out: Path) -> bool:
    return (out / INDEX_FILE).is_file()


def write_index(out: Path, index: Index) -> None:
    """Validate ``index`` and write it atomically and durably: the last step of a conversion (a
    layout with an index is complete)."""
    validate(index, str(out / INDEX_FILE))
    atomic_write(out / INDEX_FILE, index.to_json())
