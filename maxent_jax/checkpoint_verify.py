"""Which checkpoints on disk are whole, and which one a run resumes from.

Layout under the run directory (docs/checkpoints.md):

    WORKDIR/checkpoints/<step>/state/            sharded arrays (params, optimizer, controllers, RNG, counters)
    WORKDIR/checkpoints/<step>/extras/           host JSON (data position, config hash, token counters, ...)
    WORKDIR/checkpoints/<step>/maxent_manifest.json   size + CRC32 of every file, written before the commit
    WORKDIR/checkpoints_rejected/<step>/         checkpoints found corrupt on resume, moved aside

Why a manifest: Orbax commits a step by renaming `<step>.orbax-checkpoint-tmp` to `<step>`, so a
crash mid-save never leaves a step directory; but files can still be truncated or damaged later
(a full disk during a copy, a bad node). The manifest is written inside the temporary directory
(Orbax's post-finalisation hook runs before the rename), so it is part of the atomic commit and
lets `resolve_resume` tell a whole checkpoint from a damaged one without restoring it. Saving and
restoring are `maxent_jax.checkpoint`'s.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import shutil
import zlib

import jax

from maxent_jax.errors import UserError

log = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
REJECTED_DIR = "checkpoints_rejected"
MANIFEST = "maxent_manifest.json"
# A step directory's two Orbax items, and the suffix of a step still being written.
STATE_ITEM, EXTRAS_ITEM = "state", "extras"
TMP_MARKER = ".orbax-checkpoint-tmp"
_CRC_BLOCK = 1 << 22
# Orbax rewrites the step metadata (commit timestamp) after the manifest is written.
_REWRITTEN_AT_COMMIT = ("_CHECKPOINT_METADATA",)


# ---------------------------------------------------------------------------------------
# Integrity manifest


def _crc32(path: pathlib.Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(_CRC_BLOCK):
            crc = zlib.crc32(block, crc)
    return crc


def write_manifest(step_dir: pathlib.Path, step: int) -> None:
    """Record size and CRC32 of every file under `step_dir` in `step_dir/MANIFEST` (atomic)."""
    files = {}
    for path in sorted(p for p in step_dir.rglob("*") if p.is_file() and p.name != MANIFEST):
        if path.parent == step_dir and path.name in _REWRITTEN_AT_COMMIT:
            continue
        files[path.relative_to(step_dir).as_posix()] = [path.stat().st_size, _crc32(path)]
    tmp = step_dir / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps({"version": 1, "step": step, "files": files}))
    os.replace(tmp, step_dir / MANIFEST)


def checkpoint_problem(step_dir: pathlib.Path) -> str | None:
    """Why `step_dir` is not a whole checkpoint, or None when it is.

    Checks Orbax's commit (the step metadata and both items exist) and, when the manifest is
    present, every file's size and CRC32. A checkpoint without a manifest (its manifest lost, or
    written by another tool) cannot be compared with anything, so every value it stores is read
    once instead (`_unverified_problem`); `resolve_resume` warns about it.
    """
    if not step_dir.is_dir():
        return "not a directory"
    if TMP_MARKER in step_dir.name:
        return "an unfinished save (temporary directory)"
    for needed in ("_CHECKPOINT_METADATA", STATE_ITEM, EXTRAS_ITEM):
        if not (step_dir / needed).exists():
            return f"missing {needed}"
    manifest_path = step_dir / MANIFEST
    if not manifest_path.exists():
        return _unverified_problem(step_dir)
    try:
        files = json.loads(manifest_path.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"unreadable {MANIFEST} ({err})"
    for rel, (size, crc) in files.items():
        path = step_dir / rel
        if not path.is_file():
            return f"missing file {rel}"
        if path.stat().st_size != size:
            return f"file {rel} has {path.stat().st_size} bytes, the manifest says {size}"
        if _crc32(path) != crc:
            return f"file {rel} is damaged (CRC32 mismatch)"
    return None


def _unverified_problem(step_dir: pathlib.Path) -> str | None:
    """Why a checkpoint without a manifest cannot be restored, or None when every part reads back.

    This project's saves always carry a manifest (it is part of the atomic commit), so a missing
    one usually means the step was damaged after it was written; a truncated or deleted file then
    makes the restore fail deep inside Orbax. Reading each stored value of the OCDBT database
    once (one value in memory at a time, far cheaper than a restore) finds a truncated or missing
    data file before the restore is attempted (checked on tensorstore 0.1.86: a truncated file
    fails the read, a deleted one reads as an empty value). Flipped bytes inside a value are not
    detected without the manifest's CRC32s.
    """
    for rel in (f"{STATE_ITEM}/_METADATA", f"{EXTRAS_ITEM}/metadata"):
        try:
            json.loads((step_dir / rel).read_text())
        except FileNotFoundError:
            return f"missing {rel}"
        except (OSError, ValueError) as err:
            return f"unreadable {rel} ({' '.join(str(err).split())[:200]})"
    state = (step_dir / STATE_ITEM).absolute()
    if not (state / "manifest.ocdbt").exists():
        return None  # not an OCDBT checkpoint: the structural checks above are all there is
    import tensorstore as ts

    key = b""
    try:
        store = ts.KvStore.open({"driver": "ocdbt", "base": f"file://{state}/"}).result()
        for key in store.list().result():
            if not store.read(key).result().value:
                # tensorstore reads a value whose data file was deleted as empty; none is stored empty.
                return f"unreadable {STATE_ITEM}: value {key.decode(errors='replace')} is empty (a data file is missing)"
    except Exception as err:  # tensorstore raises ValueError/OSError variants for every storage fault
        where = f" (value {key.decode(errors='replace')})" if key else ""
        return f"unreadable {STATE_ITEM}{where}: {' '.join(str(err).split())[:200]}"
    return None


def list_steps(checkpoints_dir: pathlib.Path) -> list[int]:
    """Committed step numbers in `checkpoints_dir`, ascending (temporary directories are ignored)."""
    if not checkpoints_dir.is_dir():
        return []
    return sorted(int(p.name) for p in checkpoints_dir.iterdir() if p.is_dir() and p.name.isdigit())


# ---------------------------------------------------------------------------------------
# Resume policy


@dataclasses.dataclass(frozen=True)
class ResumePoint:
    """A verified checkpoint to resume from."""

    step: int
    path: pathlib.Path


def resolve_resume(resume: str, workdir: str | os.PathLike) -> ResumePoint | None:
    """Turn `config.checkpoint.resume` into the checkpoint to restore, or None to start fresh.

    - 'latest': the newest whole checkpoint in WORKDIR/checkpoints; a damaged newer one is
      skipped with a warning and moved to WORKDIR/checkpoints_rejected/ (so a new save of that
      step cannot collide with it). None when there are no checkpoints.
    - 'none': start fresh; refused when the workdir already holds checkpoints, because new
      saves would mix two runs (use another --workdir or delete them).
    - a path: a step directory, or a directory of steps / a run directory (its newest whole one).
    """
    workdir = pathlib.Path(workdir)
    own = workdir / CHECKPOINTS_DIR
    if resume == "none":
        steps = list_steps(own)
        if steps:
            raise UserError(
                f"config field checkpoint.resume='none' but {own} already holds checkpoints {steps}: "
                "use another --workdir, delete that directory, or set checkpoint.resume=latest"
            )
        return None
    if resume == "latest":
        return _newest_whole(own, field_value="latest", quarantine=True)
    path = pathlib.Path(resume).expanduser()
    if not path.exists():
        raise UserError(f"config field checkpoint.resume={resume!r}: no such checkpoint path ('latest', 'none' or a path)")
    if (path / STATE_ITEM).exists():
        problem = checkpoint_problem(path)
        if problem:
            raise UserError(f"config field checkpoint.resume={resume!r}: the checkpoint is not usable: {problem}")
        _warn_if_unverified(path)
        return ResumePoint(int(path.name) if path.name.isdigit() else -1, path)
    steps_dir = path / CHECKPOINTS_DIR if (path / CHECKPOINTS_DIR).is_dir() else path
    found = _newest_whole(steps_dir, field_value=resume, quarantine=False)
    if found is None:
        raise UserError(f"config field checkpoint.resume={resume!r}: no checkpoint step directories in {steps_dir}")
    return found


def _newest_whole(steps_dir: pathlib.Path, *, field_value: str, quarantine: bool) -> ResumePoint | None:
    steps = list_steps(steps_dir)
    problems = []
    for step in reversed(steps):
        problem = checkpoint_problem(steps_dir / str(step))
        if problem is None:
            _warn_if_unverified(steps_dir / str(step))
            if quarantine:
                for bad_step, _ in problems:
                    _move_aside(steps_dir, bad_step)
            return ResumePoint(step, steps_dir / str(step))
        log.warning("checkpoint %s is damaged (%s); falling back to the previous one", steps_dir / str(step), problem)
        problems.append((step, problem))
    if problems:
        listed = "; ".join(f"step {s}: {p}" for s, p in problems)
        raise UserError(
            f"config field checkpoint.resume={field_value!r}: no usable checkpoint in {steps_dir} ({listed}); "
            "delete them or pass a --workdir without checkpoints"
        )
    return None


def _move_aside(steps_dir: pathlib.Path, step: int) -> None:
    if jax.process_index() != 0:
        return
    target = steps_dir.parent / REJECTED_DIR / str(step)
    if target.exists():
        shutil.rmtree(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(steps_dir / str(step)), str(target))
    log.warning("moved damaged checkpoint step %d to %s", step, target)


def _warn_if_unverified(step_dir: pathlib.Path) -> None:
    if not (step_dir / MANIFEST).exists():
        log.warning("checkpoint %s has no %s; its files cannot be verified before restoring", step_dir, MANIFEST)
