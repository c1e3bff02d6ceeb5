"""A run directory's identity: which config it holds, how far it got, and whether a new command may reuse it.

Two files beside the checkpoints (docs/checkpoints.md):

    WORKDIR/config.json   the resolved config of the run (every field)
    WORKDIR/run.json      {"fingerprint", "status", "step", "total_steps"}: the config's hash and the
                          run's progress ('running', 'interrupted', 'finished')

Why: a workdir is the run's only copy of its checkpoints and metrics, and the commonest first-hour
mistake is pointing a new experiment at an old workdir. The trainer therefore compares the new
config with the stored one BEFORE it writes anything: identical -> resume (or report a finished
run); different -> one line naming every differing field, and nothing on disk is touched. Fields
that a resumed run may legitimately change (how long it runs, how it logs, evaluates and saves,
where the rollout server is) are accepted with `--accept_changes`; any other change needs a new
workdir, because the checkpoints would not match it or its metrics would mix two experiments.

The config and status are written only once a run has been built (model, data, checkpoint
preflight), so a validation or data error never rewrites a workdir's config.json.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
from typing import Any, Mapping

import ml_collections

from maxent_jax.config import to_json_dict
from maxent_jax.errors import UserError

CONFIG_FILE = "config.json"
RUN_FILE = "run.json"

# Fields a resumed run may change (with --accept_changes): the run's length, its logging, eval and
# save cadence, and infrastructure that does not enter the numbers. Entries ending in '.' are sections.
RESUMABLE_FIELDS = (
    "train.max_steps", "train.num_train_epochs", "train.max_consecutive_nonfinite", "train.gradient_chunks",
    "logging.", "eval.", "mesh.",
    "checkpoint.save_steps", "checkpoint.save_total_limit", "checkpoint.async_save", "checkpoint.export_final",
    "checkpoint.resume",
    "model.remat", "model.remat_policy", "model.logprob_chunk_size", "rollout.decode_streams",
    "vllm.url", "vllm.token_file", "vllm.server_timeout", "vllm.max_retries", "vllm.backoff",
    "vllm.backoff_multiplier", "vllm.retry_sleep", "rewards.num_workers", "rewards.timeout_s",
)


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}: the dotted field names users type after --config."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_fields(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The config as JSON-typed dotted fields (tuples as lists), the form config.json stores."""
    return flatten(to_json_dict(config))


def fingerprint(fields: Mapping[str, Any]) -> str:
    """A short, stable hash of every field and value."""
    return hashlib.sha256(json.dumps(dict(fields), sort_keys=True).encode()).hexdigest()[:16]


def resumable(field: str) -> bool:
    return any(field == f or (f.endswith(".") and field.startswith(f)) for f in RESUMABLE_FIELDS)


@dataclasses.dataclass(frozen=True)
class Change:
    field: str
    old: Any
    new: Any

    def __str__(self) -> str:
        return f"{self.field} {_short(self.old)} -> {_short(self.new)}"


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[Change]:
    """Fields whose value differs. A field the stored config lacks is not a change: the run
    predates that field, and its default reproduces what the run did."""
    return [Change(k, old[k], new[k]) for k in sorted(new) if k in old and old[k] != new[k]]


@dataclasses.dataclass(frozen=True)
class Existing:
    """What a workdir already holds, read before anything is written."""

    fields: dict[str, Any]  # the stored config.json, flattened
    fingerprint: str  # run.json's hash of the config ('' without run.json)
    status: str  # 'running', 'interrupted', 'finished', or 'unknown' (no run.json)
    step: int
    total_steps: int

    @property
    def finished(self) -> bool:
        return self.status == "finished"


def read(workdir: pathlib.Path) -> Existing | None:
    """The run a workdir holds, or None for a fresh (or never-started) workdir."""
    path = workdir / CONFIG_FILE
    if not path.is_file():
        return None
    try:
        fields = flatten(json.loads(path.read_text()))
    except (OSError, ValueError) as err:
        raise UserError(f"--workdir={workdir}: its {CONFIG_FILE} is unreadable ({err}); use a new --workdir") from None
    try:
        run = json.loads((workdir / RUN_FILE).read_text())
    except (OSError, ValueError):
        run = {}
    return Existing(fields, str(run.get("fingerprint", "")), str(run.get("status", "unknown")),
                    int(run.get("step", 0)), int(run.get("total_steps", 0)))


def check_reuse(workdir: pathlib.Path, config: ml_collections.ConfigDict, *,
                accept_changes: bool) -> tuple[Existing | None, list[Change]]:
    """Decide whether this command may use `workdir`, before anything is written to it.

    Returns (the existing run or None, the accepted changes). Raises UserError (one line, every
    differing field) when the config differs and the changes are not accepted or not acceptable.
    """
    existing = read(workdir)
    if existing is None:
        return None, []
    fields = config_fields(config)
    if existing.fingerprint == fingerprint(fields):
        return existing, []
    changes = diff(existing.fields, fields)
    if not changes:
        return existing, []
    listed = "; ".join(str(c) for c in changes)
    fixed = [c.field for c in changes if not resumable(c.field)]
    if fixed:
        raise UserError(
            f"--workdir={workdir} holds a run with another config ({listed}); {', '.join(fixed)} cannot change "
            "when a run resumes: use a new --workdir (nothing was written)")
    if not accept_changes:
        raise UserError(
            f"--workdir={workdir} holds a run with another config ({listed}); rerun with --accept_changes to "
            "resume it with these changes, or use a new --workdir (nothing was written)")
    return existing, changes


def write_config(workdir: pathlib.Path, config: ml_collections.ConfigDict) -> None:
    """config.json, replaced atomically."""
    _write_json(workdir / CONFIG_FILE, to_json_dict(config), indent=2)


def write_status(workdir: pathlib.Path, config: ml_collections.ConfigDict, *, status: str, step: int,
                 total_steps: int) -> None:
    """run.json: the config's fingerprint and how far the run got."""
    _write_json(workdir / RUN_FILE, {"fingerprint": fingerprint(config_fields(config)), "status": status,
                                     "step": step, "total_steps": total_steps})


def _write_json(path: pathlib.Path, data: Any, indent: int | None = None) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=indent, sort_keys=True) + "\n")
    os.replace(tmp, path)
