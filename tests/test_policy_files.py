"""Saved policies: written and read with nothing unpickled, deciding exactly as before saving; damaged or
edited policy files refused in one line naming the file; targets outside the trained range refused; and
no pickle payload planted in a file a run directory holds ever runs."""

from __future__ import annotations

import base64
import json
import pickle
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from agents import BudgetedEvaluator, search
from agents.pickled_sb3 import convert_pickled_policy
from agents.policies import POLICY_META, AllocationPolicy, load_policy
from agents.sb3 import SB3Policy, run_sb3
from prune_env.checkpoint import SPEC_FILE, WEIGHTS_FILE, load_pruned, save_pruned
from prune_env.data import Splits
from prune_env.errors import InvalidSettingError, PruneEnvError
from prune_env.graph import build_graph
from prune_env.models import get_model
from prune_env.problem import PruningProblem

TINY_SCORING = {"eval_samples": 32, "bn_recalib_batches": 1}
RANGE = (0.3, 0.7)
OLD_META = {"kind": "sb3", "algo": "ppo", "env": "oneshot", "budget_range": list(RANGE)}


@pytest.fixture(scope="module")
def tiny(digits: Splits) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return get_model("tiny", digits.num_classes, digits.in_channels).eval()


@pytest.fixture(scope="module")
def problem(tiny: nn.Module, digits: Splits) -> PruningProblem:
    return PruningProblem(tiny, digits, target_macs=0.5, **TINY_SCORING)


@pytest.fixture(scope="module")
def saved(problem: PruningProblem, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One saved policy of each kind, searched over RANGE with 4 evaluations."""
    root = tmp_path_factory.mktemp("policies")
    agents = {"sb3": "ppo", "amc": "amc", "predictor": "predictor", "allocation": "random"}
    return {
        kind: search(agent, problem, 4, seed=0, budget_range=RANGE).policy.save(root / kind)
        for kind, agent in agents.items()
    }


@pytest.fixture
def copy_of(saved: dict[str, Path], tmp_path: Path) -> Callable[[str], Path]:
    return lambda kind: Path(shutil.copytree(saved[kind], tmp_path / kind))


# ------------------------------------------------------------------------------------------------ round trip


@pytest.mark.parametrize(
    ("agent", "settings"),
    [
        ("ppo", {}),
        ("a2c", {}),
        ("sac", {}),
        ("td3", {}),
        ("ddpg", {}),
        ("amc", {}),
        ("ppo", {"env": "layer"}),
        ("amc", {"env": "oneshot"}),
        ("predictor", {}),
        ("random", {}),
        ("rlpruner", {}),
        ("evolution", {}),
    ],
)
def test_a_loaded_policy_decides_exactly_as_before_saving(
    problem: PruningProblem, tmp_path: Path, agent: str, settings: dict[str, Any]
) -> None:
    policy = search(agent, problem, 4, seed=0, budget_range=RANGE, **settings).policy
    again = load_policy(policy.save(tmp_path / "policy"))
    assert type(again) is type(policy) and again.budget_range == RANGE
    for target in np.linspace(*RANGE, 9):
        np.testing.assert_array_equal(again.keep_for(problem, target), policy.keep_for(problem, target))
    # JSON and plain tensors only: no SB3 zip, and the tensors load weights-only.
    files = {p.name for p in (tmp_path / "policy").iterdir()}
    assert files <= {POLICY_META, "policy.pt", "predictor.pt"}
    for tensors in files - {POLICY_META}:
        torch.load(tmp_path / "policy" / tensors, weights_only=True)


def test_policy_kwargs_are_saved_by_name_and_unsavable_ones_refused(
    problem: PruningProblem, tmp_path: Path
) -> None:
    kwargs = {"net_arch": {"pi": [16], "vf": [8]}, "activation_fn": nn.ReLU}
    policy = search(
        "ppo", problem, 4, seed=0, budget_range=RANGE, learner_kwargs={"policy_kwargs": kwargs}
    ).policy
    again = load_policy(policy.save(tmp_path / "policy"))
    saved = json.loads((tmp_path / "policy" / POLICY_META).read_text())["policy_kwargs"]
    assert saved["activation_fn"] == "ReLU" and saved["net_arch"] == {"pi": [16], "vf": [8]}
    for target in (0.3, 0.5, 0.7):
        np.testing.assert_array_equal(again.keep_for(problem, target), policy.keep_for(problem, target))

    class Custom(nn.ReLU):
        pass

    assert isinstance(policy, SB3Policy)
    policy.network.activation_fn = Custom
    with pytest.raises(InvalidSettingError, match="cannot be saved with the policy"):
        policy.save(tmp_path / "custom")


# ------------------------------------------------------------------------------------------------ old format


def _old_sb3_policy(problem: PruningProblem, directory: Path) -> SB3Policy:
    """A policy saved as before: SB3's pickled policy.zip and a policy.json without a format."""
    model = run_sb3(BudgetedEvaluator(problem, 4, budget_range=RANGE), np.random.default_rng(0))
    directory.mkdir()
    model.save(directory / "policy.zip")
    (directory / POLICY_META).write_text(json.dumps(OLD_META))
    return SB3Policy("ppo", "oneshot", model.policy, RANGE)


def test_an_old_pickled_policy_is_refused_and_a_trusted_one_converts(
    problem: PruningProblem, tmp_path: Path
) -> None:
    directory = tmp_path / "policy"
    original = _old_sb3_policy(problem, directory)
    with pytest.raises(InvalidSettingError) as caught:
        load_policy(directory)
    message = str(caught.value)
    assert "old pickled format" in message and "never loads" in message and "\n" not in message
    assert f"convert_pickled_policy('{directory}')" in message
    convert_pickled_policy(directory)  # the user's deliberate choice, on a file they trust
    assert (directory / "policy.zip").is_file()  # nothing lost
    again = load_policy(directory)
    for target in (0.3, 0.5, 0.7):
        np.testing.assert_array_equal(again.keep_for(problem, target), original.keep_for(problem, target))
    with pytest.raises(InvalidSettingError, match="nothing to convert"):
        convert_pickled_policy(directory)


# ------------------------------------------------------------------------------------------------ bad files


def _raw(name: str, content: bytes) -> Callable[[Path], None]:
    return lambda d: (d / name).write_bytes(content)


def _delete(name: str) -> Callable[[Path], None]:
    return lambda d: (d / name).unlink()


def _edit(change: Callable[[dict[str, Any]], None]) -> Callable[[Path], None]:
    def tamper(d: Path) -> None:
        meta = json.loads((d / POLICY_META).read_text())
        change(meta)
        (d / POLICY_META).write_text(json.dumps(meta))

    return tamper


def _set(*path: str, value: Any) -> Callable[[Path], None]:
    def change(meta: dict[str, Any]) -> None:
        for key in path[:-1]:
            meta = meta[key]
        meta[path[-1]] = value

    return _edit(change)


def _drop(key: str) -> Callable[[Path], None]:
    return _edit(lambda meta: meta.pop(key))


def _tensors(name: str, change: Callable[[dict[str, torch.Tensor]], Any]) -> Callable[[Path], None]:
    def tamper(d: Path) -> None:
        state = torch.load(d / name, weights_only=True)
        result = change(state)
        torch.save(state if result is None else result, d / name)

    return tamper


def _first(state: dict[str, torch.Tensor]) -> str:
    return next(k for k, v in state.items() if v.is_floating_point())


def _nan(state: dict[str, torch.Tensor]) -> None:
    state[_first(state)].view(-1)[0] = float("nan")


BAD_FILES = [
    # any policy: policy.json itself
    ("allocation", _raw(POLICY_META, b"{not json"), "not valid JSON"),
    ("allocation", _raw(POLICY_META, b"\xff\xfe\x00"), "not UTF-8"),
    ("allocation", _raw(POLICY_META, b"[1, 2]"), "not an object"),
    ("allocation", _raw(POLICY_META, b'{"kind": "allocation", "kind": "sb3"}'), "appears twice"),
    ("allocation", _raw(POLICY_META, b'{"kind": "allocation", "agent": "r", "ratios": [NaN, 0.1]}'), "NaN"),
    ("allocation", _delete(POLICY_META), "holds no saved policy"),
    ("allocation", _set("kind", value="pickle"), "unknown policy kind"),
    ("allocation", _set("kind", value=["sb3"]), "unknown policy kind"),
    ("allocation", _set("format", value=99), "format 99"),
    ("allocation", _set("budget_range", value=[0.7, 0.3]), "low <= high"),
    ("allocation", _set("budget_range", value=[0.0, 0.5]), "a fraction in (0, 1]"),
    ("allocation", _set("budget_range", value=[0.3]), "a pair (low, high)"),
    ("allocation", _set("budget_range", value="0.3-0.7"), "a pair (low, high)"),
    ("allocation", _set("budget_range", value=[True, 0.5]), "a real number"),
    (
        "allocation",
        _raw(
            POLICY_META,
            b'{"kind": "allocation", "agent": "r", "ratios": [0.1, 0.1], "budget_range": [0.3, 1e999]}',
        ),
        "a finite number",
    ),
    # allocation ratios: never clipped
    ("allocation", _set("ratios", value=[1.5, 0.2]), "ratios[0] = 1.5 is not a ratio in [0, 1]"),
    ("allocation", _set("ratios", value=[0.2, -0.1]), "ratios[1] = -0.1 is not a ratio"),
    ("allocation", _set("ratios", value=["0.5", 0.2]), "a real number"),
    (
        "allocation",
        _raw(POLICY_META, b'{"kind": "allocation", "agent": "r", "ratios": [1e999, 0.1]}'),
        "a finite number",
    ),
    ("allocation", _set("ratios", value=[]), "a non-empty list of ratios"),
    ("allocation", _drop("ratios"), "key 'ratios'"),
    ("allocation", _set("agent", value=3), "'agent' must be"),
    # SB3 policies: the JSON that rebuilds the network
    ("sb3", _drop("format"), "old pickled format"),
    ("sb3", _set("format", value="2"), "policy file format '2'"),
    ("sb3", _set("algo", value="dqn"), "'algo' must be one of"),
    ("sb3", _set("algo", value=["ppo"]), "'algo' must be one of"),
    ("sb3", _set("env", value="grid"), "'env' must be one of"),
    ("sb3", _drop("observation_space"), "key 'observation_space'"),
    ("sb3", _set("observation_space", "shape", value=[0]), "shape must be [size]"),
    ("sb3", _set("observation_space", "dtype", value="float64"), "dtype must be 'float32'"),
    ("sb3", _set("action_space", "low", value=[-1.0]), "low must be 2 finite numbers"),
    ("sb3", _set("action_space", "low", value=[2.0, 2.0]), "low bound above its high bound"),
    ("sb3", _set("policy_kwargs", value=[]), "'policy_kwargs' must be"),
    ("sb3", _set("policy_kwargs", "net_arch", value=[10**9, 10**9]), "larger than"),
    ("sb3", _set("policy_kwargs", "net_arch", value="big"), "net_arch must be a list of layer widths"),
    ("sb3", _set("policy_kwargs", "net_arch", value=[64, -1]), "net_arch must be a list of layer widths"),
    ("sb3", _set("policy_kwargs", "activation_fn", value="system"), "activation_fn 'system' is no class"),
    ("sb3", _set("policy_kwargs", "activation_fn", value="Module"), "activation_fn 'Module' is no class"),
    ("sb3", _set("policy_kwargs", "optimizer_class", value="Optimizer"), "optimizer_class 'Optimizer' is no"),
    ("sb3", _set("policy_kwargs", "features_extractor_class", value="NatureCNN"), "cannot build a ppo"),
    ("sb3", _set("policy_kwargs", "n_critics", value=10**9), "n_critics must be"),
    ("sb3", _set("policy_kwargs", "bogus", value=1), "cannot build a ppo policy"),
    ("sb3", _set("policy_kwargs", "net_arch", value=[64]), "tensors of the network"),
    # SB3 policies: the weights
    ("sb3", _delete("policy.pt"), "holds no saved policy"),
    ("sb3", _raw("policy.pt", b""), "is empty"),
    ("sb3", _raw("policy.pt", b"garbage bytes"), "is no weights file at all"),
    ("sb3", _raw("policy.pt", b"PK\x03\x04 truncated"), "damaged or truncated"),
    ("sb3", _tensors("policy.pt", lambda s: [*s.values()]), "not a mapping of names to tensors"),
    (
        "sb3",
        _tensors("policy.pt", lambda s: s.__setitem__(_first(s), s[_first(s)].double())),
        "torch.float64",
    ),
    ("sb3", _tensors("policy.pt", lambda s: s.__setitem__(_first(s), torch.zeros(3))), "[3]"),
    ("sb3", _tensors("policy.pt", _nan), "NaN or infinite"),
    ("sb3", _tensors("policy.pt", lambda s: s.__delitem__(_first(s))), "1 tensors of the network"),
    ("sb3", _tensors("policy.pt", lambda s: s.__setitem__("extra", torch.zeros(1))), "1 are unknown"),
    ("amc", _set("policy_kwargs", "net_arch", value={"pi": [300, 300], "qf": [10**6]}), "larger than"),
    ("amc", _tensors("policy.pt", _nan), "NaN or infinite"),
    # the predictor
    ("predictor", _set("settings", "ensemble", value=10**9), "settings.ensemble must be an integer in"),
    ("predictor", _set("settings", "hidden", value="32"), "an integer"),
    ("predictor", _set("settings", "ascent_steps", value=10**12), "settings.ascent_steps must be"),
    ("predictor", _set("settings", "ascent_lr", value="fast"), "a real number"),
    ("predictor", _set("settings", "bogus", value=1), "unknown predictor settings bogus"),
    ("predictor", _set("settings", value=None), "'settings' must be"),
    ("predictor", _set("start_ratios", value=[2.0, 0.1]), "start_ratios[0] = 2.0 is not a ratio"),
    ("predictor", _set("start_ratios", value=[0.1, 0.1, 0.1]), "tensor 'w1' has shape"),
    ("predictor", _set("settings", "ensemble", value=3), "has shape"),
    ("predictor", _delete("predictor.pt"), "holds no saved policy"),
    ("predictor", _raw("predictor.pt", b"PK\x03\x04 truncated"), "damaged or truncated"),
    ("predictor", _tensors("predictor.pt", _nan), "NaN or infinite"),
    ("predictor", _tensors("predictor.pt", lambda s: s.__setitem__("w2", s["w2"].double())), "torch.float64"),
]


@pytest.mark.parametrize(("kind", "tamper", "expected"), BAD_FILES)
def test_a_damaged_or_edited_policy_file_is_refused_in_one_line(
    copy_of: Callable[[str], Path], kind: str, tamper: Callable[[Path], None], expected: str
) -> None:
    directory = copy_of(kind)
    tamper(directory)
    with pytest.raises(InvalidSettingError) as caught:
        load_policy(directory)
    message = str(caught.value)
    assert expected in message and str(directory) in message and "\n" not in message, message


def test_a_link_or_directory_in_place_of_a_policy_file_is_refused(copy_of: Callable[[str], Path]) -> None:
    directory = copy_of("sb3")
    (directory / "policy.pt").unlink()
    (directory / "policy.pt").symlink_to("/dev/zero")
    with pytest.raises(InvalidSettingError, match="not a regular file"):
        load_policy(directory)
    (directory / POLICY_META).unlink()
    (directory / POLICY_META).mkdir()
    with pytest.raises(InvalidSettingError, match="not a regular file"):
        load_policy(directory)


# ------------------------------------------------------------------------------------------------ trained range


@pytest.mark.parametrize("kind", ["sb3", "amc", "predictor", "allocation"])
@pytest.mark.parametrize(
    ("target", "expected"),
    [
        (0.8, "target 0.8 lies outside the budget range 0.3 to 0.7"),
        (0.29, "target 0.29 lies outside the budget range 0.3 to 0.7"),
        (float("nan"), "target must be a finite number"),
        ("0.5", "target must be a real number"),
        (1.5, "target must be a fraction in (0, 1]"),
    ],
)
def test_a_policy_refuses_targets_outside_its_trained_range(
    saved: dict[str, Path], problem: PruningProblem, kind: str, target: Any, expected: str
) -> None:
    policy = load_policy(saved[kind])
    with pytest.raises(InvalidSettingError) as caught:
        policy.keep_for(problem, target)
    assert expected in str(caught.value)


def test_the_range_comes_from_the_policy_file_and_covers_the_default_target(
    copy_of: Callable[[str], Path], problem: PruningProblem, tiny: nn.Module, digits: Splits
) -> None:
    directory = copy_of("sb3")
    _set("budget_range", value=[0.4, 0.45])(directory)
    policy = load_policy(directory)
    with pytest.raises(InvalidSettingError, match=r"outside the budget range 0\.4 to 0\.45"):
        policy.keep_for(problem, 0.5)
    elsewhere = PruningProblem(tiny, digits, target_macs=0.9, **TINY_SCORING)
    with pytest.raises(InvalidSettingError, match=r"target 0\.9 lies outside"):
        load_policy(copy_of("allocation")).keep_for(elsewhere)


def test_an_allocation_above_the_problems_max_ratio_is_refused_not_clipped(
    copy_of: Callable[[str], Path], tiny: nn.Module, digits: Splits
) -> None:
    directory = copy_of("allocation")
    _set("ratios", value=[0.95, 0.1])(directory)
    capped = PruningProblem(tiny, digits, target_macs=0.5, max_ratio=0.9, **TINY_SCORING)
    with pytest.raises(
        InvalidSettingError, match=r"removes 0\.95 of group .* more than this problem's max_ratio 0\.9"
    ):
        load_policy(directory).keep_for(capped, 0.5)


def test_an_allocation_at_a_groups_smallest_width_applies(tiny: nn.Module, digits: Splits) -> None:
    # A group's smallest width is rounded to whole units, so a searched allocation at that width may
    # record a ratio just above max_ratio; applying it must give back that width, not refuse it.
    capped = PruningProblem(tiny, digits, target_macs=0.5, max_ratio=0.85, **TINY_SCORING)
    smallest = capped.projector.min_keep
    realised = 1.0 - smallest / capped.units
    assert (realised > capped.max_ratio).any(), "the case this test is about: rounding past max_ratio"
    policy = AllocationPolicy("random", tuple(float(r) for r in realised))
    keep = policy.keep_for(capped, 0.5)  # refused before: "removes 0.857 ... more than max_ratio 0.85"
    assert (keep >= smallest).all() and capped.projector.cost_ratio(keep) <= 0.5
    with pytest.raises(InvalidSettingError, match="more than this problem's max_ratio"):
        AllocationPolicy("random", tuple(float(r) + 0.01 for r in realised)).keep_for(capped, 0.5)


# ------------------------------------------------------------------------------------------------ payloads


class Payload:
    """Unpickling this creates ``marker``: stands for any code a hostile file could run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (Path(self.marker),))


def _torch_payload(path: Path, marker: Path) -> None:
    torch.save({"weight": Payload(marker)}, path)


def _raw_pickle_payload(path: Path, marker: Path) -> None:
    path.write_bytes(pickle.dumps({"weight": Payload(marker)}))


def _sb3_zip_payload(path: Path, marker: Path) -> None:
    """An SB3 policy.zip whose ``data`` entry carries a pickled object, as SB3's loader unpickles it."""
    serialized = base64.b64encode(pickle.dumps(Payload(marker))).decode()
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("data", json.dumps({"policy_class": {":serialized:": serialized}}))


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory: pytest.TempPathFactory, tiny: nn.Module) -> Path:
    directory = tmp_path_factory.mktemp("model") / "model"
    graph = build_graph(tiny, torch.zeros(1, 1, 8, 8))
    keep = {g.name: list(range(g.units)) for g in graph.groups}
    save_pruned(
        directory, tiny, keep=keep, input_shape=(1, 8, 8), architecture="tiny", num_classes=10, in_channels=1
    )
    return directory


def _load_cache_entry(path: Path) -> None:
    from prune_env.cache import load_entry

    with pytest.warns(UserWarning, match="unusable cached checkpoint"):
        assert load_entry(path, "key", 1) is None  # unusable: retrained, never unpickled


def _load_weights(path: Path) -> None:
    from prune_env.app.weights import load_weights

    load_weights(nn.Linear(2, 2), path)


def _read_state(path: Path) -> None:
    from prune_env.app.runfiles import read_state

    read_state(path)


# (what, which file of a copied directory, how the payload is planted, how the file is loaded)
PAYLOADS = [
    ("old policy.zip", "policy", "policy.zip", _sb3_zip_payload, load_policy, True),
    ("policy.zip beside new files", "policy", "policy.zip", _sb3_zip_payload, load_policy, False),
    ("policy weights", "policy", "policy.pt", _torch_payload, load_policy, True),
    ("policy weights, raw pickle", "policy", "policy.pt", _raw_pickle_payload, load_policy, True),
    ("policy.json", "policy", POLICY_META, _raw_pickle_payload, load_policy, True),
    ("predictor weights", "predictor", "predictor.pt", _torch_payload, load_policy, True),
    ("predictor weights, raw pickle", "predictor", "predictor.pt", _raw_pickle_payload, load_policy, True),
    ("saved model weights", "model", WEIGHTS_FILE, _torch_payload, load_pruned, True),
    ("saved model weights, raw pickle", "model", WEIGHTS_FILE, _raw_pickle_payload, load_pruned, True),
    ("saved model description", "model", SPEC_FILE, _raw_pickle_payload, load_pruned, True),
    ("cache entry", "cache", "entry.pt", _torch_payload, _load_cache_entry, False),
    ("cache entry, raw pickle", "cache", "entry.pt", _raw_pickle_payload, _load_cache_entry, False),
    ("base weights (--weights)", "file", "weights.pt", _torch_payload, _load_weights, True),
    ("run state", "file", "state.json", _raw_pickle_payload, _read_state, True),
]


@pytest.mark.parametrize(
    ("what", "holder", "name", "plant", "load", "raises"), PAYLOADS, ids=[p[0] for p in PAYLOADS]
)
def test_a_pickle_payload_in_a_run_directory_never_runs(
    saved: dict[str, Path],
    saved_model: Path,
    problem: PruningProblem,
    tmp_path: Path,
    what: str,
    holder: str,
    name: str,
    plant: Callable[[Path, Path], None],
    load: Callable[[Path], Any],
    raises: bool,
) -> None:
    marker = tmp_path / "payload-ran"
    directory = tmp_path / holder
    if holder == "policy" and what.startswith("old"):
        _old_sb3_policy(problem, directory)
    elif holder == "policy":
        shutil.copytree(saved["sb3"], directory)
    elif holder == "predictor":
        shutil.copytree(saved["predictor"], directory)
    elif holder == "model":
        shutil.copytree(saved_model, directory)
    else:
        directory.mkdir()
    plant(directory / name, marker)
    target = directory if holder in ("policy", "predictor", "model") else directory / name
    if raises:
        with pytest.raises(PruneEnvError) as caught:
            load(target)
        assert "\n" not in str(caught.value)
    else:
        load(target) if holder == "cache" else load_policy(target)  # the zip is ignored beside policy.pt
    assert not marker.exists(), f"the payload planted in the {what} ran"


def test_the_planted_payloads_are_live(tmp_path: Path) -> None:
    """Control: each planted payload does run when unpickled by a loader that trusts it (SB3's own)."""
    from stable_baselines3.common.save_util import load_from_zip_file

    _torch_payload(tmp_path / "file.pt", tmp_path / "ran-torch")
    torch.load(tmp_path / "file.pt", weights_only=False)
    _raw_pickle_payload(tmp_path / "file.pkl", tmp_path / "ran-pickle")
    pickle.loads((tmp_path / "file.pkl").read_bytes())
    assert (tmp_path / "ran-torch").exists() and (tmp_path / "ran-pickle").exists()
    marker = tmp_path / "ran-zip"
    _sb3_zip_payload(tmp_path / "policy.zip", marker)
    load_from_zip_file(tmp_path / "policy.zip")
    assert marker.exists()
