"""The proxies by name, as ``ProblemSettings.proxy`` (and ``--proxy``, ``gym.make(id, proxy=...)``)
choose them: ``recalibration`` and ``distillation`` (:class:`~prune_env.proxy.ProxyEvaluator`),
``supernet`` (:class:`~prune_env.supernet.SupernetProxy`) and ``pruningnet``
(:class:`~prune_env.supernet.PruningNetProxy`)."""

from __future__ import annotations

from prune_env.proxy import Proxy, ProxyContext, ProxyEvaluator
from prune_env.settings import DISTILLATION_STEPS


def make_proxy(context: ProxyContext) -> Proxy:
    """The proxy ``context.settings.proxy`` names, built for the problem ``context`` describes."""
    s = context.settings
    if s.proxy in ("recalibration", "distillation"):
        steps = s.finetune_steps
        if steps is None:
            steps = DISTILLATION_STEPS if s.proxy == "distillation" else 0
        return ProxyEvaluator(
            context.base_model,
            context.data,
            eval_samples=s.eval_samples,
            bn_recalib_batches=s.bn_recalib_batches,
            finetune_steps=steps,
            seed=s.seed,
            device=context.device,
        )
    # Imported here: the supernet modules (and torch.func) load only when a trained proxy is asked for.
    from prune_env.supernet import PruningNetProxy, SupernetProxy

    trained = {"supernet": SupernetProxy, "pruningnet": PruningNetProxy}[s.proxy]
    return trained(context)


__all__ = ["make_proxy"]
