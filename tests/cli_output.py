"""What a command line error must look like: one line, the library's prefix, no traceback."""

from __future__ import annotations


def one_error_line(stderr: str) -> str:
    """The single ``prune-env: error: ...`` line of ``stderr`` (fails the test otherwise)."""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("prune-env: error: "), stderr
    assert "Traceback" not in stderr
    return lines[0]
