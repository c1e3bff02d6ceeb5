"""`python -m maxent_jax.plot`: PNGs from a metrics.jsonl written by Telemetry; one-line errors."""

from __future__ import annotations

import math

import pytest

from maxent_jax import plot
from maxent_jax import telemetry as tm
from maxent_jax.config import get_base_config
from maxent_jax.errors import exit_on_user_error

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _run(workdir, steps=40):
    c = get_base_config()
    c.logging.wandb = "disabled"
    c.logging.progress = False
    with tm.Telemetry(workdir, c) as tel:
        for step in range(1, steps + 1):
            tel.accumulate({
                "train/reward": 1 - math.exp(-step / 10), "train/kl": 0.001 * step, "train/tau": 0.1 + 0.002 * step,
                "train/beta": 0.04, "train/weight_entropy": 2.0 - 0.01 * step,
                "train/completions/mean_length_sampled": 20 + step / 4,
            })
            tel.step_end(step)
            if step % 10 == 0:
                tel.log_eval(step, {"eval/mean_reward": step / 50})


def test_plot_writes_a_grid_and_one_png_per_curve(tmp_path, capsys):
    _run(tmp_path)
    plot.main([str(tmp_path)])
    names = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert names == sorted(["metrics.png", "reward.png", "kl.png", "tau.png", "beta.png", "weight_entropy.png",
                            "completion_length.png", "eval_reward.png"])
    for png in (tmp_path / "plots").iterdir():
        assert png.read_bytes()[:8] == PNG_SIGNATURE and png.stat().st_size > 10_000
    assert capsys.readouterr().out.splitlines()[0] == str(tmp_path / "plots" / "metrics.png")


def test_smooth_is_a_trailing_mean():
    assert plot.smooth([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]


def test_series_last_record_per_step_wins(tmp_path):
    (tmp_path / tm.METRICS_FILE).write_text(
        '{"step": 1, "train/kl": 0.5}\n{"step": 2, "train/kl": 0.7}\n{"step": 2, "train/kl": 0.9, "run/git_sha": "x"}\n'
        '{"step": 3, "train/kl": null}\n{"step": 3, "tra'
    )
    series = plot.read_series(tmp_path / tm.METRICS_FILE)
    assert series["train/kl"] == ([1, 2], [0.5, 0.9])
    written = plot.plot_run(tmp_path, tmp_path / "out")
    assert [p.name for p in written] == ["metrics.png", "kl.png"]


@pytest.mark.parametrize("content, message", [
    (None, "error: no metrics file at"),
    ("", "has no records yet"),
    ('{"step": 1, "train/loss": 1.0}\n', "has none of the plotted metrics"),
])
def test_bad_inputs_are_one_line_errors(tmp_path, capsys, content, message):
    if content is not None:
        (tmp_path / tm.METRICS_FILE).write_text(content)
    with pytest.raises(SystemExit) as exit_info:
        exit_on_user_error(lambda: plot.main([str(tmp_path)]))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


@pytest.mark.parametrize("values, window", [
    ([0.05] * 40, (0.025, 0.075)),  # tau with the controllers off: a flat line mid-plot, not float noise blown up
    ([0.05, 0.05 + 1e-9, 0.05 - 1e-9], (0.025, 0.075)),
    ([0.41, 0.42], (0.394, 0.436)),  # two points: at least 10% of the magnitude, not the whole axis
    ([0.0, 1.0, 0.5], None),  # a real change: matplotlib's own limits
])
def test_flat_and_two_point_series_get_honest_y_limits(values, window):
    fig, ax = plot.plt.subplots()
    plot._draw(ax, "t", "y", "train/x", list(range(1, len(values) + 1)), values)
    lo, hi = ax.get_ylim()
    if window is None:
        assert lo <= 0.0 and hi >= 1.0 and hi - lo < 1.5
    else:
        assert (lo, hi) == pytest.approx(window, rel=1e-6)
        assert not ax.yaxis.get_major_formatter().get_useOffset()
    plot.plt.close(fig)


def test_a_few_eval_points_are_drawn_on_the_whole_accuracy_range():
    """The demo's two evals, 0.32 then 0.40 (2 of 25 problems), filled the panel like a trend."""
    fig, ax = plot.plt.subplots()
    plot._draw(ax, "Eval accuracy", "mean reward", "eval/mean_reward", [50, 100], [0.32, 0.40])
    lo, hi = ax.get_ylim()
    assert lo < 0.0 < 1.0 < hi < 1.1
    plot.plt.close(fig)
