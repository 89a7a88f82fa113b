"""Where a command writes: every output path checked before any work, and published without overwriting.

``prune-env apply`` (a model directory) and ``export`` (files) check each output before they load
anything: the path must be writable, not blocked by a file where a directory must go (or the reverse), not
shared by two outputs however it is spelled, not one of the command's own inputs, and, unless ``--force``
is given, not there already. The result is made beside the target under a temporary name and renamed onto
it at the end; without ``--force`` the rename refuses a target another process created meanwhile, so two
commands writing one path never both report it saved.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from prune_env.checkpoint import SPEC_FILE, WEIGHTS_FILE
from prune_env.errors import DiskFullError, InvalidSettingError
from prune_env.fileio import reporting_full_disk, write_bytes_atomic

# What a directory may hold for --force to replace it: a saved model and nothing else.
MODEL_FILES = frozenset({SPEC_FILE, WEIGHTS_FILE})


def _cannot(option: str, out: Path, why: str) -> InvalidSettingError:
    return InvalidSettingError(f"cannot write {option} {out}: {why}")


def _exists(option: str, out: Path, fix: str) -> InvalidSettingError:
    return InvalidSettingError(f"{option} {out} exists; {fix} (nothing is overwritten without --force)")


def _is_model_directory(path: Path) -> bool:
    names = {p.name for p in path.iterdir()}
    return names <= MODEL_FILES


def _identity(path: Path) -> tuple[object, ...]:
    """What two spellings of one file share: its device and inode if it exists, else its resolved path."""
    try:
        st = path.stat()
    except OSError:
        return ("path", os.path.realpath(path))
    return ("inode", st.st_dev, st.st_ino)


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

    A directory, a non-regular file, or (without ``force``) an existing file at a path is refused, as are
    two outputs at one path and an output that is one of ``inputs``.
    """
    taken = {_identity(p): "the input" for p in inputs}
    paths = []
    for given, option, example in outputs:
        if not str(given).strip():
            raise InvalidSettingError(f"{option} is empty; pass the path of the file to write")
        out = Path(given)
        if out.is_dir():
            raise InvalidSettingError(
                f"{option} {out} is a directory; pass the path of the file to write, e.g. {out / example}"
            )
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


def publish_file(out: Path, data: bytes, *, force: bool, option: str) -> None:
    """Write ``data`` at ``out`` atomically; without ``force``, refuse a file that appeared since the check."""
    try:
        write_bytes_atomic(out, data, replace=force)
    except FileExistsError:
        raise _appeared(option, out) from None


def _appeared(option: str, out: Path) -> InvalidSettingError:
    return InvalidSettingError(
        f"{option} {out} was created by another process while this one ran; it was left as it is and this "
        f"result was not saved: pass another {option}, or --force to replace it"
    )


def check_directory_output(given: str | os.PathLike[str], option: str, *, force: bool) -> Path:
    """Check a directory output (a saved model) before any work; returns its path.

    A file there is refused; an existing directory only with ``force``, and then only if it holds a saved
    model and nothing else (an empty directory counts as absent): ``force`` never deletes a user's files.
    """
    if not str(given).strip():
        raise InvalidSettingError(
            f"{option} is empty; name the directory to write, e.g. {option} models/small"
        )
    out = Path(given)
    if os.path.lexists(out):
        if not out.is_dir():
            raise InvalidSettingError(
                f"{option} {out} is a file, not a directory; pass a directory to create"
            )
        if any(out.iterdir()):
            if not _is_model_directory(out):
                raise InvalidSettingError(
                    f"{option} {out} is a directory holding other files than a saved model; nothing in it is "
                    f"replaced, even with --force: pass another {option}"
                )
            if not force:
                raise _exists(option, out, f"pass --force to replace the model in it, or another {option}")
    _check_parent(out, option)
    return out


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


def publish_directory(stage: Path, out: Path, *, force: bool, option: str) -> None:
    """Rename ``stage`` onto ``out``: into a free (or empty) place, or with ``force`` over the model that is
    there (set aside first and deleted once the new one is in place)."""
    aside = None
    if force and os.path.lexists(out) and any(out.iterdir()):
        aside = out.parent / f".{out.name}.{secrets.token_hex(4)}.old"
        os.rename(out, aside)
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
    "check_directory_output",
    "check_file_outputs",
    "publish_directory",
    "publish_file",
    "staging_directory",
]
