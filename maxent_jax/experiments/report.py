"""The diversity experiment's summary (mean +- std over seeds), its Markdown table and its plots.

Pure host code over the runs' histories (`diversity.run_arm`'s records), so a finished
`diversity.json` can be re-summarised and re-plotted without training again.
"""

from __future__ import annotations

import pathlib
from typing import Any, Mapping, Sequence

import numpy as np

PLOTS = ("diversity_passk.png", "diversity_training.png")
WARM_START = "warm start"
# (key in a run's final record, table header)
TABLE = (
    ("eval/pass@1", "pass@1"),
    ("eval/pass@8", "pass@8"),
    ("eval/pass@16", "pass@16"),
    ("eval/distinct_correct", "distinct right answers / 16 samples"),
    ("eval/distinct_correct_frac", "share of findable answers found"),
    ("eval/token_entropy", "token entropy (nats)"),
    ("train/weight_entropy", "weight entropy (nats)"),
    ("train/tau", "tau"),
)
END_FRACTION = 0.1  # training statistics "at the end": the mean over the last 10% of the steps


def final_record(run: Mapping[str, Any]) -> dict[str, float]:
    """A run's last evaluation, plus its training statistics averaged over the last steps."""
    record = {k: v for k, v in run["eval"][-1].items() if k != "step"}
    train = run["train"]
    tail = train[-max(1, int(len(train) * END_FRACTION)):] if train else []
    for key in ("train/weight_entropy", "train/tau", "train/reward"):
        values = [t[key] for t in tail if key in t]
        if values:
            record[key] = float(np.mean(values))
    return record


def _mean_std(values: Sequence[float]) -> dict[str, float]:
    """Mean and sample standard deviation (0 for a single seed)."""
    array = np.asarray(values, np.float64)
    return {"mean": float(array.mean()), "std": float(array.std(ddof=1)) if len(array) > 1 else 0.0,
            "n": len(array)}


def summarize(runs: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """arm -> metric -> {mean, std, n} over seeds at the end of training; plus the warm start
    (the step-0 evaluation, the same policy for every arm: one value per seed)."""
    by_arm: dict[str, list[dict[str, float]]] = {}
    warm: dict[int, dict[str, float]] = {}
    for run in runs:
        by_arm.setdefault(run["arm"], []).append(final_record(run))
        if run["eval"] and run["eval"][0]["step"] == 0:
            warm.setdefault(run["seed"], {k: v for k, v in run["eval"][0].items() if k != "step"})
    summary = {}
    for arm, records in {WARM_START: list(warm.values()), **by_arm}.items():
        keys = sorted({k for r in records for k in r})
        summary[arm] = {k: _mean_std([r[k] for r in records if k in r]) for k in keys}
    return summary


def markdown_table(summary: Mapping[str, Mapping[str, Mapping[str, float]]]) -> str:
    """One row per arm (the warm start first): mean +- std over seeds; '-' where an arm has no
    such statistic (GRPO has no weights, hence no weight entropy or tau)."""
    lines = ["| arm | " + " | ".join(header for _, header in TABLE) + " |", "|---" * (len(TABLE) + 1) + "|"]
    for arm, metrics in summary.items():
        cells = []
        for key, _ in TABLE:
            stat = metrics.get(key)
            cells.append("-" if stat is None else f"{stat['mean']:.3f} ± {stat['std']:.3f}")
        seeds = max(s["n"] for s in metrics.values())
        lines.append(f"| {arm} ({seeds} seed{'s' if seeds > 1 else ''}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _curves(runs: Sequence[Mapping[str, Any]], arm: str, history: str, key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values [seeds, steps]) of `key` for one arm, over the steps every seed has."""
    series = [{r["step"]: r[key] for r in run[history] if key in r} for run in runs if run["arm"] == arm]
    series = [s for s in series if s]
    if not series:
        return np.zeros(0), np.zeros((0, 0))
    steps = sorted(set.intersection(*(set(s) for s in series)))
    return np.array(steps), np.array([[s[t] for t in steps] for s in series], np.float64)


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean along the last axis."""
    kernel = np.ones(window) / window
    padded = np.concatenate([np.repeat(values[..., :1], window - 1, axis=-1), values], axis=-1)
    return np.apply_along_axis(lambda row: np.convolve(row, kernel, mode="valid"), -1, padded)


def write_plots(result: Mapping[str, Any], out: pathlib.Path) -> list[pathlib.Path]:
    """`diversity_passk.png` (pass@k against k at the end, per arm) and `diversity_training.png`
    (eval metrics, weight entropy and tau against the step): seed means with a +-1 std band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs, arms = result["runs"], list(dict.fromkeys(run["arm"] for run in result["runs"]))
    summary = result["summary"]
    colors = {arm: f"C{i}" for i, arm in enumerate(arms)}
    n = result["settings"]["num_samples"]
    ks = np.arange(1, n + 1)

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for arm in [WARM_START, *arms]:
        if arm not in summary:
            continue
        mean = np.array([summary[arm][f"eval/pass@{k}"]["mean"] for k in ks])
        std = np.array([summary[arm][f"eval/pass@{k}"]["std"] for k in ks])
        style = dict(color="gray", linestyle="--") if arm == WARM_START else dict(color=colors[arm])
        ax.plot(ks, mean, label=arm, **style)
        ax.fill_between(ks, mean - std, mean + std, alpha=0.15, color=style["color"])
    ax.set(xlabel="k (samples)", ylabel="pass@k (unbiased)", title="pass@k at the end of training", xscale="log")
    ax.set_xticks([1, 2, 4, 8, 16], labels=["1", "2", "4", "8", "16"])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths = [out / PLOTS[0]]
    fig.savefig(paths[0], dpi=80)
    plt.close(fig)

    panels = (("eval", "eval/pass@1", "pass@1"), ("eval", "eval/pass@16", "pass@16"),
              ("eval", "eval/distinct_correct", "distinct right answers (of 16 samples)"),
              ("eval", "eval/token_entropy", "token entropy (nats)"),
              ("train", "train/weight_entropy", "weight entropy (nats, smoothed)"), ("train", "train/tau", "tau"))
    fig, axes = plt.subplots(2, 3, figsize=(12, 6.5))
    window = max(1, result["settings"]["steps"] // 20)
    for ax, (history, key, title) in zip(axes.flat, panels):
        for arm in arms:
            steps, values = _curves(runs, arm, history, key)
            if not len(steps):
                continue
            if history == "train":
                values = _smooth(values, window)
            mean, std = values.mean(0), values.std(0, ddof=1) if len(values) > 1 else np.zeros(len(steps))
            ax.plot(steps, mean, color=colors[arm], label=arm)
            ax.fill_between(steps, mean - std, mean + std, alpha=0.15, color=colors[arm])
        ax.set(title=title, xlabel="RL step")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    paths.append(out / PLOTS[1])
    fig.savefig(paths[1], dpi=70)
    plt.close(fig)
    return paths
