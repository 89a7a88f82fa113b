"""Problem settings that score policies quickly: what tests of behaviour need, not accuracy."""

from __future__ import annotations

from typing import Any

# 96 validation samples and one BatchNorm recalibration batch per evaluation.
QUICK_SCORING: dict[str, Any] = {"eval_samples": 96, "bn_recalib_batches": 1}
