"""Accuracy and unbiased pass@k over per-problem sample counts, and the summary table.

pass@k for one problem with n samples of which c are correct is the probability that a
random k-subset of the n samples holds at least one correct one:

    pass@k = 1 - C(n - c, k) / C(n, k) = 1 - prod_{i = n - c + 1}^{n} (1 - k / i)

(the product form avoids huge binomials; it is 1 when n - c < k). Averaged over problems it is
an unbiased estimate of the chance that k fresh samples contain a correct answer. The
reference's "Pass@k" is instead "any of the first k samples is correct" (Q25), a single-subset
estimate of the same quantity with more variance; its "Avg@k" is just Pass@1.

Host-side numpy in float64: these are a few numbers per problem, not device work.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import numpy as np


def pass_at_k(num_samples: np.ndarray | int, num_correct: np.ndarray | int, k: int) -> np.ndarray:
    """Unbiased pass@k per problem; `num_samples`, `num_correct`: `[problems]` (or scalars), k <= n."""
    n = np.asarray(num_samples, dtype=np.int64)
    c = np.asarray(num_correct, dtype=np.int64)
    if k < 1 or np.any(k > n):
        raise ValueError(f"pass@k needs 1 <= k <= num_samples, got k={k} and num_samples={n.min()}")
    if np.any((c < 0) | (c > n)):
        raise ValueError("num_correct must lie in [0, num_samples]")
    n, c = np.broadcast_arrays(n, c)
    values = [
        1.0 if ni - ci < k else 1.0 - float(np.prod(1.0 - k / np.arange(ni - ci + 1, ni + 1, dtype=np.float64)))
        for ni, ci in zip(n.ravel().tolist(), c.ravel().tolist())
    ]
    return np.array(values, dtype=np.float64).reshape(n.shape)


def summarize(results: Sequence[Mapping], ks: Iterable[int]) -> dict[str, float]:
    """Dataset-level metrics from per-problem result records.

    Each record has `num_samples`, `num_correct`, `missing_answer`, `missing_format` (counts
    over that problem's samples). `accuracy` is the mean per-sample correctness averaged over
    problems (= pass@1); `pass@k` for every k <= the smallest num_samples.
    """
    if not results:
        return {"problems": 0}
    n = np.array([r["num_samples"] for r in results])
    c = np.array([r["num_correct"] for r in results])
    total = float(n.sum())
    out = {
        "problems": len(results),
        "samples": int(total),
        "accuracy": float(np.mean(c / n)),
        "format/missing_answer_frac": sum(r["missing_answer"] for r in results) / total,
        "format/missing_format_frac": sum(r["missing_format"] for r in results) / total,
    }
    for k in sorted(set(ks)):
        if k <= n.min():
            out[f"pass@{k}"] = float(np.mean(pass_at_k(n, c, k)))
    return out


def format_table(summary: Mapping[str, float], title: str) -> str:
    """A plain two-column table, readable in a terminal and in CI logs."""
    rows = [(key, f"{value:.4f}" if isinstance(value, float) else str(value)) for key, value in summary.items()]
    width = max([len(k) for k, _ in rows] + [len("metric")])
    vwidth = max([len(v) for _, v in rows] + [len("value")])
    rule = "-" * (width + vwidth + 3)
    lines = [title, rule, f"{'metric':<{width}} | {'value':>{vwidth}}", rule]
    lines += [f"{k:<{width}} | {v:>{vwidth}}" for k, v in rows]
    lines.append(rule)
    return "\n".join(lines)
