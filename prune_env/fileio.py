"""Writing files so that no reader, and no interrupted process, ever sees half of one.

Every file the package writes passes through here, so a full disk is reported in one place: an ``OSError``
``ENOSPC`` or ``EDQUOT`` becomes a :class:`~prune_env.errors.DiskFullError` naming the file, the bytes it
needed and the space left, and the file that was there before is left as it was.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from prune_env.errors import DiskFullError

# ENOSPC: the file system is full; EDQUOT: the user's quota on it is.
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def _size(n: int) -> str:
    """``n`` bytes for a person: exact below a KiB, else to a tenth of the largest unit."""
    exponent = min((n.bit_length() - 1) // 10, 4) if n > 0 else 0
    if exponent == 0:
        return f"{n:,} bytes"
    return f"{n / 1024**exponent:.1f} {('KiB', 'MiB', 'GiB', 'TiB')[exponent - 1]}"


def _free_space(path: Path) -> int | None:
    for where in (path.parent, *path.parent.parents):
        with contextlib.suppress(OSError):
            return shutil.disk_usage(where).free
    return None


@contextlib.contextmanager
def reporting_full_disk(path: str | os.PathLike[str], size: int | None) -> Iterator[None]:
    """Turn a full disk (or quota) while writing ``size`` bytes to ``path`` into a :class:`DiskFullError`."""
    try:
        yield
    except DiskFullError:
        raise
    except OSError as exc:
        if exc.errno not in DISK_FULL_ERRNOS:
            raise
        target = Path(path)
        free = _free_space(target)
        what = "no space left on the device" if exc.errno == errno.ENOSPC else "the disk quota is used up"
        needed = "" if size is None else f"{_size(size)} needed, "
        left = "" if free is None else f"{_size(free)} free there"
        space = f" ({needed}{left})" if needed or left else ""
        message = (
            f"{what}: cannot write {target}{space}; free some space or write elsewhere, then run the command "
            "again (the files already there were left as they were)"
        )
        raise DiskFullError(exc.errno, message, str(target)) from None


def _write_all(file: IO[Any], data: Any) -> None:
    """The one place bytes reach the disk (tests make it fail as a full disk would)."""
    file.write(data)


def write_bytes_atomic(
    path: str | os.PathLike[str],
    data: bytes,
    *,
    replace: bool = True,
    before_publish: Callable[[], object] | None = None,
) -> None:
    """Put ``data`` at ``path`` in one step: written to a temporary file beside it, flushed, renamed.

    ``replace=False``: ``path`` must not exist when the file is published; if another process created it
    meanwhile, :class:`FileExistsError` is raised and its file is left alone. ``before_publish`` is called
    once the data is on disk, just before the rename: the last moment to check that ``path`` is still what
    the caller may replace (whatever it raises leaves ``path`` as it was). On any failure, an interrupt
    included, the temporary file is removed and ``path`` is left as it was.
    """
    target = Path(path)
    with reporting_full_disk(target, len(data)):
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                _write_all(f, data)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)  # mkstemp creates 0600; these files are as readable as any other
            if before_publish is not None:
                before_publish()
            if replace:
                os.replace(tmp, target)
            else:
                _publish_new(Path(tmp), target)
        finally:
            Path(tmp).unlink(missing_ok=True)


def _publish_new(tmp: Path, target: Path) -> None:
    """Give ``tmp``'s content the name ``target`` only if nothing has that name (a hard link fails if it
    exists, atomically, where checking first and renaming would race another process)."""
    try:
        os.link(tmp, target)
    except FileExistsError:
        raise
    except OSError as exc:
        if exc.errno in DISK_FULL_ERRNOS:
            raise
        # A file system without hard links: check, then rename (a narrow race, but never a silent loss of
        # a file that was there when the check ran).
        if os.path.lexists(target):
            raise FileExistsError(errno.EEXIST, "exists", str(target)) from None
        os.rename(tmp, target)


def write_atomic(
    path: str | os.PathLike[str], write: Callable[[IO[Any]], object], *, binary: bool = False
) -> None:
    """Replace ``path`` in one step with what ``write(file)`` writes.

    ``write`` writes into memory first, so the size is known (and said if the disk is full) before the
    disk is touched; then :func:`write_bytes_atomic` puts it in place.
    """
    buffer = io.BytesIO()
    if binary:
        write(buffer)
    else:
        text = io.TextIOWrapper(buffer, newline="")  # the platform's encoding, as open(path, "w") uses
        write(text)
        text.flush()
        text.detach()
    write_bytes_atomic(path, buffer.getvalue())


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """:func:`write_atomic` for text."""
    write_atomic(path, lambda f: f.write(text))


def append_text(path: str | os.PathLike[str], text: str) -> None:
    """Append ``text`` to ``path`` with one write, flushed (a log row: a reader sees it whole or, after a
    hard kill, as a last line cut short)."""
    with reporting_full_disk(path, len(text.encode())), open(path, "a", newline="") as f:
        _write_all(f, text)
        f.flush()


__all__ = [
    "DISK_FULL_ERRNOS",
    "append_text",
    "reporting_full_disk",
    "write_atomic",
    "write_bytes_atomic",
    "write_text_atomic",
]
