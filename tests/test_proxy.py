from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

import prune_env
from prune_env.data import Splits
from prune_env.errors import InvalidSettingError
from prune_env.proxy import Proxy, ProxyEvaluator, ProxyResult, recalibrate_batchnorm, set_eval


class ForbiddenDataset(Dataset):
    """Any access fails the test: stands in for `test` to prove that rewards never read it."""

    def __len__(self) -> int:
        raise AssertionError("the proxy touched the test split")

    def __getitem__(self, index: int):
        raise AssertionError("the proxy touched the test split")


def _states_equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def pruned(digits: Splits, digits_base) -> nn.Module:
    base, _ = digits_base
    return prune_env.prune(base, digits.example_inputs(), 0.5)


def _refers_to(obj: object, target: object, depth: int = 3) -> bool:
    if obj is target:
        return True
    if depth == 0:
        return False
    if isinstance(obj, dict):
        children = list(obj.values())
    elif isinstance(obj, (list, tuple)):
        children = list(obj)
    elif hasattr(obj, "__dict__") and not isinstance(obj, (torch.Tensor, type)):
        children = list(vars(obj).values())
    else:
        return False
    return any(_refers_to(child, target, depth - 1) for child in children)


def test_rewards_never_touch_test(digits: Splits, digits_base, pruned: nn.Module) -> None:
    base, _ = digits_base
    forbidden = ForbiddenDataset()
    splits = replace(digits, test=forbidden)
    proxy = ProxyEvaluator(base, splits, eval_samples=100, bn_recalib_batches=2, finetune_steps=2)
    result = proxy.evaluate(pruned)
    assert 0.0 <= result.accuracy <= 1.0
    # Structurally: the evaluator keeps no reference to the splits or to their test dataset.
    assert not _refers_to(proxy, forbidden)
    assert not _refers_to(proxy, splits)


def test_bn_recalibration_changes_only_running_statistics(
    digits: Splits, digits_base, pruned: nn.Module
) -> None:
    base, _ = digits_base
    proxy = ProxyEvaluator(base, digits, bn_recalib_batches=4)
    snapshot = copy.deepcopy(pruned)
    recal = proxy.recalibrate(pruned)
    assert _states_equal(pruned, snapshot)  # the input model is untouched
    before, after = dict(pruned.named_parameters()), dict(recal.named_parameters())
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    stats_changed = 0
    for (name, b_old), (_, b_new) in zip(pruned.named_buffers(), recal.named_buffers(), strict=True):
        assert name.endswith(("running_mean", "running_var", "num_batches_tracked")), name
        stats_changed += not torch.equal(b_old, b_new)
    assert stats_changed >= len([m for m in recal.modules() if isinstance(m, nn.BatchNorm2d)])
    assert not recal.training


def test_recalibration_is_an_exact_average_over_the_batches() -> None:
    bn = nn.BatchNorm2d(3)
    batches = [torch.randn(8, 3, 4, 4) * (i + 1) + i for i in range(3)]
    recalibrate_batchnorm(nn.Sequential(bn), batches)
    expected_mean = torch.stack([b.mean(dim=(0, 2, 3)) for b in batches]).mean(0)
    assert torch.allclose(bn.running_mean, expected_mean, atol=1e-5)
    assert bn.momentum == 0.1  # restored


@pytest.mark.parametrize("training", [False, True])
def test_recalibration_restores_every_module_mode(training: bool) -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Sequential(nn.BatchNorm2d(4), nn.Dropout(0.5))
    )
    model.train(training)
    recalibrate_batchnorm(model, [torch.randn(4, 3, 6, 6)])
    assert [m.training for m in model.modules()] == [training] * len(list(model.modules()))


class _CountsTrainCalls(nn.Module):
    """A module with its own ``train``: the fast eval switch must still go through it."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Dropout(0.5)
        self.calls: list[bool] = []

    def train(self, mode: bool = True) -> _CountsTrainCalls:
        self.calls.append(mode)
        return super().train(mode)


def test_fast_eval_switch_equals_module_eval() -> None:
    """set_eval (the proxy's hot-path model.eval()) leaves every flag as model.eval() does, and calls an
    overridden train() rather than writing past it."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), _CountsTrainCalls(), nn.Dropout(0.1))
    model.train()
    custom = model[2]
    custom.calls.clear()
    set_eval(list(model.modules()))
    assert [m.training for m in model.modules()] == [False] * len(list(model.modules()))
    assert custom.calls == [False]
    assert "training" in model[0].__dict__  # an instance attribute, as Module.__setattr__ stores it


def test_recalibration_improves_a_pruned_model(digits: Splits, digits_base, pruned: nn.Module) -> None:
    base, _ = digits_base
    plain = ProxyEvaluator(base, digits, bn_recalib_batches=0, finetune_steps=0).evaluate(pruned)
    recal = ProxyEvaluator(base, digits, bn_recalib_batches=8, finetune_steps=0).evaluate(pruned)
    assert recal.accuracy > plain.accuracy + 0.05
    assert recal.loss < plain.loss


def test_evaluate_does_not_modify_the_model(digits: Splits, digits_base, pruned: nn.Module) -> None:
    base, _ = digits_base
    base_snapshot, pruned_snapshot = copy.deepcopy(base), copy.deepcopy(pruned)
    pruned.train()
    proxy = ProxyEvaluator(base, digits, bn_recalib_batches=2, finetune_steps=3)
    proxy.evaluate(pruned)
    assert pruned.training  # mode untouched too
    pruned.eval()
    assert _states_equal(pruned, pruned_snapshot)
    assert _states_equal(base, base_snapshot)


def test_deterministic_for_a_seed(digits: Splits, digits_base, pruned: nn.Module) -> None:
    base, _ = digits_base
    a = ProxyEvaluator(base, digits, eval_samples=150, bn_recalib_batches=3, finetune_steps=4, seed=3)
    b = ProxyEvaluator(base, digits, eval_samples=150, bn_recalib_batches=3, finetune_steps=4, seed=3)
    ra1, ra2, rb = a.evaluate(pruned), a.evaluate(pruned), b.evaluate(pruned)
    for r in (ra2, rb):
        assert (r.accuracy, r.loss) == (ra1.accuracy, ra1.loss)
    other = ProxyEvaluator(base, digits, eval_samples=150, bn_recalib_batches=3, finetune_steps=4, seed=4)
    assert other.evaluate(pruned).loss != ra1.loss


def test_eval_subset_is_fixed_size_and_base_metrics(digits: Splits, digits_base) -> None:
    base, metrics = digits_base
    proxy = ProxyEvaluator(base, digits, eval_samples=100)
    result = proxy.evaluate(base)
    assert result.samples == 100
    assert result.seconds > 0
    everything = ProxyEvaluator(base, digits, eval_samples=None, bn_recalib_batches=0)
    assert everything.base_metrics.samples == len(digits.val)
    assert everything.base_metrics.accuracy == pytest.approx(metrics["val_accuracy"])


def test_kd_steps_raise_proxy_accuracy(digits: Splits, digits_base) -> None:
    base, _ = digits_base
    heavily_pruned = prune_env.prune(base, digits.example_inputs(), 0.75)
    recal = ProxyEvaluator(base, digits, eval_samples=None, bn_recalib_batches=8, finetune_steps=0).evaluate(
        heavily_pruned
    )
    kd = ProxyEvaluator(base, digits, eval_samples=None, bn_recalib_batches=8, finetune_steps=30).evaluate(
        heavily_pruned
    )
    assert kd.accuracy > recal.accuracy


def test_proxy_is_an_interface() -> None:
    assert issubclass(ProxyEvaluator, Proxy)

    class Incomplete(Proxy):
        pass

    with pytest.raises(TypeError):
        Incomplete()  # type: ignore[abstract]

    class Constant(Proxy):
        def evaluate(self, model: nn.Module) -> ProxyResult:
            return ProxyResult(accuracy=0.5, loss=1.0)

    assert Constant().evaluate(nn.Identity()).accuracy == 0.5
    with pytest.raises(InvalidSettingError, match="accuracy must lie in"):
        ProxyResult(accuracy=float("nan"), loss=1.0)


def test_invalid_arguments(digits: Splits, digits_base) -> None:
    base, _ = digits_base
    with pytest.raises(ValueError, match=">= 0"):
        ProxyEvaluator(base, digits, bn_recalib_batches=-1)


def test_recalibrating_after_kd_steps_uses_the_final_weights(
    digits: Splits, digits_base, pruned: nn.Module
) -> None:
    base, _ = digits_base
    settings = {"eval_samples": None, "bn_recalib_batches": 4, "finetune_steps": 5}
    blended = ProxyEvaluator(base, digits, recalibrate_after_finetune=False, **settings).evaluate(pruned)
    final = ProxyEvaluator(base, digits, recalibrate_after_finetune=True, **settings).evaluate(pruned)
    # Same weights after the same steps; only the BatchNorm statistics differ, so the results do too.
    assert final.loss != blended.loss
