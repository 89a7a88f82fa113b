"""TensorBoard scalars for every search method, written per evaluation (what SB3 logs covers SB3 only).

:class:`EvaluationWriter` is an evaluator callback (``BudgetedEvaluator(on_evaluation=...)``): each scored
policy adds its reward, proxy accuracy, loss, cost ratios and the best reward so far under ``search/``, at
the evaluation's index — the same curves for evolution, random search, RL-Pruner, the predictor and the
SB3 learners, so runs of different methods overlay in one TensorBoard.
"""

from __future__ import annotations

from pathlib import Path

from agents.evaluator import Evaluation

SCALARS = ("reward", "accuracy", "loss", "macs_ratio", "params_ratio")


class EvaluationWriter:
    """Writes ``search/<scalar>`` and ``search/best_reward`` for every evaluation to ``log_dir``."""

    def __init__(self, log_dir: str | Path, best: float = -float("inf")) -> None:
        from torch.utils.tensorboard import SummaryWriter  # tensorboard: a dependency, imported on use

        self.log_dir = Path(log_dir)
        self.best = best
        self._writer = SummaryWriter(log_dir=str(self.log_dir))

    def __call__(self, entry: Evaluation) -> None:
        self.best = max(self.best, entry.reward)
        for name in SCALARS:
            self._writer.add_scalar(f"search/{name}", getattr(entry, name), entry.index)
        self._writer.add_scalar("search/best_reward", self.best, entry.index)

    def close(self) -> None:
        self._writer.flush()
        self._writer.close()
