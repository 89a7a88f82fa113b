"""Writing files so that no reader, and no interrupted process, ever sees half of one."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


def write_atomic(
    path: str | os.PathLike[str], write: Callable[[IO[Any]], object], *, binary: bool = False
) -> None:
    """Replace ``path`` in one step with what ``write(file)`` writes.

    The content goes to a fresh temporary file in the same directory (so the rename cannot cross file
    systems), is flushed to disk, and is renamed onto ``path``; on any failure, an interrupt included,
    the temporary file is removed and ``path`` is left as it was.
    """
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", newline="") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; these files are as readable as any other
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """:func:`write_atomic` for text."""
    write_atomic(path, lambda f: f.write(text))


__all__ = ["write_atomic", "write_text_atomic"]
