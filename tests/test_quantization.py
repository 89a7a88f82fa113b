"""Quantization: the fake-quant grid, exact BitOps and size (analytic = counted on the pruned, quantized
model), scoring after any proxy, 8-bit accuracy and determinism."""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

import prune_env
from prune_env.errors import InvalidSettingError
from prune_env.models import get_model
from prune_env.problem import PruningProblem
from prune_env.proxies import make_proxy
from prune_env.quantization import (
    BIT_CHOICES,
    FULL_PRECISION,
    BitPlan,
    QuantizedProxy,
    bitops,
    count_bitops,
    count_size_bits,
    fake_quantize,
    group_layers,
    plan_for_groups,
    quantizable_layers,
    quantize_weight,
    size_bits,
)
from prune_env.supernet import SupernetConfig, SupernetProxy
from prune_env.surgery import prune_channels

# All of the validation split (216 digits): one sample is 0.46 points of accuracy.
# Every validation sample and two recalibration batches: quantization differences are small.
WHOLE_VAL_SCORING = {"eval_samples": None, "bn_recalib_batches": 2}


def random_plan(model: nn.Module, rng: np.random.Generator) -> BitPlan:
    """Random bits for a random two thirds of the quantizable layers (the rest full precision)."""
    layers = [n for n in quantizable_layers(model) if rng.random() < 2 / 3]
    return BitPlan(
        {n: int(rng.choice(BIT_CHOICES)) for n in layers}, {n: int(rng.choice(BIT_CHOICES)) for n in layers}
    )


@pytest.mark.parametrize(
    ("name", "shape"),
    [("resnet20", (1, 1, 8, 8)), ("mobilenet_v2", (1, 3, 32, 32)), ("googlenet", (1, 3, 64, 64))],
)
def test_analytic_bitops_and_size_equal_the_counted_ones(name: str, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    if name == "resnet20":
        model = get_model(name, 10, 1).eval()
    else:
        kwargs = {"aux_logits": False, "init_weights": True} if name == "googlenet" else {}
        model = torchvision.models.get_model(name, weights=None, num_classes=10, **kwargs).eval()
    x = torch.randn(shape)
    graph = prune_env.build_graph(model, x)
    rng = np.random.default_rng(1)
    for _ in range(3):
        keep = np.array([rng.integers(1, g.units + 1) for g in graph.groups])
        pruned = prune_channels(model, graph, [np.arange(k) for k in keep]).eval()
        plan = random_plan(model, rng)
        assert bitops(graph.costs, keep, plan) == count_bitops(pruned, (x,), plan)
        assert size_bits(graph.costs, keep, plan) == count_size_bits(pruned, plan)
    full = graph.costs.full_keep()
    # nothing quantized: BitOps are 32 x 32 per MAC and the size 32 bits per parameter
    assert bitops(graph.costs, full, BitPlan()) == 1024 * prune_env.count_macs(model, x)
    assert size_bits(graph.costs, full, BitPlan()) == 32 * sum(p.numel() for p in model.parameters())


def test_weights_fall_on_a_symmetric_per_channel_grid() -> None:
    torch.manual_seed(0)
    w = torch.randn(6, 3, 3, 3)
    w[2] = 0.0  # a dead channel stays dead
    for bits in (2, 3, 4, 8):
        q = quantize_weight(w, bits)
        levels = 2 ** (bits - 1) - 1
        for c in range(6):
            scale = w[c].abs().max() / levels if w[c].abs().max() > 0 else torch.tensor(1.0)
            assert torch.allclose(q[c] / scale, (q[c] / scale).round(), atol=1e-4)  # integers times scale
            assert len(torch.unique(q[c])) <= 2 * levels + 1
            assert (q[c] - w[c]).abs().max() <= scale / 2 + 1e-6
        assert torch.equal(q[2], w[2])
    assert quantize_weight(w, FULL_PRECISION) is w


def test_activations_are_rounded_to_the_calibrated_grid() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1))
    x = torch.randn(2, 3, 8, 8)
    before = model(x)
    same = fake_quantize(
        nn.Sequential(*[m for m in model]), BitPlan({"0": 32, "2": 32}, {"0": 32, "2": 32}), [x]
    )
    assert torch.equal(same(x), before)  # full precision everywhere: nothing changes
    seen: list[torch.Tensor] = []
    quantized = fake_quantize(
        nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1)), BitPlan({}, {"2": 3}), [x]
    )
    quantized[2].register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    quantized(x)
    assert len(torch.unique(seen[0])) <= 2**3  # the ReLU output on an unsigned 3-bit grid
    with pytest.raises(InvalidSettingError, match="bits"):
        BitPlan({"0": 1})
    with pytest.raises(InvalidSettingError, match="only convolutions and linear layers"):
        fake_quantize(model, BitPlan({"1": 8}), [x])


@pytest.fixture(scope="module")
def problem(digits_base: Any, digits: Any) -> PruningProblem:
    base, _ = digits_base
    return PruningProblem(base, digits, target_macs=0.5, **WHOLE_VAL_SCORING)


def eight_bits(problem: PruningProblem, scoring: str = "recalibration") -> PruningProblem:
    plan = BitPlan.uniform(quantizable_layers(problem.base_model), 8)
    return PruningProblem(
        problem.base_model,
        problem.splits,
        proxy=lambda context: QuantizedProxy(make_proxy(context), context, plan),
        target_macs=0.5,
        **WHOLE_VAL_SCORING,
    )


def test_eight_bits_everywhere_cost_under_half_a_point_on_average_and_score_deterministically(
    problem: PruningProblem,
) -> None:
    quantized = eight_bits(problem)
    assert abs(quantized.base_accuracy - problem.base_accuracy) < 0.005
    rng = np.random.default_rng(0)
    costs = []
    for keep in [
        problem.uniform_keep(),
        *(problem.keep_for(rng.uniform(0, 0.8, problem.n_groups)) for _ in range(3)),
    ]:
        plain = problem.proxy_result(keep)
        eight = quantized.proxy.evaluate_policy(keep, lambda k=keep: problem.build(k))
        costs.append(plain.accuracy - eight.accuracy)
        again = quantized.proxy.evaluate_policy(keep, lambda k=keep: problem.build(k))
        assert (again.accuracy, again.loss) == (eight.accuracy, eight.loss)
    # On 216 validation digits one sample is 0.46 points: a heavily pruned policy may flip three of them
    # (it does for some equally good base models), but on average eight bits cost under half a point.
    assert np.mean(costs) < 0.005 and max(abs(c) for c in costs) < 0.02


def test_low_bits_cost_accuracy_and_compose_with_a_supernet(problem: PruningProblem, tmp_path: Path) -> None:
    factory = functools.partial(SupernetProxy, config=SupernetConfig(steps=2, batch_size=32), cache=tmp_path)
    context_problem = PruningProblem(
        problem.base_model, problem.splits, proxy=factory, target_macs=0.5, **WHOLE_VAL_SCORING
    )
    keep = context_problem.uniform_keep()
    layers = quantizable_layers(problem.base_model)
    two = BitPlan.uniform(layers, 2)
    scored = {}
    for label, plan in (("two", two), ("eight", BitPlan.uniform(layers, 8))):
        quantized = PruningProblem(
            problem.base_model,
            problem.splits,
            proxy=lambda context, plan=plan: QuantizedProxy(factory(context), context, plan),
            target_macs=0.5,
            **WHOLE_VAL_SCORING,
        )
        scored[label] = quantized.proxy_result(keep).accuracy
    assert scored["two"] < scored["eight"] - 0.2  # 2-bit weights and activations everywhere break it
    assert abs(scored["eight"] - context_problem.proxy_result(keep).accuracy) < 0.01


def test_a_groups_bits_set_the_layers_producing_its_channels(problem: PruningProblem) -> None:
    layers = group_layers(problem.graph, problem.base_model)
    assert len(layers) == problem.n_groups and all(layers)  # every resnet20 group has a producing conv
    bits = [2 + g % 6 for g in range(problem.n_groups)]
    plan = plan_for_groups(problem.graph, problem.base_model, bits, bits[::-1], other_bits=8)
    for g, names in enumerate(layers):
        assert {plan.weight_bits(n) for n in names} == {bits[g]}
        assert {plan.activation_bits(n) for n in names} == {bits[::-1][g]}
    assert plan.weight_bits("fc") == 8  # produces no group's channels
    with pytest.raises(InvalidSettingError, match="one per group"):
        plan_for_groups(problem.graph, problem.base_model, bits[:-1], bits)
    assert BitPlan.from_json(plan.to_json()) == plan


def test_export_int8_through_pytorch_and_other_widths_as_fake_quant_with_their_plan(
    problem: PruningProblem, tmp_path: Path
) -> None:
    from prune_env.quantization import calibration_batches, load_fake_quantized, save_fake_quantized, to_int8

    keep = problem.uniform_keep()
    pruned = problem.scored_model(keep).eval()
    batches = calibration_batches(problem.splits.train, 4)
    layers = quantizable_layers(pruned)
    x, y = next(iter(torch.utils.data.DataLoader(problem.splits.val, batch_size=len(problem.splits.val))))
    accuracy = (pruned(x).argmax(1) == y).float().mean().item()

    int8 = to_int8(pruned, BitPlan.uniform(layers, 8), batches, (x[:1],))
    assert any(".quantized" in type(m).__module__ for m in int8.modules())  # runs on int8 kernels
    assert abs((int8(x).argmax(1) == y).float().mean().item() - accuracy) < 0.01
    with pytest.raises(
        InvalidSettingError, match=r"8-bit weights with 8-bit inputs only.*save_fake_quantized"
    ):
        to_int8(pruned, BitPlan.uniform(layers, 4), batches, (x[:1],))

    plan = BitPlan.uniform(layers, 4, 6)
    expected = fake_quantize(copy.deepcopy(pruned), plan, batches)(x)
    save_fake_quantized(pruned, plan, batches, tmp_path / "q")
    reloaded, saved_plan = load_fake_quantized(copy.deepcopy(problem.build(keep)), tmp_path / "q")
    assert saved_plan == plan
    torch.testing.assert_close(reloaded(x), expected, rtol=0, atol=0)
    with pytest.raises(InvalidSettingError, match="already exist"):
        save_fake_quantized(pruned, plan, batches, tmp_path / "q")


def assert_within_budget(problem: PruningProblem, history: list[Any]) -> None:
    """Every evaluated joint policy within the problem's BitOps or size budget, recomputed from its record."""
    joint = problem.joint
    assert joint is not None
    for e in history:
        cost = joint.projector.cost_ratio(np.array(e.keep), e.weight_bits, e.activation_bits)
        assert cost <= problem.target * (1 + 1e-9), (e.index, cost)


JOINT_BUDGETS = [{"target_bitops": 0.03}, {"target_size": 0.1}, {"quantize": True, "target_macs": 0.5}]


@pytest.mark.parametrize("env_cls", [prune_env.OneShotPruneEnv, prune_env.LayerPruneEnv])
@pytest.mark.parametrize("budget", JOINT_BUDGETS, ids=lambda b: next(iter(b)) if len(b) == 1 else "macs")
def test_joint_environments_pass_the_checkers_and_never_exceed_the_budget(
    untrained_resnet20: nn.Module, digits: Any, env_cls: type, budget: dict[str, Any]
) -> None:
    from gymnasium.utils.env_checker import check_env
    from stable_baselines3.common.env_checker import check_env as sb3_check_env

    env = env_cls(untrained_resnet20, digits, eval_samples=32, bn_recalib_batches=1, **budget)
    n = env.problem.n_groups
    assert env.action_space.shape == ((3 * n,) if env_cls is prune_env.OneShotPruneEnv else (3,))
    check_env(env, skip_render_check=True)
    sb3_check_env(env, warn=False)
    metric, target = env.problem.metric, env.problem.target
    rng = np.random.default_rng(0)
    x = digits.example_inputs(1)
    for episode in range(6):
        env.reset(seed=episode)
        done, info = False, {}
        while not done:
            _, _, done, _, info = env.step(rng.uniform(-1.2, 1.2, env.action_space.shape).astype(np.float32))
        outcome = env.last_outcome
        assert outcome is not None and outcome.cost_ratio <= target * (1 + 1e-9)
        assert list(info["weight_bits"]) == list(outcome.weight_bits) and len(outcome.weight_bits) == n
        # the outcome's BitOps and size are those of the pruned model quantized as it says
        plan = env.problem.joint.plan(np.array(outcome.weight_bits), np.array(outcome.activation_bits))
        pruned = env.problem.build(np.array(outcome.keep)).eval()
        assert outcome.bitops == count_bitops(pruned, (x,), plan)
        assert outcome.size_bits == count_size_bits(pruned, plan)
        assert metric != "bitops" or outcome.bitops <= target * outcome.base_bitops


def test_bits_follow_the_action_and_only_env_agents_search_joint_policies(
    untrained_resnet20: nn.Module, digits: Any
) -> None:
    from agents import search
    from prune_env.quantization.joint import JointPolicies

    assert JointPolicies.bits_for(np.array([0.0, 0.5, 0.999, 1.0])).tolist() == [2, 5, 32, 32]
    problem = PruningProblem(
        untrained_resnet20, digits, target_bitops=0.03, eval_samples=32, bn_recalib_batches=1
    )
    result = search("ppo", problem, 4, seed=0)
    assert len(result.history) == 4 and all(len(e.weight_bits) == problem.n_groups for e in result.history)
    assert all(e.macs_ratio <= 1.0 for e in result.history)
    assert result.best_outcome.bitops_ratio <= 0.03 * (1 + 1e-9)
    uniform = search("uniform", problem, 4, seed=0).best_outcome
    assert set(uniform.weight_bits) == set(uniform.activation_bits) == {8}  # pruning alone, at 8 bits
    assert uniform.bitops_ratio <= 0.03 * (1 + 1e-9) and uniform.macs_ratio <= 0.03 * 1024 / 64
    for agent, budget in (("random", 5), ("evolution", 24)):
        history = search(agent, problem, budget, seed=0).history
        assert len(history) == budget and len({e.weight_bits for e in history}) > 1  # bits are searched
        assert_within_budget(problem, history)
    with pytest.raises(InvalidSettingError, match=r"proposes kept channels alone.*ppo"):
        search("rlpruner", problem, 4)
    with pytest.raises(InvalidSettingError, match="joint_keep_for"):
        problem.keep_for(np.zeros(problem.n_groups))
    with pytest.raises(InvalidSettingError, match="impossible"):
        PruningProblem(untrained_resnet20, digits, target_bitops=1e-6, eval_samples=32)
    with pytest.raises(InvalidSettingError, match="give one budget, not target_macs and target_bitops"):
        PruningProblem(untrained_resnet20, digits, target_bitops=0.1, target_macs=0.5)


@pytest.mark.parametrize("budget", [{"target_bitops": 0.03}, {"target_size": 0.08}], ids=["bitops", "size"])
def test_seernet_predictor_searches_joint_policies_under_a_differentiable_budget(
    untrained_resnet20: nn.Module, digits: Any, budget: dict[str, float]
) -> None:
    from agents import search
    from agents.predictor import JointTorchCost, continuous_bits

    problem = PruningProblem(untrained_resnet20, digits, eval_samples=32, bn_recalib_batches=1, **budget)
    joint = problem.joint
    assert joint is not None
    # The relaxed cost is exact at every policy's own ratios and at each bit-width's centre.
    centres = torch.tensor(
        [(i + 0.5) / len(BIT_CHOICES) for i in range(len(BIT_CHOICES))], dtype=torch.float64
    )
    assert continuous_bits(centres).tolist() == list(BIT_CHOICES)
    cost = JointTorchCost(problem)
    rng = np.random.default_rng(0)
    for _ in range(5):
        keep = np.array([rng.integers(1, u + 1) for u in problem.units])
        w, a = rng.choice(BIT_CHOICES, problem.n_groups), rng.choice(BIT_CHOICES, problem.n_groups)
        relaxed = cost(torch.tensor(problem.ratios_for(keep)), torch.tensor(w), torch.tensor(a))
        assert float(relaxed) == pytest.approx(joint.projector.cost_ratio(keep, w, a), rel=1e-9)
    history = search("predictor", problem, 12, seed=0).history
    assert len(history) == 12 and len({e.weight_bits for e in history}) > 1
    assert_within_budget(problem, history)
