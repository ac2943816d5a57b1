"""The project's one way to write files that other processes (or a later run after a crash) read.

Every writer goes through these few functions so that a kill at any moment leaves either the old or
the new content, never a torn file, and so that what a crash leaves behind is recognisable and cleaned:

* ``atomic_write(path, data)`` / ``atomic_write_text`` / ``atomic_write_json`` / ``atomic_save_npy``:
  write a sibling temp file ``.<name>.<pid>.tmp``, fsync it, ``os.replace`` it over ``path``, fsync the
  folder (so the rename itself survives a power cut).
* ``atomic_path(path)``: the same for libraries that insist on writing to a path themselves
  (``safetensors.save_file``, ``save_pretrained``, ``np.savez``); yields the temp path.
* ``atomic_dir(path)`` / ``replace_dir(staged, path)``: a whole folder (a model, a checkpoint) staged
  beside the target and swapped in with two renames (``path -> path.old``, ``staged -> path``);
  ``recover_dir(path)`` repairs what a kill between those renames leaves (a stale ``.old`` or ``.tmp``)
  and is called by ``replace_dir`` itself, so a later save always succeeds.
* ``clean_stale_tmp(folder)``: removes temp files whose writer process is gone (the PID is in the name).
* ``WriterLock(folder)``: an exclusive, non-blocking ``fcntl.flock`` on ``folder/.writer.lock`` holding
  the owner's PID; a second writer gets :class:`LockedError` naming that PID. The kernel drops the lock
  when the holder dies, so a crashed writer never leaves the folder locked. Readers take no lock.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

logger = logging.getLogger(__name__)

__all__ = [
    "LockedError", "WriterLock", "atomic_dir", "atomic_path", "atomic_save_npy", "atomic_write",
    "atomic_write_json", "atomic_write_text", "clean_stale_tmp", "fsync_dir", "pid_alive", "recover_dir",
    "replace_dir", "tmp_path",
]

LOCK_FILE = ".writer.lock"
# ".name.1234.tmp[.suffix]" (this module; a library may append its suffix), ".name.tmp-1234" (older index stores), ".prefix-tmp-1234..." (seismic).
_TMP_PATTERNS = (re.compile(r"^\..+\.(\d+)\.tmp(\..+)?$"), re.compile(r"^\..+\.tmp-(\d+)$"),
                 re.compile(r"^\..+-tmp-(\d+)(\..*)?$"))


# --------------------------------------------------------------------------------------- primitives
def tmp_path(path: str | Path) -> Path:
    """The temp sibling this process writes ``path`` through (same folder, so the rename is atomic)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def fsync_dir(folder: str | Path) -> None:
    """Flush a folder's entries (renames, new files) to disk; a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    if path.is_file():
        with open(path, "rb") as f:
            os.fsync(f.fileno())
        return
    for sub in sorted(path.rglob("*")):
        if sub.is_file():
            with open(sub, "rb") as f:
                os.fsync(f.fileno())
    for sub in [path, *(p for p in path.rglob("*") if p.is_dir())]:
        fsync_dir(sub)


@contextlib.contextmanager
def atomic_path(path: str | Path, fsync: bool = True) -> Iterator[Path]:
    """Yield a temp path to write (file or folder); on success it is fsynced and renamed onto ``path``.

    On an exception the temp is removed and ``path`` is untouched. A folder target that exists is
    swapped with :func:`replace_dir` (so ``os.replace`` never meets a non-empty folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path(path)
    _remove(tmp)
    try:
        yield tmp
        if tmp.is_dir():
            replace_dir(tmp, path, fsync=fsync)
            return
        if fsync:
            _fsync_tree(tmp)
        os.replace(tmp, path)
        if fsync:
            fsync_dir(path.parent)
    except BaseException:
        _remove(tmp)
        raise


def atomic_write(path: str | Path, data: bytes | str | Callable[[IO[bytes]], Any], fsync: bool = True) -> Path:
    """Write bytes, text (UTF-8) or whatever ``data(f)`` writes to a binary file, atomically."""
    path = Path(path)
    with atomic_path(path, fsync=fsync) as tmp, open(tmp, "wb") as f:
        if callable(data):
            data(f)
        else:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
    return path


def atomic_write_text(path: str | Path, text: str, fsync: bool = True) -> Path:
    return atomic_write(path, text, fsync=fsync)


def atomic_write_json(path: str | Path, obj: Any, indent: int | None = None, fsync: bool = True,
                      **dumps_kwargs: Any) -> Path:
    return atomic_write(path, json.dumps(obj, indent=indent, **dumps_kwargs), fsync=fsync)


def atomic_save_npy(path: str | Path, array: Any, fsync: bool = True) -> Path:
    import numpy as np

    return atomic_write(path, lambda f: np.save(f, array, allow_pickle=False), fsync=fsync)


# ---------------------------------------------------------------------------------------- folders
def _old(path: Path) -> Path:
    return path.with_name(path.name + ".old")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def recover_dir(path: str | Path) -> None:
    """Repair what an interrupted :func:`replace_dir` of ``path`` left.

    ``path.old`` without ``path`` is the last committed version (the kill fell between the two renames):
    it is renamed back. ``path.old`` beside ``path`` is garbage. Temp siblings of dead writers
    (``.path.<pid>.tmp``, and the legacy ``path.tmp``) are removed."""
    path = Path(path)
    old = _old(path)
    if old.exists():
        if path.exists():
            logger.info("removing %s left by an interrupted save", old)
            _remove(old)
        else:
            logger.warning("restoring %s from %s (a save was interrupted between its renames)", path, old)
            os.replace(old, path)
    legacy = path.with_name(path.name + ".tmp")
    if legacy.exists():
        logger.info("removing %s left by an interrupted save", legacy)
        _remove(legacy)
    if path.parent.is_dir():
        clean_stale_tmp(path.parent, stem=path.name)


def replace_dir(staged: str | Path, path: str | Path, fsync: bool = True) -> Path:
    """Move the complete folder ``staged`` to ``path``, replacing what is there, crash-safely.

    Readers see the old or the new folder (for an instant neither: between the two renames). A kill at
    any point is repaired here on the next call (or by :func:`recover_dir`): a leftover ``path.old`` is
    restored when ``path`` is missing and removed otherwise."""
    staged, path = Path(staged), Path(path)
    old = _old(path)
    if old.exists():  # an earlier replace was killed between its renames
        _remove(old) if path.exists() else os.replace(old, path)
    if fsync:
        _fsync_tree(staged)
    if path.exists():
        old = _old(path)
        os.replace(path, old)
        os.replace(staged, path)
        if fsync:
            fsync_dir(path.parent)
        _remove(old)
    else:
        os.replace(staged, path)
    if fsync:
        fsync_dir(path.parent)
    return path


@contextlib.contextmanager
def atomic_dir(path: str | Path, fsync: bool = True) -> Iterator[Path]:
    """Yield an empty staging folder; on success it replaces ``path`` (see :func:`replace_dir`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(path)
    staged = tmp_path(path)
    _remove(staged)
    staged.mkdir()
    try:
        yield staged
        replace_dir(staged, path, fsync=fsync)
    except BaseException:
        _remove(staged)
        raise


# ------------------------------------------------------------------------------- stale temp files
def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _tmp_pid(name: str) -> int | None:
    for pattern in _TMP_PATTERNS:
        m = pattern.match(name)
        if m:
            return int(m.group(1))
    return None


def clean_stale_tmp(folder: str | Path, stem: str | None = None) -> list[Path]:
    """Remove temp files/folders in ``folder`` whose writer PID is not running (never this process's).

    ``stem`` limits it to temps of one target name. Returns what was removed."""
    folder = Path(folder)
    removed: list[Path] = []
    try:
        entries = list(folder.iterdir())
    except FileNotFoundError:
        return removed
    for entry in entries:
        pid = _tmp_pid(entry.name)
        if pid is None or pid == os.getpid() or pid_alive(pid):
            continue
        if stem is not None and not entry.name.startswith(f".{stem}."):
            continue
        logger.info("removing %s (temp file of process %d, which is gone)", entry, pid)
        _remove(entry)
        removed.append(entry)
    return removed


# -------------------------------------------------------------------------------------- the lock
class LockedError(RuntimeError):
    """Another process holds the writer lock of a folder."""


class WriterLock:
    """Exclusive writer lock on a folder: ``with WriterLock(folder, what="index"): ...``.

    Non-blocking: a second writer fails at once with :class:`LockedError` naming the holder's PID
    (``timeout`` seconds > 0 waits that long first). Re-entrant within one process (nested ``with``
    on the same folder reuses the held lock)."""

    _held: dict[str, int] = {}  # resolved lock path -> nesting depth, this process

    def __init__(self, folder: str | Path, what: str = "folder", timeout: float = 0.0) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self.what = what
        self.timeout = timeout
        self._fd: int | None = None
        self._key = str(self.path.resolve())

    @property
    def depth(self) -> int:
        """How many nested ``with`` blocks of this process hold the lock now (0: not held)."""
        return WriterLock._held.get(self._key, 0)

    def holder(self) -> int | None:
        """PID written by the current (or last) holder, if readable."""
        try:
            text = self.path.read_text().strip()
            return int(text) if text else None
        except (OSError, ValueError):
            return None

    def acquire(self) -> WriterLock:
        import fcntl
        import time

        if WriterLock._held.get(self._key):
            WriterLock._held[self._key] += 1
            return self
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as err:
                if err.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    os.close(fd)
                    raise
                if time.monotonic() >= deadline:
                    os.close(fd)
                    pid = self.holder()
                    who = f"process {pid}" if pid else "another process"
                    raise LockedError(
                        f"{self.folder}: {self.what} is being written by {who} (lock {self.path}); "
                        "wait for it to finish, then retry. Readers are not blocked.") from None
                time.sleep(0.05)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        os.fsync(fd)
        self._fd = fd
        WriterLock._held[self._key] = 1
        return self

    def release(self) -> None:
        import fcntl

        depth = WriterLock._held.get(self._key, 0)
        if depth > 1:
            WriterLock._held[self._key] = depth - 1
            return
        WriterLock._held.pop(self._key, None)
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> WriterLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
