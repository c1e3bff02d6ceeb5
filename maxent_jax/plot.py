"""`python -m maxent_jax.plot WORKDIR [--out DIR]`: PNG curves of a run's metrics.jsonl.

Writes one PNG per curve (reward, KL, tau, beta, weight entropy, completion length, eval
reward) and `metrics.png`, a grid of all of them, into DIR (default WORKDIR/plots). Curves
whose metric never appears in the file are left out.
"""

from __future__ import annotations

import json
import math
import pathlib
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402

from maxent_jax import flag_spelling  # noqa: E402
from maxent_jax.errors import UserError, exit_on_user_error  # noqa: E402
from maxent_jax.telemetry import METRICS_FILE  # noqa: E402

# (file stem, title, y label, metric keys in order of preference: the first present is drawn)
CURVES = (
    ("reward", "Train reward", "mean reward", ("train/reward",)),
    ("kl", "KL to the reference", "KL", ("train/kl",)),
    ("tau", "tau (entropy temperature)", "tau", ("train/tau",)),
    ("beta", "beta (KL coefficient)", "beta", ("train/beta",)),
    ("weight_entropy", "MaxEnt weight entropy", "entropy (nats)", ("train/weight_entropy",)),
    ("completion_length", "Completion length", "tokens",
     ("train/completions/mean_length_sampled", "train/avg_completion_tokens")),
    ("eval_reward", "Eval accuracy (mean reward)", "mean reward", ("eval/mean_reward",)),
)


def read_series(path: pathlib.Path) -> dict[str, tuple[list[int], list[float]]]:
    """metric -> (steps, values) from a metrics.jsonl; a later record for the same step wins
    (a resumed run), torn lines and non-numeric values are skipped."""
    if not path.is_file():
        raise UserError(f"no metrics file at {path}: pass a run directory (--workdir of a training run)")
    by_step: dict[str, dict[int, float]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
            step = int(record["step"])
        except (ValueError, KeyError, TypeError):
            continue
        for key, value in record.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                by_step.setdefault(key, {})[step] = float(value)
    if not by_step:
        raise UserError(f"the metrics file {path} has no records yet: plot again once the run has logged a step")
    return {k: (sorted(v), [v[s] for s in sorted(v)]) for k, v in by_step.items()}


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing mean over the last `window` points (fewer at the start)."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


MIN_RELATIVE_SPAN = 0.1  # the y-axis spans at least this fraction of the series' magnitude
FEW_POINTS = 5  # a series this short (evals: 2 points in the demo) is drawn on its metric's whole range
# Metrics with a natural range: accuracies on a few dozen problems move by whole problems, so
# 0.32 -> 0.40 (2 of 25) filling the axis reads as a trend where there is noise.
NATURAL_RANGE = {"eval/mean_reward": (0.0, 1.0)}


def y_limits(values: list[float], natural_range: tuple[float, float] | None = None) -> tuple[float, float] | None:
    """Y-limits that do not blow a flat or nearly flat series up to full height, else None (matplotlib's).

    Fewer than FEW_POINTS values inside their metric's `natural_range` are drawn on that range.

    A constant (tau, beta with the controllers off; equal up to float noise) is drawn mid-plot
    on [v/2, 3v/2]; a series whose values differ by less than MIN_RELATIVE_SPAN of their
    magnitude (two close points, a metric that barely moves) gets a window of that size around
    its middle, so a 0.41 -> 0.42 step does not fill the axis like 0.1 -> 0.9 would.
    """
    lo, hi = min(values), max(values)
    if natural_range is not None and len(values) < FEW_POINTS and natural_range[0] <= lo <= hi <= natural_range[1]:
        pad = 0.03 * (natural_range[1] - natural_range[0])  # the end markers stay visible
        return natural_range[0] - pad, natural_range[1] + pad
    magnitude = max(abs(lo), abs(hi))
    if magnitude == 0.0:
        return None
    middle = (lo + hi) / 2
    if hi - lo <= 1e-6 * magnitude:
        return middle - abs(middle) / 2, middle + abs(middle) / 2
    if hi - lo < MIN_RELATIVE_SPAN * magnitude:
        half = MIN_RELATIVE_SPAN * magnitude / 2
        return middle - half, middle + half
    return None


def _draw(ax: plt.Axes, title: str, ylabel: str, key: str, steps: list[int], values: list[float]) -> None:
    """Raw curve; with many noisy points it is drawn faint under a trailing mean."""
    if len(steps) > 50 and max(values) > min(values):
        window = max(5, len(steps) // 25)
        ax.plot(steps, values, linewidth=1.0, alpha=0.3, color="C0", label="raw")
        ax.plot(steps, smooth(values, window), linewidth=1.8, color="C0", label=f"mean of {window}")
        ax.legend(fontsize=8)
    else:
        ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3, linewidth=1.5)
    limits = y_limits(values, NATURAL_RANGE.get(key))
    if limits is not None:
        ax.set_ylim(*limits)
    ax.ticklabel_format(axis="y", useOffset=False)  # no "1e-8 + 5e-2" offset labels on a flat line
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))  # steps are whole numbers
    ax.set_title(f"{title}\n{key}", fontsize=10)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)


def plot_run(workdir: str | pathlib.Path, out: str | pathlib.Path | None = None) -> list[pathlib.Path]:
    """Write the PNGs; returns their paths (the grid first)."""
    workdir = pathlib.Path(workdir)
    series = read_series(workdir / METRICS_FILE)
    out_dir = pathlib.Path(out) if out else workdir / "plots"
    out_dir.mkdir(parents=True, exist_ok=True)
    curves = []
    for stem, title, ylabel, keys in CURVES:
        key = next((k for k in keys if k in series), None)
        if key is not None:
            curves.append((stem, title, ylabel, key, *series[key]))
    if not curves:
        raise UserError(f"the metrics file {workdir / METRICS_FILE} has none of the plotted metrics "
                        f"({', '.join(k for c in CURVES for k in c[3])})")
    cols = min(3, len(curves))
    rows = math.ceil(len(curves) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
    for ax, (stem, title, ylabel, key, steps, values) in zip(axes.flat, curves):
        _draw(ax, title, ylabel, key, steps, values)
    for ax in list(axes.flat)[len(curves):]:
        ax.axis("off")
    fig.suptitle(f"{workdir.resolve().name}", fontsize=12)
    fig.tight_layout()
    written = [out_dir / "metrics.png"]
    fig.savefig(written[0], dpi=110)
    plt.close(fig)
    for stem, title, ylabel, key, steps, values in curves:
        fig, ax = plt.subplots(figsize=(6, 4))
        _draw(ax, title, ylabel, key, steps, values)
        fig.tight_layout()
        written.append(out_dir / f"{stem}.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = flag_spelling.ArgumentParser(prog="python -m maxent_jax.plot", description=__doc__.splitlines()[0])
    parser.add_argument("workdir", help="run directory holding metrics.jsonl")
    parser.add_argument("--out", default=None, help="output directory (default: WORKDIR/plots)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    for path in plot_run(args.workdir, args.out):
        print(path)


if __name__ == "__main__":
    exit_on_user_error(main)
