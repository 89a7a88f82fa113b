"""Where a command writes: every output path checked before any work, owned while it is written, and
published without overwriting anyone else's.

``prune-env apply`` (a model directory) and ``export`` (files) check each output before they load
anything: the path must be writable, not a symbolic link, not blocked by a file where a directory must go
(or the reverse), not shared by two outputs however it is spelled, not one of the command's own inputs,
and, unless ``--force`` is given, not there already.

Each output then belongs to this process until its result is published (:func:`owning`): an operating
system lock on a hidden file beside it, taken without waiting, so a second command writing the same path,
``--force`` or not, is refused at once naming the process that writes it, instead of both doing the work
and one silently replacing the other's result. The result is made beside the target under a temporary name
and renamed onto it at the end; the rename refuses a target that something not taking the lock created or
changed meanwhile, so a path is never reported saved when it holds another process's output.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import shutil
import socket
import stat
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import TypeAlias

from filelock import FileLock, Timeout

from prune_env.checkpoint import SPEC_FILE, WEIGHTS_FILE
from prune_env.errors import DiskFullError, InvalidSettingError
from prune_env.fileio import reporting_full_disk, write_bytes_atomic

# What a directory may hold for --force to replace it: a saved model and nothing else.
MODEL_FILES = frozenset({SPEC_FILE, WEIGHTS_FILE})

# flock's answers when another open file holds the lock (some file systems say EACCES).
_HELD_ERRNOS = frozenset({errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK})
# flock's answers on a file system that cannot lock at all: filelock then uses a marker file instead.
_NO_FLOCK_ERRNOS = frozenset({errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL})

# What an output was when its owner checked it (see _snapshot); None: nothing there.
Snapshot: TypeAlias = "tuple[object, ...] | None"


def _cannot(option: str, out: Path, why: str) -> InvalidSettingError:
    return InvalidSettingError(f"cannot write {option} {out}: {why}")


def _exists(option: str, out: Path, fix: str) -> InvalidSettingError:
    return InvalidSettingError(f"{option} {out} exists; {fix} (nothing is overwritten without --force)")


def _identity(path: Path) -> tuple[object, ...]:
    """What two spellings of one file share: its device and inode if it exists, else its resolved path."""
    try:
        st = path.stat()
    except OSError:
        return ("path", os.path.realpath(path))
    return ("inode", st.st_dev, st.st_ino)


def _refuse_a_link(out: Path, option: str) -> None:
    """An output whose own name is a symbolic link is refused before any work: the result is renamed onto
    that name, which would replace the link itself (a link to a file) or fail once all the work is done (a
    link to a directory), and writing through the link instead would put the result somewhere the command
    line does not say. The real path is unambiguous."""
    if out.is_symlink():
        real = os.path.realpath(out)
        raise InvalidSettingError(
            f"{option} {out} is a symbolic link (to {real}); outputs are never written through a link: pass "
            f"the real path ({option} {real}) or remove the link"
        )


def _check_parent(out: Path, option: str) -> None:
    """Create ``out``'s parent directories and prove a file can be created there (then removed)."""
    probe = out.parent / f".{out.name}.{secrets.token_hex(4)}.probe"
    try:
        with reporting_full_disk(out.parent, None):
            out.parent.mkdir(parents=True, exist_ok=True)
            # O_EXCL: never write through a file or link someone placed at that name.
            os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except (FileExistsError, NotADirectoryError):
        raise _cannot(option, out, f"a part of {out.parent} is a file, not a directory") from None
    except DiskFullError:
        raise
    except OSError as exc:
        raise _cannot(option, out, f"{exc.strerror} ({exc.filename or out.parent})") from None
    probe.unlink()


def check_file_outputs(
    outputs: Sequence[tuple[str | os.PathLike[str], str, str]],
    *,
    force: bool,
    inputs: Iterable[Path] = (),
) -> list[Path]:
    """Check ``(path, option, example file name)`` file outputs before any work; returns their paths.

    A symbolic link, a directory, a non-regular file, or (without ``force``) an existing file at a path is
    refused, as are two outputs at one path and an output that is one of ``inputs``.
    """
    taken = {_identity(p): "the input" for p in inputs}
    paths = []
    for given, option, example in outputs:
        if not str(given).strip():
            raise InvalidSettingError(f"{option} is empty; pass the path of the file to write")
        out = Path(given)
        if out.is_dir():  # a link to a directory too: a file in it is what the user can pass
            raise InvalidSettingError(
                f"{option} {out} is a directory; pass the path of the file to write, e.g. {out / example}"
            )
        _refuse_a_link(out, option)
        if os.path.lexists(out) and not out.is_file():
            raise InvalidSettingError(
                f"{option} {out} exists and is not a regular file; pass a file path to write"
            )
        key = _identity(out)
        if key in taken:
            holder = taken[key]
            what = "a file of the model being read" if holder == "the input" else f"the file {holder} writes"
            raise InvalidSettingError(f"{option} {out} is {what}; give each output a path of its own")
        taken[key] = option
        if out.exists() and not force:
            raise _exists(option, out, f"pass --force to replace it, or another {option}")
        _check_parent(out, option)
        paths.append(out)
    return paths


def check_directory_output(
    given: str | os.PathLike[str],
    option: str,
    *,
    force: bool,
    replaceable: frozenset[str] = MODEL_FILES,
    what: str = "model",
) -> Path:
    """Check a directory output (a saved model; ``what`` names another, made of ``replaceable`` files)
    before any work; returns its path.

    A symbolic link or a file there is refused; an existing directory only with ``force``, and then only
    if it holds ``replaceable`` files and nothing else (an empty directory counts as absent): ``force``
    never deletes a user's files.
    """
    if not str(given).strip():
        raise InvalidSettingError(
            f"{option} is empty; name the directory to write, e.g. {option} models/small"
        )
    out = Path(given)
    _refuse_a_link(out, option)
    if os.path.lexists(out):
        if not out.is_dir():
            raise InvalidSettingError(
                f"{option} {out} is a file, not a directory; pass a directory to create"
            )
        if any(out.iterdir()):
            if not {p.name for p in out.iterdir()} <= replaceable:
                saved = "a saved model" if what == "model" else f"a {what}"
                raise InvalidSettingError(
                    f"{option} {out} is a directory holding other files than {saved}; nothing in it is "
                    f"replaced, even with --force: pass another {option}"
                )
            if not force:
                raise _exists(option, out, f"pass --force to replace the {what} in it, or another {option}")
    _check_parent(out, option)
    return out


# ------------------------------------------------------------------------------------------------ ownership


def lock_path(out: Path) -> Path:
    """The file whose lock says who writes ``out``: hidden, beside it (so every spelling of ``out`` finds
    the same one, and a run directory's own lock file can never be it)."""
    return out.parent / f".{out.name}.prune-env.lock"


class OutputLock:
    """``out`` written by this process alone, from :meth:`acquire` until :meth:`release`.

    On POSIX an ``flock`` on :func:`lock_path`, which the kernel releases when the process ends however it
    ends. The holder removes the file before letting go, and a process that locks a file the name no
    longer leads to starts again, so a removed lock file can never be held by two processes; one a killed
    process left behind is harmless and taken over. Elsewhere (or where the file system cannot ``flock``)
    :class:`filelock.FileLock`, as run directories use.
    """

    def __init__(self, out: Path, option: str) -> None:
        self.out = out
        self.option = option
        self.path = lock_path(out)
        self._fd: int | None = None
        self._fallback: FileLock | None = None

    def acquire(self) -> None:
        """Take the lock without waiting, or raise :class:`InvalidSettingError` naming who holds it."""
        if self._fd is not None or self._fallback is not None:
            return
        if sys.platform == "win32":  # pragma: no cover - no flock there
            self._acquire_fallback()
            return
        while True:
            fd = self._open()
            try:
                taken = self._flock(fd)
            except OSError as exc:
                os.close(fd)
                raise _cannot(
                    self.option, self.out, f"cannot lock {self.path} ({exc.strerror or exc})"
                ) from None
            except BaseException:
                os.close(fd)
                raise
            if taken is None:  # the file system cannot flock
                os.close(fd)
                self._acquire_fallback()
                return
            if not taken:
                holder = self._holder(fd)
                os.close(fd)
                raise self._busy(holder)
            if self._still_named(fd):
                break
            os.close(fd)  # its holder removed it before letting go: lock the file the name leads to now
        self._fd = fd
        self._write_holder(fd)

    def _open(self) -> int:
        # O_NOFOLLOW: a link someone put at the lock's name is refused, never followed to another file.
        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
        try:
            return os.open(self.path, flags, 0o644)
        except OSError as exc:
            raise _cannot(
                self.option, self.out, f"cannot create its lock file {self.path} ({exc.strerror or exc})"
            ) from None

    @staticmethod
    def _flock(fd: int) -> bool | None:
        """Lock ``fd`` without waiting: True if taken, False if another process holds it, None if the file
        system has no ``flock``."""
        import fcntl

        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in _HELD_ERRNOS:
                return False
            if exc.errno in _NO_FLOCK_ERRNOS:
                return None
            raise
        return True

    def _still_named(self, fd: int) -> bool:
        try:
            return os.path.samestat(os.lstat(self.path), os.fstat(fd))
        except FileNotFoundError:
            return False

    def _acquire_fallback(self) -> None:
        lock = FileLock(self.path, timeout=0)
        try:
            lock.acquire()
        except Timeout:
            raise self._busy("another process") from None
        except OSError as exc:
            raise _cannot(self.option, self.out, f"cannot lock {self.path} ({exc.strerror or exc})") from None
        self._fallback = lock

    @staticmethod
    def _write_holder(fd: int) -> None:
        """Say in the lock file who holds it, so a refused process can name the holder."""
        owner = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": " ".join(" ".join(sys.argv).split()),
        }
        with contextlib.suppress(OSError):  # only a message reads it: the lock holds without it
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(owner) + "\n").encode(), 0)

    @staticmethod
    def _holder(fd: int) -> str:
        try:
            owner = json.loads(os.pread(fd, 65536, 0))
            return f"process {owner['pid']} on {owner['host']} (since {owner['started']}: {owner['command']})"
        except (OSError, ValueError, KeyError, TypeError):
            return "another process"  # it holds the lock but has not written its name yet

    def _busy(self, holder: str) -> InvalidSettingError:
        return InvalidSettingError(
            f"{self.option} {self.out} is being written by {holder}; nothing was done: wait for it to "
            f"finish, or pass another {self.option}"
        )

    def release(self) -> None:
        """Remove the lock file (while still holding it: see the class) and let go."""
        if self._fallback is not None:
            # Its file is filelock's to remove or keep: removing it after letting go could remove the file
            # a next holder has just locked, and a third process would then lock a new one beside it.
            self._fallback.release()
            self._fallback = None
            return
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            if self._still_named(fd):
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()
        finally:
            os.close(fd)  # closing the last descriptor releases the flock

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


def _snapshot(path: Path) -> Snapshot:
    """What is at ``path`` now, to tell at publishing whether anything else wrote it since: a file's inode,
    size and modification time; a directory's inode and those of the files in it. ``None``: nothing (or
    an empty directory) is there."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return None
    if not stat.S_ISDIR(st.st_mode):
        return ("file", st.st_dev, st.st_ino, st.st_mode, st.st_size, st.st_mtime_ns)
    entries = []
    for entry in sorted(path.iterdir()):
        est = entry.lstat()
        entries.append((entry.name, est.st_ino, est.st_mode, est.st_size, est.st_mtime_ns))
    # Not the directory's own times: renaming it (to set it aside) may change them.
    return ("directory", st.st_dev, st.st_ino, *entries) if entries else None


@contextlib.contextmanager
def owning(
    outputs: Sequence[tuple[Path, str]], check: Callable[[], object]
) -> Iterator[dict[Path, Snapshot]]:
    """Own every ``(path, option)`` output until the block ends; yields what each holds now.

    Call it after the outputs' checks and before any work: the locks are taken in one fixed order (so of
    two commands sharing outputs one wins, rather than each refusing the other), then ``check`` runs the
    checks again, since another process may have written an output between the first check and the lock.
    Each lock file is removed when the block ends.
    """
    with contextlib.ExitStack() as held:
        for out, option in sorted(outputs, key=lambda o: os.path.abspath(lock_path(o[0]))):
            held.enter_context(OutputLock(out, option))
        check()
        yield {out: _snapshot(out) for out, _ in outputs}


# ------------------------------------------------------------------------------------------------ publishing


def _appeared(option: str, out: Path, what: str = "created") -> InvalidSettingError:
    again = "--force to replace it" if what == "created" else "run this command again to replace it"
    return InvalidSettingError(
        f"{option} {out} was {what} by another process while this one ran; it was left as it is and this "
        f"result was not saved: pass another {option}, or {again}"
    )


def publish_file(out: Path, data: bytes, *, force: bool, option: str, seen: Snapshot) -> None:
    """Write ``data`` at ``out`` atomically. ``seen`` is what :func:`owning` found there: with ``force``
    that file is replaced, and only that one; a file that appeared, or changed, since is left as it is."""
    if not force or seen is None:
        try:
            write_bytes_atomic(out, data, replace=False)
        except FileExistsError:
            raise _appeared(option, out) from None
        return

    def unchanged() -> None:
        if _snapshot(out) not in (seen, None):
            raise _appeared(option, out, "replaced")

    write_bytes_atomic(out, data, before_publish=unchanged)


@contextlib.contextmanager
def staging_directory(out: Path) -> Iterator[Path]:
    """A fresh directory beside ``out`` to write into; removed on any failure (published ones are gone)."""
    stage = out.parent / f".{out.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp"
    with reporting_full_disk(stage, None):
        stage.mkdir()
    try:
        yield stage
    except DiskFullError as exc:  # name the file the user asked for, not its temporary place
        spelled = str(exc).replace(str(stage), str(out))
        raise DiskFullError(exc.errno, spelled, str(exc.filename).replace(str(stage), str(out))) from None
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def publish_directory(stage: Path, out: Path, *, force: bool, option: str, seen: Snapshot) -> None:
    """Rename ``stage`` onto ``out``: into a free (or empty) place, or with ``force`` over the model
    :func:`owning` found there (``seen``: set aside first, and deleted once the new one is in place). A
    directory that appeared since, or a model that changed, is left as it is and this one is not saved."""
    aside = None
    if force and seen is not None and os.path.lexists(out):
        aside = out.parent / f".{out.name}.{secrets.token_hex(4)}.old"
        os.rename(out, aside)
        if _snapshot(aside) != seen:
            try:
                os.rename(aside, out)
            except OSError:  # a third writer took the name in between: keep both, say where
                raise InvalidSettingError(
                    f"{option} {out} was replaced by other processes while this one ran; this result was not "
                    f"saved, and what was there is kept in {aside}"
                ) from None
            raise _appeared(option, out, "replaced")
    try:
        os.rename(stage, out)
    except OSError as exc:
        if aside is not None:
            with contextlib.suppress(OSError):
                os.rename(aside, out)
        if exc.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
            raise _appeared(option, out) from None
        raise
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


__all__ = [
    "OutputLock",
    "check_directory_output",
    "check_file_outputs",
    "lock_path",
    "owning",
    "publish_directory",
    "publish_file",
    "staging_directory",
]
