"""JSON for results and metadata: numpy values and paths become plain numbers, lists and strings."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def json_default(value: Any) -> Any:
    """``default=`` for :func:`json.dumps`: numpy arrays/scalars and paths; anything else is an error."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
