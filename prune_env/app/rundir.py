"""Run directories: one process owns a directory for a whole run, and a user's files are never destroyed.

A search (``prune-env search --out DIR``) or a benchmark grid writes many files into one directory and
may be resumed later. Two processes writing into the same directory would silently replace or interleave
each other's rows, so :class:`RunDirectory` takes an operating-system lock on it (``filelock``: an
``flock`` that the kernel releases when the process dies, even by SIGKILL, so a crashed run never leaves
a stale lock). A second process is refused with the holder's process id, host and command.

Files are replaced atomically (written beside, then renamed), and a file that must be rewritten with
less in it (an evaluation log whose last line a hard kill cut short) is first copied aside, so nothing a
user had is lost.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from filelock import FileLock, Timeout

from prune_env.errors import ResumeError, RunDirectoryError
from prune_env.fileio import write_bytes_atomic, write_text_atomic

LOCK_FILE = ".prune-env.lock"
OWNER_FILE = ".prune-env.owner.json"


class RunDirectory:
    """A directory owned by this process from :meth:`open` (or ``with``) until :meth:`close`.

    Args:
        path: the directory; created if missing. It must not be a file or an empty path.
        run_files: names of the files and folders a run writes. Without ``resume`` a directory holding
            any of them is refused, whether or not its run finished or wrote a state file.
        resume: continue the run the directory holds; ``state_file`` must then exist.
        state_file: the file a resumable run is identified by (``None``: the directory is resumable
            whenever it exists, as a benchmark grid is).
        option: how the caller names the directory in messages (``--out`` on the command line).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        run_files: Sequence[str],
        resume: bool,
        state_file: str | None = None,
        option: str = "out",
    ) -> None:
        if not str(path).strip():
            raise RunDirectoryError(f"{option} is empty; name the run directory, e.g. {option} runs/my-run")
        self.path = Path(path)
        self.run_files = tuple(run_files)
        self.resume = resume
        self.state_file = state_file
        self.option = option
        self._lock: FileLock | None = None

    # -- ownership ------------------------------------------------------------------------------------
    def check(self) -> None:
        """What can be known before taking the lock: the path is a usable directory (or can be one).

        Cheap and side-effect free, so a caller can run it with its other argument checks, before any
        expensive work; :meth:`open` repeats it.
        """
        if self.path.exists() and not self.path.is_dir():
            raise RunDirectoryError(
                f"{self.option} {self.path} is a file, not a directory; choose a directory"
            )
        if not self.is_open and (self.path / LOCK_FILE).exists():
            self._refuse_if_held()
        if self.resume and self.state_file is not None and not (self.path / self.state_file).is_file():
            raise ResumeError(f"nothing to resume: {self.path} holds no {self.state_file}")
        if not self.resume:
            found = self.existing_run_files()
            if found:
                raise RunDirectoryError(
                    f"{self.path} already holds a run ({', '.join(found)}); add --resume to continue it or "
                    f"choose another {self.option}"
                )

    def _refuse_if_held(self) -> None:
        """Refuse, naming the holder, when another process holds the directory (tried, then let go)."""
        probe = FileLock(self.path / LOCK_FILE, timeout=0)
        try:
            probe.acquire()
        except Timeout:
            raise self._in_use() from None
        except OSError:
            return  # not lockable from here: open() reports that
        probe.release()

    def _in_use(self) -> RunDirectoryError:
        return RunDirectoryError(
            f"{self.path} is in use by {self._holder()}; wait for that run to finish or choose another "
            f"{self.option}"
        )

    def existing_run_files(self) -> list[str]:
        return [name for name in self.run_files if (self.path / name).exists()]

    def open(self) -> RunDirectory:
        """Create the directory if needed and lock it, or refuse naming the process that holds it."""
        self.check()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            lock = FileLock(self.path / LOCK_FILE, timeout=0)
            lock.acquire()
        except Timeout:
            raise self._in_use() from None
        except OSError as exc:
            raise RunDirectoryError(
                f"cannot use {self.path} as a run directory ({exc.strerror or exc}); choose a writable "
                f"{self.option}"
            ) from None
        self._lock = lock
        try:
            # Checked again under the lock: another process may have written a run in between.
            self.check()
            owner = {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "command": " ".join(sys.argv),
            }
            write_text_atomic(self.path / OWNER_FILE, json.dumps(owner) + "\n")
        except BaseException:
            self.close()
            raise
        return self

    def _holder(self) -> str:
        try:
            owner = json.loads((self.path / OWNER_FILE).read_text())
            return f"process {owner['pid']} on {owner['host']} (since {owner['started']}: {owner['command']})"
        except (OSError, ValueError, KeyError, TypeError):
            return "another process"  # it holds the lock but has not written its name yet

    def close(self) -> None:
        if self._lock is None:
            return
        try:
            (self.path / OWNER_FILE).unlink(missing_ok=True)
        finally:
            self._lock.release()
            self._lock = None

    @property
    def is_open(self) -> bool:
        return self._lock is not None

    def __enter__(self) -> RunDirectory:
        return self.open()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- files ----------------------------------------------------------------------------------------
    def keep_aside(self, name: str) -> Path:
        """Copy ``name`` to a new file beside it (``NAME.<time>.orig``) before it is rewritten."""
        source = self.path / name
        stamp = time.strftime("%Y%m%d-%H%M%S")
        target = self.path / f"{name}.{stamp}.orig"
        n = 1
        while target.exists():
            n += 1
            target = self.path / f"{name}.{stamp}-{n}.orig"
        write_bytes_atomic(target, source.read_bytes(), replace=False)
        shutil.copystat(source, target)
        return target


__all__ = ["LOCK_FILE", "OWNER_FILE", "RunDirectory"]
