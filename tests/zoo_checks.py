"""The checks every model of a zoo sweep must pass when pruned uniformly."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

import prune_env
from prune_env.costs import reference_attention


def flop_counter_macs(model: torch.nn.Module, x: torch.Tensor) -> int:
    """Half of PyTorch's own FLOP count: the reference the predicted MACs must equal (attention on the
    reference kernels, whose matmuls FlopCounterMode sees; the fused CPU kernel and nn.MultiheadAttention's
    inference fast path it does not)."""
    with torch.no_grad(), reference_attention(), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops() // 2


def check_pruned_model(name: str, model: torch.nn.Module, res: int, ratio: float = 0.5) -> float:
    """Prune ``model`` (eval mode) uniformly at ``ratio`` on ``res``-pixel inputs and check that the pruned
    model runs in eval and train mode with the same output shape, that predicted MACs equal measured
    MACs and FlopCounterMode/2, that it has fewer parameters, and that the input model is untouched.
    Returns the fraction of MACs kept."""
    x = torch.randn(1, 3, res, res)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    graph = prune_env.build_graph(model, x)
    assert graph.groups, f"{name}: no prunable group found"
    assert graph.base_macs == flop_counter_macs(model, x)
    pruned = prune_env.prune(model, x, ratio, graph=graph).eval()

    with torch.no_grad():
        reference = model(x)
        assert pruned(x).shape == reference.shape
    measured = prune_env.count_macs(pruned, x)
    assert graph.macs(ratio) == measured == flop_counter_macs(pruned, x)
    assert graph.params(ratio) == prune_env.count_params(pruned) < prune_env.count_params(model)
    assert measured < graph.base_macs
    # Training mode runs too (auxiliary heads, dropout, batch statistics).
    pruned.train()
    out = pruned(torch.randn(2, 3, res, res))
    # With auxiliary heads (GoogLeNet, Inception) training mode returns a tuple led by the logits.
    logits = out if isinstance(out, torch.Tensor) else out[0]
    assert logits.shape == (2, reference.shape[1])
    assert torch.isfinite(logits).all()
    # The input model is bit-identical and still in eval mode.
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not model.training
    return measured / graph.base_macs
