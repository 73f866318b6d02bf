"""Where d2r writes: an output place is checked before any work (`check_writable`), files made
through a temp file get the mode the user's umask gives (`follow_umask`; mkstemp makes them
0600, which hides results from colleagues on a shared cluster), and an OSError is told in one
line with its fix (`describe`). A file is replaced atomically (`atomic_write`: temp file,
fsync, rename) and identified by its bytes (`file_sha256`). A read-modify-write of a shared file,
or a directory one process owns at a time, holds an exclusive lock on a lock file (`Lock`)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# errno -> what to do about it, for the one-line messages
_FIXES = {
    errno.ENOSPC: "free disk space or choose another place",
    errno.EDQUOT: "free space in your quota or choose another place",
    errno.EACCES: "fix its permissions or choose a place you can write to",
    errno.EPERM: "fix its permissions or choose a place you can write to",
    errno.EROFS: "the file system is read-only: choose another place",
    errno.ENOTDIR: "a part of the path is a file, not a directory: choose another path",
    errno.EEXIST: "a file of that name is in the way: choose another path",
    errno.ENOENT: "check the path",
}


def umask() -> int:
    """The process's umask. Read from /proc (Linux), which changes nothing; elsewhere set and
    restored, which another thread could observe in between, so that is the fallback only."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(fd_or_path: int | str | Path) -> None:
    """Give a file made by tempfile.mkstemp (mode 0600) the mode a plain open() would have."""
    mode = 0o666 & ~umask()
    if isinstance(fd_or_path, int):
        os.fchmod(fd_or_path, mode)
    else:
        os.chmod(fd_or_path, mode)


def describe(err: OSError, path: bool = True) -> str:
    """ "'runs/x': Permission denied; fix its permissions or choose a place you can write to":
    the file (with `path`), what happened, and the fix when the errno says what it is."""
    what = err.strerror or str(err)
    if path and err.filename is not None:
        what = f"{str(err.filename)!r}: {what}"
    fix = _FIXES.get(err.errno) if err.errno is not None else None
    return f"{what}; {fix}" if fix else what


def check_writable(directory: str | Path, what: str = "output directory") -> Path:
    """Refuse, before any work, a directory that cannot be created or written: ValueError naming
    it, the reason and the fix. It is created (with its parents) to probe a write, and whatever
    the probe created is removed again, so a check leaves no trace: the caller's own writes
    create the directory when they come."""
    directory = Path(directory).expanduser()
    created = [p for p in (directory, *directory.parents) if not p.exists()]  # deepest first
    probe = directory / f".d2r-write-test-{os.getpid()}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"\0" * 4096)  # a block: a full disk fails here, not at the end
    except OSError as err:
        reason = describe(err, path=False)
        raise ValueError(f"cannot write to {what} {str(directory)!r}: {reason}") from None
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()
        with contextlib.suppress(OSError):
            for path in created:
                path.rmdir()
    return directory


def new_temp_dir(prefix: str) -> Path:
    """A fresh directory under the system's temp directory, with the umask's mode (mkdtemp
    makes it 0700)."""
    directory = Path(tempfile.mkdtemp(prefix=prefix))
    directory.chmod(0o777 & ~umask())
    return directory


def atomic_write(path: str | Path, data: bytes) -> None:
    """Write to a temp file in the same directory, fsync, then rename over `path`: a crash
    leaves either the old file or the new one, never a half-written one. The file gets the mode
    the umask gives (as metrics.jsonl does), not mkstemp's 0600."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            follow_umask(f.fileno())
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # not supported on every platform; the rename is still atomic
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, text.encode())


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file's bytes, hex."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


class Busy(ValueError):
    """A lock taken with wait=False found held: the message names the holder."""


class Lock:
    """An exclusive `fcntl.flock` on the lock file `path`, held until `close()` (or the
    object's collection), which removes the file, so a run or study ended leaves no trace; if
    its process is killed the kernel drops the lock, so a killed holder never blocks anyone
    (its file stays, and the next holder takes it over). `wait`: block until it is free; else
    raise Busy at once, naming `what` (the thing the lock guards), the holder, and `fix`. A
    holder given `what` writes its pid, host, command and start time into the file for that
    message. `waiting(holder)` is called before blocking on a held lock."""

    def __init__(
        self,
        path: str | Path,
        *,
        wait: bool = True,
        what: str | None = None,
        fix: str = "",
        waiting: Callable[[str], None] | None = None,
    ) -> None:
        self.path, self.fd = Path(path), -1
        while self.fd < 0:  # again when the file was removed (released) while we waited
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666 & ~umask())
            try:
                self._take(fd, wait, what, fix, waiting)
                waiting = None  # said once
                current = os.stat(self.path).st_ino if self.path.exists() else None
            except BaseException:
                os.close(fd)
                raise
            if current == os.fstat(fd).st_ino:
                self.fd = fd
            else:
                os.close(fd)
        if what is not None:
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, holder_text().encode(), 0)

    def _take(self, fd: int, wait: bool, what: str | None, fix: str, waiting: Any) -> None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EAGAIN, errno.EACCES):  # no locks on this file system
                _warn_unlocked(self.path, err)
                return
            self._held(fd, wait, what, fix, waiting)

    def _held(self, fd: int, wait: bool, what: str | None, fix: str, waiting: Any) -> None:
        """Another process holds it: refuse, or say so and wait."""
        holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
        if not wait:
            refusal = f"{what or repr(str(self.path))} is in use by {holder}"
            raise Busy(f"{refusal}; {fix}" if fix else refusal)
        if waiting is not None:
            waiting(holder)
        fcntl.flock(fd, fcntl.LOCK_EX)

    def close(self) -> None:
        """Release: remove the file while still holding it (a process that opened it
        meanwhile sees it gone and opens the next one), then unlock."""
        if self.fd < 0:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()
        os.close(self.fd)
        self.fd = -1

    def __del__(self) -> None:
        self.close()

    def __enter__(self) -> Lock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_WARNED: set[int] = set()


def _warn_unlocked(path: Path, err: OSError) -> None:
    """A file system without flock (some NFS mounts): go on unlocked, said once per device."""
    device = os.stat(path.parent).st_dev
    if device not in _WARNED:
        _WARNED.add(device)
        print(
            f"d2r: warning: cannot lock {str(path)!r} ({err.strerror or err}); going on "
            "without: do not run two d2r processes on one directory there",
            file=sys.stderr,
        )


def lock_holder(path: str | Path) -> str | None:
    """Who holds the Lock at `path` (its holder text), or None when nobody does; only looks:
    a missing lock file is not created, a free one not taken over."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as err:
        if err.errno in (errno.EAGAIN, errno.EACCES):
            return os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
        return None  # no locks on this file system: nothing to tell
    finally:
        os.close(fd)  # also drops the shared lock taken above
    return None


def locked(path: str | Path, **options: Any) -> Lock:
    """`with locked(path): ...`: the block runs holding the lock (see Lock)."""
    return Lock(path, **options)


def holder_text() -> str:
    """'pid 123 on host (d2r sweep s.yaml --out x) since 2025-01-01T10:00:00': who holds a lock."""
    program = "d2r" if sys.argv[0].endswith(("d2r", "__main__.py")) else Path(sys.argv[0]).name
    command = " ".join([program, *sys.argv[1:]])
    since = time.strftime("%Y-%m-%dT%H:%M:%S")
    return f"pid {os.getpid()} on {socket.gethostname()} ({command}) since {since}\n"
