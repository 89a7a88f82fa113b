"""The benchmark's text report: the table of agents per setting and the checked verdicts beneath it.

The table gives, per setting and agent, the proxy search's numbers and — one line per split — the
fine-tuned validation and test accuracy (mean ± sample std over seeds) with the paired difference to each
reference and to the setting's best non-learned baseline (:mod:`prune_env.app.paired`). The verdicts
state the headline comparison after the Holm correction and whether each of the project's goals is met.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from prune_env.app.paired import BEST, setting_label, setting_of


def _pm(mean: float, std: float) -> str:
    if math.isnan(mean):
        return "—"
    return f"{mean:.4f}" if math.isnan(std) else f"{mean:.4f} ± {std:.4f}"


def _difference(d: Mapping[str, Any] | None) -> str:
    if d is None or math.isnan(d["mean_difference"]):
        return "—"
    if math.isnan(d["ci_low"]):
        return f"{d['mean_difference']:+.4f}"
    return f"{d['mean_difference']:+.4f} [{d['ci_low']:+.4f}, {d['ci_high']:+.4f}]"


def table_text(
    summary: Sequence[Mapping[str, Any]],
    rows: Sequence[Mapping[str, Any]],
    references: Sequence[str],
    notes: Sequence[str] = (),
) -> str:
    """The table of ``summary`` rows (:meth:`BenchmarkResults.summary`) with the paired ``rows``
    (:func:`~prune_env.app.paired.comparisons`): one column per reference that has comparisons, then the
    best non-learned baseline's. ``notes`` (what the results mix) come first."""
    if not summary:
        return "\n".join([*notes, "(no runs)"])
    roles = [r for r in dict.fromkeys([*references, BEST]) if any(c["role"] == r for c in rows)]
    cells = {(setting_of(c), c["agent"], c["role"], c["split"]): c for c in rows}
    best = {setting_of(c): c["reference"] for c in rows if c["role"] == BEST}
    multi = len({(s["model"], s["dataset"], s.get("metric") or "") for s in summary}) > 1
    head = ["model", "dataset", "metric"] if multi else []
    # Under a latency budget: the predicted latency ratio, and the final models measured (ms, speed-up).
    timed = any(not math.isnan(s.get("latency_measured_ms", math.nan)) for s in summary)
    header = [
        *head, "target", "agent", "seeds", "evals", "proxy acc", "MACs", "params",
        *(["latency", "ms (meas.)", "speed-up"] if timed else []), "split", "acc (ft)",
        *(f"vs {'best baseline' if r == BEST else r} [95% CI]" for r in roles), "s/run",
    ]  # fmt: skip
    lines = []
    for s in summary:
        setting = setting_of(s)
        splits = [sp for sp in ("val", "test") if sp == "test" or not math.isnan(s[f"{sp}_accuracy"])]
        for k, split in enumerate(splits):
            first = k == 0
            compared = []
            for role in roles:
                if role == BEST and best.get(setting) == s["agent"]:
                    compared.append("(best baseline)")
                else:
                    compared.append(_difference(cells.get((setting, s["agent"], role, split))))
            lines.append(
                [
                    *([s["model"], s["dataset"], s.get("metric") or "-"] if multi else []),
                    f"{s['target']:g}",
                    s["agent"],
                    str(s["seeds"]) if first else "",
                    f"{s['evals']:.0f}" if first else "",
                    _pm(s["best_accuracy"], s["best_accuracy_std"]) if first else "",
                    f"{s['macs_ratio']:.3f}" if first else "",
                    f"{s['params_ratio']:.3f}" if first else "",
                    *(_latency_cells(s, first) if timed else []),
                    split,
                    _pm(s[f"{split}_accuracy"], s[f"{split}_accuracy_std"]),
                    *compared,
                    f"{s['seconds']:.1f}" if first else "",
                ]
            )
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:<{w}}}" if i < len(head) + 2 else f"{{:>{w}}}" for i, w in enumerate(widths))
    out = [*notes]
    if not multi:
        metric = summary[0].get("metric") or ""
        out.append(
            f"{summary[0]['model']} on {summary[0]['dataset']}{f', {metric} budget' if metric else ''}"
        )
    out += [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    out += [fmt.format(*line) for line in lines]
    out += [
        f"best non-learned baseline of {setting_label(setting)} (highest mean validation accuracy): {name}"
        for setting, name in best.items()
    ]
    return "\n".join(out)


def _latency_cells(s: Mapping[str, Any], first: bool) -> list[str]:
    """Predicted latency ratio, measured ms and measured speed-up of a summary row (— where not timed), on
    its first line only."""
    if not first:
        return ["", "", ""]
    ratio, ms, speedup = (
        s.get(k, math.nan) for k in ("latency_ratio", "latency_measured_ms", "measured_speedup")
    )
    return [
        "—" if math.isnan(ratio) else f"{ratio:.3f}",
        "—" if math.isnan(ms) else f"{ms:.3g}",
        "—" if math.isnan(speedup) else f"{speedup:.2f}x",
    ]


def _points(row: Mapping[str, Any] | None) -> str:
    if row is None:
        return "—"
    text = f"{100 * row['mean_difference']:+.2f} pt"
    if not math.isnan(row["ci_low"]):
        text += f" [{100 * row['ci_low']:+.2f}, {100 * row['ci_high']:+.2f}]"
    return f"{text}, n={row['pairs']}"


def verdict_lines(headline: Mapping[str, Any] | None, goals: Sequence[Mapping[str, Any]]) -> list[str]:
    """The headline claim with its Holm-adjusted verdict, then each goal per setting, met or not."""
    lines = []
    if headline is None:
        lines.append(
            "headline: no learned agent compared with a best non-learned baseline (needs fine-tuned runs)"
        )
    else:
        rows = headline["splits"]
        parts = [f"{split} {_points(row)}, Holm p {row['p_holm']:.3g}" for split, row in rows.items()]
        family = max(int(row["family"]) for row in rows.values())
        verdict = "SURVIVES" if headline["survives"] else f"does NOT survive ({headline['reason']})"
        lines.append(
            f"headline: {headline['agent']} − {headline['reference']} (best non-learned baseline) on "
            f"{setting_label(setting_of(headline))}: {'; '.join(parts)} → {verdict} Holm–Bonferroni at "
            f"{headline['alpha']:g} over the table's {family} paired t-tests"
        )
    if not goals:
        lines.append("goals: nothing to check (no fine-tuned validation and test accuracies to compare)")
    for g in goals:
        status = "MET" if g["met"] else "NOT MET"
        who = (
            f" — {g['agent']} vs {g['reference']}: test {_points(g['test'])}; val {_points(g['val'])}"
            if g["agent"]
            else ""
        )
        why = f" ({g['reason']})" if g["reason"] else ""
        lines.append(f"goal [{setting_label(setting_of(g))}] {g['goal']}: {status}{who}{why}")
    return lines


__all__ = ["table_text", "verdict_lines"]
