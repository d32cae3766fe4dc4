"""One process per run directory: an exclusive OS lock on a file inside it.

The lock is `fcntl.flock` on ``<dir>/.fedftg.lock``, taken without waiting. The OS drops
it when its holder exits in any way (kill -9 included), so a lock is never stale; the file
says who holds it (pid and start time) for the message a refused run prints. The holder
deletes the file on release; a process that locked a file just deleted (or replaced) by
another checks that the path still names the file it locked, and tries again if not.

The lock file is written in place, not through a temporary file and a rename as every
other file is: the lock belongs to the file's inode, which a rename would replace.
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

LOCK_NAME = ".fedftg.lock"


class LockHeld(Exception):
    """The directory is locked by another process; ``holder`` says which (pid, start)."""

    def __init__(self, holder: str) -> None:
        super().__init__(holder)
        self.holder = holder


class DirLock:
    """An exclusive lock on one directory, held until `release` or the process's end."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, folder: Path) -> DirLock:
        """Lock ``folder`` (which must exist) at once, or raise `LockHeld`."""
        path = folder / LOCK_NAME
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise LockHeld(_holder(path)) from None
            except BaseException:
                os.close(fd)
                raise
            if _same_file(fd, path):
                break
            os.close(fd)  # the holder deleted the file as we opened it: lock the new one
        try:
            os.ftruncate(fd, 0)
            started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
            os.write(fd, f"{os.getpid()} {started}\n".encode())
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Delete the lock file and unlock; safe to repeat."""
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        except OSError:
            pass  # an unwritable directory keeps a lock file; the lock itself still goes
        finally:
            os.close(self._fd)  # closing the last descriptor drops the flock
            self._fd = None


def _same_file(fd: int, path: Path) -> bool:
    """Whether ``path`` still names the file open as ``fd``."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


def _holder(path: Path, tries: int = 20) -> str:
    """``pid N, started T`` from the lock file of another process (which writes it just
    after locking: a few short waits cover that moment)."""
    for _ in range(tries):
        try:
            pid, _, started = path.read_text().strip().partition(" ")
        except OSError:
            pid = started = ""
        if pid.isdigit():
            return f"pid {pid}, started {started}"
        time.sleep(0.01)
    return "pid unknown"
