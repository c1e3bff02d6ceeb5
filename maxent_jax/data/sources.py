"""Load training and evaluation rows: the synthetic task, one HF dataset, or a weighted mixture.

Every source ends as a list of `{"problem": str, "answer": str, ...}` rows with empty rows dropped
(spec 2.1-2.3). Mistakes (a missing column, a bad split, an empty dataset) are UserErrors that
name the dataset and what exists instead.
"""

from __future__ import annotations

import json
import math
import pathlib
from typing import Any

import numpy as np

from maxent_jax.data.files import check_data_file
from maxent_jax.data.pair_sum import pair_sum_splits
from maxent_jax.data.synthetic import arithmetic_splits
from maxent_jax.errors import UserError

SYNTHETIC_PREFIX = "synthetic:"
SYNTHETIC_TASKS = ("arithmetic", "pair_sum")  # data/synthetic.py; data/pair_sum.py (many right answers)
_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
PROMPT_FALLBACKS = ("prompt", "question")
ANSWER_FALLBACKS = ("answer", "solution")


def _load_split(name: str, config: str | None, split: str) -> Any:
    """An HF `datasets.Dataset` for `name` (hub id, saved dataset dir, or a json/csv/parquet file)."""
    import datasets  # heavy import, only for real datasets

    path = pathlib.Path(name)
    try:
        if path.is_dir() and (path / "dataset_dict.json").exists():
            dataset = datasets.load_from_disk(str(path))
        elif path.is_dir() and (path / "dataset_info.json").exists():
            return datasets.load_from_disk(str(path))
        elif path.suffix in _FILE_BUILDERS and path.exists():
            check_data_file(path)  # a bad file named with its line and offset, not a datasets traceback
            # A single file is one split: it serves whatever split name is asked for.
            return datasets.load_dataset(_FILE_BUILDERS[path.suffix], data_files=str(path), split="train")
        else:
            dataset = datasets.load_dataset(name, config)
    except FileNotFoundError as err:
        raise UserError(f"dataset {name!r} could not be found ({err})") from None
    except (ConnectionError, OSError, ValueError) as err:
        raise UserError(f"dataset {name!r} could not be loaded: {' '.join(str(err).split())[:300]}") from None
    except (datasets.exceptions.DatasetGenerationError, StopIteration) as err:
        # What the file check above cannot see (a damaged parquet file, a hub dataset's bad shard).
        cause = err.__cause__ or err
        raise UserError(f"dataset {name!r} could not be read: {type(cause).__name__}: "
                        f"{' '.join(str(cause).split())[:300]}") from None
    if split not in dataset:
        raise UserError(f"dataset {name!r} has no split {split!r}; available: {', '.join(dataset.keys())}")
    return dataset[split]


def _column(columns: list[str], wanted: str, fallbacks: tuple[str, ...], name: str, field: str) -> str:
    for candidate in (wanted, *fallbacks):
        if candidate in columns:
            return candidate
    raise UserError(f"dataset {name!r} has no column {wanted!r} (config {field}); columns: {', '.join(columns)}")


def _rows(dataset: Any, name: str, prompt_col: str, answer_col: str,
          worked_col: str = "") -> list[dict[str, str]]:
    """Rows with `problem` and `answer`, plus `solution` (the worked solution the supervised warm-up
    imitates) when the dataset has the `worked_col` column."""
    columns = list(dataset.column_names)
    p = _column(columns, prompt_col, PROMPT_FALLBACKS if prompt_col == "problem" else (), name,
                "data.dataset_prompt_column")
    a = _column(columns, answer_col, ANSWER_FALLBACKS, name, "data.dataset_solution_column")
    worked = dataset[worked_col] if worked_col and worked_col in columns else None
    rows = []
    for i, (problem, answer) in enumerate(zip(dataset[p], dataset[a])):
        problem, answer = str(problem or ""), str(answer or "")
        if problem.strip() and answer.strip():
            row = {"problem": problem, "answer": answer}
            if worked is not None and str(worked[i] or "").strip():
                row["solution"] = str(worked[i])
            rows.append(row)
    return rows


def _mixture_rows(mixture_json: str, seed: int, prompt_col: str, answer_col: str,
                  worked_col: str) -> list[dict[str, str]]:
    rows: list[dict[str, str]] = []
    for source in json.loads(mixture_json):
        split = _load_split(source["id"], source.get("config"), source.get("split", "train"))
        columns = source.get("columns") or {}
        part = _rows(split, source["id"], columns.get("prompt", prompt_col), columns.get("answer", answer_col),
                     columns.get("solution", worked_col))
        weight = float(source.get("weight", 1.0))
        if weight < 1.0:
            keep = np.random.default_rng(seed).permutation(len(part))[: math.floor(len(part) * weight)]
            part = [part[i] for i in sorted(keep)]
        rows.extend(part)
    order = np.random.default_rng(seed).permutation(len(rows))
    return [rows[i] for i in order]


def load_rows(data_config: Any, seed: int) -> dict[str, list[dict[str, str]]]:
    """{'train': rows, 'eval': rows} for the config's `data` section."""
    d = data_config
    if d.dataset_name.startswith(SYNTHETIC_PREFIX) and not d.dataset_mixture:
        task = d.dataset_name[len(SYNTHETIC_PREFIX):]
        if task not in SYNTHETIC_TASKS:
            raise UserError(f"config field data.dataset_name={d.dataset_name!r} is invalid: the synthetic tasks are "
                            + ", ".join(f"'{SYNTHETIC_PREFIX}{name}'" for name in SYNTHETIC_TASKS))
        s = d.synthetic
        splits = (arithmetic_splits(s.num_train, s.num_eval, s.max_operand, seed, s.operators) if task == "arithmetic"
                  else pair_sum_splits(s.num_train, s.num_eval, s.max_operand, seed))
        return {"train": splits["train"], "eval": splits["test"]}
    if d.dataset_mixture:
        train = _mixture_rows(d.dataset_mixture, seed, d.dataset_prompt_column, d.dataset_solution_column,
                              d.dataset_worked_solution_column)
    else:
        split = _load_split(d.dataset_name, d.dataset_config, d.dataset_train_split)
        train = _rows(split, d.dataset_name, d.dataset_prompt_column, d.dataset_solution_column,
                      d.dataset_worked_solution_column)
    if not train:
        raise UserError(f"dataset {d.dataset_name or 'mixture'!r} has no usable rows (all prompts or answers empty)")
    evaluation: list[dict[str, str]] = []
    if d.eval_dataset_name:
        split = _load_split(d.eval_dataset_name, d.eval_dataset_config, d.eval_dataset_split)
        evaluation = _rows(
            split, d.eval_dataset_name, d.eval_dataset_prompt_column or d.dataset_prompt_column,
            d.eval_dataset_solution_column or d.dataset_solution_column,
        )
    return {"train": train, "eval": evaluation}
