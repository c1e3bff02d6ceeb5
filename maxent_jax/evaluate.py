"""Evaluation: the in-training eval (spec 10) and the standalone accuracy / pass@k entry point.

In training, `evaluate_policy` runs every `eval.eval_steps` optimizer steps: one completion per
eval prompt, scored with the eval reward in relaxed mode, giving `eval/mean_reward` and the
format-failure fractions `eval/format/missing_answer_frac` (no `<answer>...</answer>`) and
`eval/format/missing_format_frac` (the strict `<think>..</think>..<answer>..</answer>` gate fails).

For the standalone evaluation, n samples per problem give accuracy
and unbiased pass@k (`maxent_jax.eval_metrics`); every finished problem is appended to a JSONL
file at once, so a rerun with the same settings skips the problems already done.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import zlib
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from maxent_jax.errors import UserError
from maxent_jax.rewards.math_accuracy import extract_answer, passes_format_gate

GenerateFn = Callable[[Sequence[Mapping[str, Any]]], Sequence[str]]
"""eval rows (with `prompt`, and `prompt_ids` when tokenised) -> one completion text per row."""
SampleFn = Callable[[Sequence[Mapping[str, Any]], int], Sequence[Sequence[str]]]
"""(rows, n) -> n completion texts per row."""
RewardFn = Callable[[Sequence[str], Sequence[str]], Sequence[float]]
"""(completions, answers) -> the eval reward of each completion (relaxed format)."""


def _batches(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def format_failures(completions: Sequence[str]) -> tuple[int, int]:
    """(completions without an `<answer>` block, completions failing the strict format gate)."""
    missing_answer = sum(extract_answer(text) is None for text in completions)
    missing_format = sum(not passes_format_gate(text) for text in completions)
    return missing_answer, missing_format


# ---------------------------------------------------------------------------------------
# In-training evaluation


def evaluate_policy(
    generate_fn: GenerateFn,
    rows: Sequence[Mapping[str, Any]],
    reward_fn: RewardFn,
    batch_size: int,
    *,
    process_index: int = 0,
    process_count: int = 1,
) -> dict[str, float]:
    """Spec 10: one completion per eval row (`{'prompt', 'answer', ...}`), global means over all processes.

    Each process takes rows[process_index::process_count] in batches of `batch_size` prompts
    (`per_device_eval_batch_size`); sums are all-gathered, so every process returns the same dict.
    `generate_fn` must run on every process the same number of times when it holds collectives:
    shards differ by at most one row, so the caller pads if its generator needs equal batches.
    """
    shard = list(rows[process_index::process_count])
    totals = np.zeros(4, dtype=np.float64)  # reward sum, count, missing answer, missing format
    for batch in _batches(shard, batch_size):
        completions = list(generate_fn(batch))
        if len(completions) != len(batch):
            raise ValueError(f"generate_fn returned {len(completions)} completions for {len(batch)} prompts")
        rewards = np.asarray(reward_fn(completions, [row["answer"] for row in batch]), dtype=np.float64)
        missing_answer, missing_format = format_failures(completions)
        totals += (rewards.sum(), len(batch), missing_answer, missing_format)
    if process_count > 1:
        from jax.experimental import multihost_utils

        totals = np.asarray(multihost_utils.process_allgather(totals)).reshape(process_count, 4).sum(axis=0)
    count = max(totals[1], 1.0)
    return {
        "eval/mean_reward": float(totals[0] / count),
        "eval/format/missing_answer_frac": float(totals[2] / count),
        "eval/format/missing_format_frac": float(totals[3] / count),
    }


# ---------------------------------------------------------------------------------------
# Standalone evaluation: resumable per-problem results


def problem_key(index: int, problem: str) -> str:
    """Row position plus a hash of its text: a rerun on another dataset cannot match old rows."""
    return f"{index}:{hashlib.sha1(problem.encode('utf-8')).hexdigest()[:12]}"


class ResultsFile:
    """Per-problem results as JSONL: a settings line, then one record per finished problem.

    Opening an existing file resumes it: its records count as done, provided it was written
    with the same settings (checkpoint, dataset, samples, sampling); otherwise UserError.
    A line torn by a crash is dropped.
    """

    def __init__(self, path: str | os.PathLike, settings: Mapping[str, Any]):
        self.path = pathlib.Path(path)
        self.settings = json.loads(json.dumps(dict(settings)))
        self.records: dict[str, dict] = {}
        lines = self.path.read_text(encoding="utf-8").splitlines() if self.path.exists() else []
        parsed = []
        for line in lines:
            try:
                parsed.append(json.loads(line))
            except ValueError:
                continue
        if parsed:
            previous = parsed[0].get("settings")
            if previous != self.settings:
                changed = sorted(k for k in set(previous or {}) | set(self.settings)
                                 if (previous or {}).get(k) != self.settings.get(k))
                raise UserError(
                    f"--output={self.path} holds results for other settings (differs in {', '.join(changed)}): "
                    "pass another --output, or leave --output out (each setting then gets its own file)"
                )
            self.records = {r["key"]: r for r in parsed[1:] if "key" in r}
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text("".join(json.dumps(r) + "\n" for r in [{"settings": self.settings}, *self.records.values()]),
                       encoding="utf-8")
        os.replace(tmp, self.path)

    def add(self, record: Mapping[str, Any]) -> None:
        self.records[record["key"]] = dict(record)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())


def evaluate_problems(
    rows: Sequence[Mapping[str, Any]],
    sample_fn: SampleFn,
    reward_fn: RewardFn,
    *,
    num_samples: int,
    batch_size: int,
    results: ResultsFile,
    correct_at: float = 1.0,
    progress: Callable[[int, int], None] | None = None,
) -> list[dict]:
    """Sample `num_samples` completions for every row not yet in `results`, score, record.

    A sample is correct when its eval reward is >= `correct_at` (1.0: the binary accuracy
    reward's full mark). Returns the records of all rows, in row order.
    """
    keyed = [(problem_key(i, row["problem"]), row) for i, row in enumerate(rows)]
    pending = [(key, row) for key, row in keyed if key not in results.records]
    done = len(keyed) - len(pending)
    for batch in _batches(pending, batch_size):
        samples = sample_fn([row for _, row in batch], num_samples)
        for (key, row), completions in zip(batch, samples, strict=True):
            completions = list(completions)
            rewards = [float(r) for r in reward_fn(completions, [row["answer"]] * len(completions))]
            missing_answer, missing_format = format_failures(completions)
            results.add({
                "key": key,
                "problem": row["problem"],
                "answer": row["answer"],
                "num_samples": len(completions),
                "num_correct": sum(r >= correct_at for r in rewards),
                "missing_answer": missing_answer,
                "missing_format": missing_format,
                "rewards": rewards,
                "completions": completions,
            })
        done += len(batch)
        if progress is not None:
            progress(done, len(keyed))
    return [results.records[key] for key, _ in keyed]


# ---------------------------------------------------------------------------------------
# Entry point: python -m maxent_jax.evaluate --checkpoint=... [--config=...]

SUMMARY = """Accuracy and unbiased pass@k of a checkpoint on the config's eval set (data.eval_dataset_*,
MATH-500 style problem/answer columns; the synthetic task's test split by default).
A checkpoint inside a training run is evaluated with that run's own WORKDIR/config.json (no
--config needed; --config.a.b=v overrides still apply); --config=FILE replaces it.
Sampling follows the config's rollout section (e.g. --config.rollout.temperature=0.6).
Per-problem results go to JSONL, by default WORKDIR/eval/<checkpoint>-n<N>-<settings>.jsonl
(var/eval/... outside a run): each setting gets its own file, and rerunning with the same
settings resumes."""

HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")


def resolve_checkpoint_arg(path_arg: str) -> tuple[str, pathlib.Path]:
    """('hf', dir) for an HF model directory (or a run directory with final_hf/), ('orbax', step dir)
    for an Orbax step directory or a run directory without final_hf (its newest whole checkpoint)."""
    from maxent_jax import checkpoint_verify
    from maxent_jax import export as export_lib

    path = pathlib.Path(path_arg).expanduser()
    if not path.exists():
        raise UserError(f"--checkpoint={path_arg}: no such file or directory")
    if (path / "config.json").is_file() and any((path / name).is_file() for name in HF_WEIGHTS):
        return "hf", path
    if (path / export_lib.FINAL_EXPORT_DIR / "config.json").is_file():
        return "hf", path / export_lib.FINAL_EXPORT_DIR
    if (path / "adapter_config.json").is_file():  # a LoRA run's final_hf: adapters without their base
        merged = path.parent / export_lib.MERGED_EXPORT_DIR
        raise UserError(f"--checkpoint={path_arg} is a LoRA adapter directory (adapters without their base); "
                        f"evaluate the run's merged model: --checkpoint={merged}")
    steps_dir = path / checkpoint_verify.CHECKPOINTS_DIR if (path / checkpoint_verify.CHECKPOINTS_DIR).is_dir() else path
    if not (path / "state").is_dir() and not checkpoint_verify.list_steps(steps_dir):
        raise UserError(f"--checkpoint={path_arg}: neither an HF model directory nor an Orbax checkpoint")
    point = checkpoint_verify.resolve_resume(str(path), path)
    return "orbax", point.path


def _flags() -> Any:
    from absl import flags

    from maxent_jax import cli

    fv = flags.FlagValues()
    cli.define_config_flag(fv)
    flags.DEFINE_string("checkpoint", None, "HF model directory (e.g. WORKDIR/final_hf), Orbax step directory "
                        "(WORKDIR/checkpoints/N) or run directory; inside a run, its WORKDIR/config.json is the "
                        "config unless --config is given.", flag_values=fv)
    flags.DEFINE_integer("num_samples", 1, "Completions per problem (n).", flag_values=fv)
    flags.DEFINE_list("k", ["1"], "pass@k values, comma-separated, each <= --num_samples.", flag_values=fv)
    flags.DEFINE_string("output", None, "Per-problem results JSONL, resumable (default: WORKDIR/eval/"
                        "<checkpoint>-n<num_samples>-<settings hash>.jsonl, var/eval/... outside a run).",
                        flag_values=fv)
    flags.DEFINE_integer("batch_size", 0, "Problems per generate call (0 = eval.per_device_eval_batch_size).",
                         flag_values=fv)
    return fv


def _parse(argv: list[str]) -> tuple[Any, list[int]]:
    """(flag values, sorted k values); every mistake is a UserError."""
    from maxent_jax import cli

    fv, rest = cli.parse(_flags, argv)
    if len(rest) > 1:
        raise UserError(f"unexpected positional arguments: {' '.join(rest[1:])}")
    if not fv.checkpoint:
        raise UserError("--checkpoint is required: an HF model directory, an Orbax step directory or a run directory")
    try:
        ks = sorted({int(k) for k in fv.k})
    except ValueError:
        raise UserError(f"--k={','.join(fv.k)} is invalid: comma-separated integers >= 1") from None
    if fv.num_samples < 1 or not ks or ks[0] < 1 or ks[-1] > fv.num_samples:
        raise UserError(f"--k={','.join(map(str, ks))} with --num_samples={fv.num_samples} is invalid: "
                        "every k must lie in 1..num_samples")
    return fv, ks


def run_dir_of(kind: str, ckpt_path: pathlib.Path) -> pathlib.Path | None:
    """The training run a checkpoint belongs to (WORKDIR of WORKDIR/checkpoints/N, WORKDIR/final_hf or a
    LoRA run's WORKDIR/final_merged_hf), recognised by its run config.json; None for a model directory
    outside a run."""
    from maxent_jax import checkpoint_verify
    from maxent_jax import export as export_lib

    ckpt_path = ckpt_path.resolve()
    if kind == "orbax" and ckpt_path.parent.name == checkpoint_verify.CHECKPOINTS_DIR:
        run = ckpt_path.parent.parent
    elif kind == "hf" and ckpt_path.name in (export_lib.FINAL_EXPORT_DIR, export_lib.MERGED_EXPORT_DIR):
        run = ckpt_path.parent
    else:
        return None
    try:
        data = json.loads((run / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return run if isinstance(data, dict) and "rollout" in data and "model" in data else None


def resolve_config(fv: Any, run_dir: pathlib.Path | None) -> Any:
    """--config=FILE if given; else the run's own config.json; else the default config file. Then the
    --config.a.b=v overrides, and validation."""
    from maxent_jax import cli
    from maxent_jax import config as config_lib

    if fv["config"].present or run_dir is None:
        return cli.validated(fv.config)
    path = run_dir / "config.json"
    config = config_lib.from_json_dict(json.loads(path.read_text()), source=str(path))
    cli.apply_overrides(config, fv["config"])
    return cli.validated(config)


def default_output(run_dir: pathlib.Path | None, kind: str, ckpt_path: pathlib.Path,
                   settings: Mapping[str, Any]) -> pathlib.Path:
    """Where results go without --output: under the run (else var/eval), one file per settings, so a
    new --num_samples or temperature starts its own file and the same settings resume theirs."""
    digest = hashlib.sha1(json.dumps(settings, sort_keys=True).encode("utf-8")).hexdigest()[:8]
    label = f"step{ckpt_path.name}" if kind == "orbax" and ckpt_path.name.isdigit() else ckpt_path.name
    name = f"{label}-n{settings['num_samples']}-{digest}.jsonl"
    if run_dir is not None:
        return run_dir / "eval" / name
    return pathlib.Path("var/eval") / f"{ckpt_path.resolve().parent.name}-{name}"


def _settings(config: Any, ckpt_path: pathlib.Path, num_samples: int) -> dict[str, Any]:
    """What makes two evaluations comparable: a results file only resumes under the same settings."""
    r, rw = config.rollout, config.rewards
    return {"checkpoint": str(ckpt_path.resolve()), "dataset": config.data.eval_dataset_name or config.data.dataset_name,
            "split": config.data.eval_dataset_split, "num_samples": num_samples, "temperature": r.temperature,
            "top_p": r.top_p, "top_k": r.top_k, "max_tokens": r.max_completion_length, "seed": config.seed,
            "rewards": list(rw.eval_reward_funcs or rw.reward_funcs)}


def _load(config: Any, kind: str, ckpt_path: pathlib.Path) -> tuple[Any, Any]:
    """(policy, params): the model the config describes, with the checkpoint's weights."""
    from maxent_jax import checkpoint as checkpoint_lib
    from maxent_jax import run_setup
    from maxent_jax.parallel.mesh import make_mesh

    with config.unlocked():
        if kind == "hf":
            config.model.name_or_path = str(ckpt_path)
            if any((ckpt_path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
                config.model.tokenizer_name_or_path = str(ckpt_path)
    policy = run_setup.load_policy(config, make_mesh(tuple(config.mesh.shape)))
    if kind == "hf":
        return policy, policy.params
    restored, _ = checkpoint_lib.restore_checkpoint(ckpt_path, {"train": {"params": policy.params}}, partial=True)
    return policy, restored["train"]["params"]


def _sample_fn(policy: Any, params: Any, config: Any, num_samples: int) -> SampleFn:
    import jax

    from maxent_jax.rollout.backend import SamplingParams

    r = config.rollout
    sampling = SamplingParams(n=num_samples, max_tokens=r.max_completion_length, temperature=r.temperature,
                              top_p=r.top_p, top_k=r.top_k, stop=tuple(r.stop_sequences), ignore_eos=r.ignore_eos)
    base_key = jax.random.key(config.seed)

    def sample(batch: Sequence[Mapping[str, Any]], n: int) -> list[list[str]]:
        # keyed by the batch's first problem, so a resumed evaluation draws the same samples for it
        key = jax.random.fold_in(base_key, zlib.crc32(batch[0]["problem"].encode("utf-8")) & 0x7FFFFFFF)
        ids, _, _ = policy.generate(params, [row["prompt_ids"] for row in batch], sampling, key)
        texts = policy.decode(ids)
        return [texts[i * n:(i + 1) * n] for i in range(len(batch))]

    return sample


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    import sys

    from maxent_jax import cli, run_setup
    from maxent_jax.eval_metrics import format_table, summarize
    from maxent_jax.rewards import RewardScorer

    argv = list(sys.argv if argv is None else argv)
    if cli.help_requested(argv):
        cli.print_help(_flags(), "maxent_jax.evaluate", SUMMARY)
        return {}
    fv, ks = _parse(argv)
    kind, ckpt_path = resolve_checkpoint_arg(fv.checkpoint)
    run_dir = run_dir_of(kind, ckpt_path)
    config = resolve_config(fv, run_dir)
    if run_dir is not None and not fv["config"].present:
        print(f"config: {run_dir / 'config.json'} (the run's own)", flush=True)
    settings = _settings(config, ckpt_path, fv.num_samples)
    output = pathlib.Path(fv.output) if fv.output else default_output(run_dir, kind, ckpt_path, settings)
    results = ResultsFile(output, settings)  # before loading the model: a settings clash fails fast
    policy, params = _load(config, kind, ckpt_path)
    rows = run_setup.load_task(config, policy.tokenizer).eval[: config.eval.max_eval_samples or None]
    if not rows:
        raise UserError("the config has no eval rows: set data.eval_dataset_name (problem/answer columns)")
    if results.records:
        print(f"resuming {output}: {len(results.records)} problems already done", flush=True)
    rw = config.rewards
    weights = rw.eval_reward_weights if rw.eval_reward_funcs else rw.reward_weights
    with RewardScorer(settings["rewards"], weights, num_workers=rw.num_workers, item_timeout_s=rw.timeout_s) as scorer:
        records = evaluate_problems(
            rows, _sample_fn(policy, params, config, fv.num_samples),
            lambda texts, answers: scorer(list(texts), list(answers), is_eval=True)[0],
            num_samples=fv.num_samples, batch_size=fv.batch_size or config.eval.per_device_eval_batch_size,
            results=results, progress=lambda done, total: print(f"  {done}/{total} problems", flush=True))
    summary = summarize(records, ks)
    summary_path = output.with_suffix(".summary.json")
    summary_path.write_text(json.dumps({"settings": settings, "summary": summary}, indent=2) + "\n")
    title = f"{ckpt_path} on {settings['dataset']} (n={fv.num_samples}, temperature={settings['temperature']})"
    print(format_table(summary, title))
    print(f"per-problem results: {output}\nsummary: {summary_path}")
    return summary


if __name__ == "__main__":
    from maxent_jax.errors import exit_on_user_error

    exit_on_user_error(main)
