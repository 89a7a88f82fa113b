"""Converting a policy saved in Stable-Baselines3's old pickled format, deliberately: the one place
prune-env unpickles a file, on the user's explicit call for a file they trust."""

from __future__ import annotations

from pathlib import Path

from agents.policies import (
    PICKLED_SB3_FILE,
    POLICY_META,
    meta_field,
    read_policy_meta,
    refuse,
    regular_file,
    short_value,
    trained_range,
)
from agents.sb3 import ALGOS, ENVS, SB3Policy


def convert_pickled_policy(directory: str | Path) -> Path:
    """Convert a policy saved in SB3's old pickled format (``policy.zip``) to the format :func:`load_policy`
    reads (``policy.pt`` of plain tensors and a new ``policy.json``); ``policy.zip`` is left as it was.

    This UNPICKLES ``policy.zip``, which runs any code the file carries: call it only on a file you
    trust (one you saved yourself), never on a run directory someone sent you.
    """
    path = Path(directory)
    file = path / POLICY_META
    meta = read_policy_meta(path)
    if "format" in meta:
        refuse(
            file,
            f"already in format {short_value(meta['format'])}, nothing to convert",
            "load it with load_policy",
        )
    algo = meta_field(
        meta, "algo", file, f"one of {sorted(ALGOS)}", lambda v: isinstance(v, str) and v in ALGOS
    )
    env = meta_field(meta, "env", file, f"one of {ENVS}", lambda v: isinstance(v, str) and v in ENVS)
    span = trained_range(meta, file)
    regular_file(path / PICKLED_SB3_FILE, "pickled SB3 policy")
    model = ALGOS[algo].load(path / PICKLED_SB3_FILE, device="cpu")
    return SB3Policy(algo, env, model.policy, span).save(path)


__all__ = ["convert_pickled_policy"]
