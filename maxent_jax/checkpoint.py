"""Orbax checkpoints of a training run: save, verify, resume (onto any mesh) and export.

Layout under the run directory (docs/checkpoints.md):

    WORKDIR/checkpoints/<step>/state/            sharded arrays (params, optimizer, controllers, RNG, counters)
    WORKDIR/checkpoints/<step>/extras/           host JSON (data position, config hash, token counters, ...)
    WORKDIR/checkpoints/<step>/maxent_manifest.json   size + CRC32 of every file, written before the commit
    WORKDIR/checkpoints_rejected/<step>/         checkpoints found corrupt on resume, moved aside

Why a manifest: Orbax commits a step by renaming `<step>.orbax-checkpoint-tmp` to `<step>`, so a
crash mid-save never leaves a step directory; but files can still be truncated or damaged later
(a full disk during a copy, a bad node). The manifest is written inside the temporary directory
(Orbax's post-finalisation hook runs before the rename), so it is part of the atomic commit and
lets `resolve_resume` tell a whole checkpoint from a damaged one without restoring it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import pathlib
import shutil
import zlib
from typing import Any, Iterator, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

from maxent_jax.errors import StorageFault, UserError
from maxent_jax.storage import QuietStorageFailures, silence_late_write_callbacks, storage_problem

log = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
FINAL_EXPORT_DIR = "final_hf"
CONTROLLER_STATE_FILE = "controller_state.json"
REJECTED_DIR = "checkpoints_rejected"
MANIFEST = "maxent_manifest.json"
_STATE, _EXTRAS = "state", "extras"
_TMP_MARKER = ".orbax-checkpoint-tmp"
_CRC_BLOCK = 1 << 22
# Orbax rewrites the step metadata (commit timestamp) after the manifest is written.
_REWRITTEN_AT_COMMIT = ("_CHECKPOINT_METADATA",)
# Where Orbax's threads (absl) and its write tasks (asyncio: "Task exception was never retrieved")
# log a failed save once more each; a storage fault is reported as one line instead.
_NOISY_LOGGERS = ("absl", "asyncio")


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
    if _TMP_MARKER in step_dir.name:
        return "an unfinished save (temporary directory)"
    for needed in ("_CHECKPOINT_METADATA", _STATE, _EXTRAS):
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
    for rel in (f"{_STATE}/_METADATA", f"{_EXTRAS}/metadata"):
        try:
            json.loads((step_dir / rel).read_text())
        except FileNotFoundError:
            return f"missing {rel}"
        except (OSError, ValueError) as err:
            return f"unreadable {rel} ({' '.join(str(err).split())[:200]})"
    state = (step_dir / _STATE).absolute()
    if not (state / "manifest.ocdbt").exists():
        return None  # not an OCDBT checkpoint: the structural checks above are all there is
    import tensorstore as ts

    key = b""
    try:
        store = ts.KvStore.open({"driver": "ocdbt", "base": f"file://{state}/"}).result()
        for key in store.list().result():
            if not store.read(key).result().value:
                # tensorstore reads a value whose data file was deleted as empty; none is stored empty.
                return f"unreadable {_STATE}: value {key.decode(errors='replace')} is empty (a data file is missing)"
    except Exception as err:  # tensorstore raises ValueError/OSError variants for every storage fault
        where = f" (value {key.decode(errors='replace')})" if key else ""
        return f"unreadable {_STATE}{where}: {' '.join(str(err).split())[:200]}"
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
    if (path / _STATE).exists():
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


# ---------------------------------------------------------------------------------------
# Preflight


def state_nbytes(tree: Any) -> int:
    """Global bytes of every array leaf (concrete or abstract) of `tree`; an upper bound on a save."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        if hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
            if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
                leaf = jax.eval_shape(jax.random.key_data, leaf)
            total += math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize
    return total


def planned_saves(start_step: int, total_steps: int, save_steps: int) -> int:
    """Checkpoints a run from `start_step` to `total_steps` writes: one per `save_steps` multiple,
    plus one for the last step or a preemption (never fewer than one)."""
    periodic = (total_steps // save_steps - start_step // save_steps) if save_steps > 0 else 0
    return max(0, periodic) + 1


def preflight(workdir: str | os.PathLike, *, checkpoint_bytes: int, keep: int, extra_bytes: int = 0,
              saves: int | None = None) -> None:
    """Fail before training when the run could not write its checkpoints.

    The workdir must be creatable and writable, and its filesystem must have room for the most
    checkpoints on disk at once: with `keep` > 0, `keep` plus the one being written; with `keep`
    = 0 (keep all), every one of the run's `saves` (`planned_saves`; unknown = None counts 2, the
    least a run needs). Steps already on disk count against that, as does `extra_bytes` (the
    final export); 5% margin.
    """
    workdir = pathlib.Path(workdir)
    ckpt_dir = workdir / CHECKPOINTS_DIR
    try:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        probe = ckpt_dir / f".write_probe_{os.getpid()}"
        with open(probe, "wb") as f:
            f.write(b"\0" * 4096)
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as err:
        raise UserError(f"--workdir={workdir} is not writable: {err.strerror or err}") from None
    existing = len(list_steps(ckpt_dir))
    slots = _slots(keep, existing, saves)
    needed = bytes_needed(checkpoint_bytes, keep=keep, existing=existing, saves=saves, extra_bytes=extra_bytes)
    free = shutil.disk_usage(ckpt_dir).free
    if free < needed:
        raise UserError(
            f"--workdir={workdir} has {format_bytes(free)} free but the run needs about {format_bytes(needed)} "
            f"({slots} more checkpoint(s) of {format_bytes(checkpoint_bytes)} with checkpoint.save_total_limit={keep}"
            f"{f', plus {format_bytes(extra_bytes)} for the final export' if extra_bytes else ''}): free space, "
            "keep fewer (checkpoint.save_total_limit) or save less often (checkpoint.save_steps)"
        )


def _slots(keep: int, existing: int, saves: int | None) -> int:
    if saves is None:
        at_once = keep + 1 if keep > 0 else 2
    else:
        at_once = min(keep + 1, existing + saves) if keep > 0 else existing + saves
    return max(1, at_once - existing)


def bytes_needed(checkpoint_bytes: int, *, keep: int, existing: int, saves: int | None = None,
                 extra_bytes: int = 0) -> int:
    """Disk a run still needs for its checkpoints (see `preflight` for how many are on disk at
    once) less those already there, plus `extra_bytes` (the final export), with a 5% margin."""
    return int((_slots(keep, existing, saves) * checkpoint_bytes + extra_bytes) * 1.05)


def format_bytes(n: float) -> str:
    """A size in the largest binary unit that keeps it >= 1 (`12.3 MiB`, not `0.01 GiB`)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


# ---------------------------------------------------------------------------------------
# The manager


def abstract_state(tree: Any) -> Any:
    """Concrete arrays -> `jax.ShapeDtypeStruct` with the same sharding (other leaves unchanged)."""
    def to_abstract(leaf: Any) -> Any:
        if isinstance(leaf, jax.Array):
            return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)
        return leaf

    return jax.tree.map(to_abstract, tree)


def restore_checkpoint(path: str | os.PathLike, target: Any, *, partial: bool = False) -> tuple[Any, dict]:
    """Restore `(state, extras)` from a step directory; `target` gives the structure and the CURRENT shardings.

    `target` is a pytree of `jax.ShapeDtypeStruct` with `sharding` (or concrete arrays,
    whose shardings are used), so a checkpoint written on one mesh restores onto another.
    `partial=True` restores only the subtrees `target` names (e.g. `{'train': {'params': ...}}`
    for evaluation) and skips the rest of the saved state.
    """
    path = pathlib.Path(path)
    problem = checkpoint_problem(path)
    if problem:
        raise UserError(f"checkpoint {path} is not usable: {problem}")
    uncommitted = [isinstance(leaf, jax.Array) and not leaf.committed for leaf in jax.tree.leaves(target)]
    target = abstract_state(target)
    if partial:
        state_args = ocp.args.PyTreeRestore(
            item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True)
    else:
        state_args = ocp.args.StandardRestore(target)
    args = ocp.args.Composite(**{_STATE: state_args, _EXTRAS: ocp.args.JsonRestore()})
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
        try:
            restored = checkpointer.restore(path.absolute(), args=args)
        except (ValueError, KeyError, TypeError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise UserError(f"checkpoint {path} does not match the current model/optimizer state: {first}") from None
    return _uncommit(restored[_STATE], uncommitted), dict(restored[_EXTRAS])


def _uncommit(tree: Any, flags: list[bool]) -> Any:
    """Leaves whose target was an uncommitted array (placed by default, e.g. a fresh RNG key) come
    back uncommitted too: Orbax returns every array committed to its target's devices, and a key
    committed to device 0 cannot meet parameters spread over a mesh in one jitted call."""
    leaves, treedef = jax.tree.flatten(tree)
    if not any(flags) or len(leaves) != len(flags):
        return tree

    def uncommit(leaf: jax.Array) -> jax.Array:
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            data = np.asarray(jax.random.key_data(leaf))
            return jax.random.wrap_key_data(jax.numpy.asarray(data), impl=jax.random.key_impl(leaf))
        return jax.numpy.asarray(np.asarray(leaf))

    return jax.tree.unflatten(treedef, [uncommit(x) if flag else x for x, flag in zip(leaves, flags)])


class CheckpointManager:
    """Asynchronous, atomic, verified checkpoints of one run in WORKDIR/checkpoints.

    `save` returns once the arrays are copied off the accelerator (so the next step may
    overwrite donated buffers); writing, the manifest, the commit and pruning to the newest
    `keep` steps (0 = keep all) happen on Orbax's background thread. Call `wait()` before
    reading a checkpoint back in the same process, and `close()` on exit.
    """

    def __init__(self, workdir: str | os.PathLike, *, save_steps: int, keep: int, async_save: bool = True):
        self.workdir = pathlib.Path(workdir)
        self.directory = (self.workdir / CHECKPOINTS_DIR).absolute()
        self.save_steps = save_steps
        self.async_save = async_save
        self._pending_step: int | None = None
        self._failed = False
        self._quiet = QuietStorageFailures()
        for name in _NOISY_LOGGERS:
            logging.getLogger(name).addFilter(self._quiet)
        silence_late_write_callbacks()  # before a save can fail: its late callbacks may come first
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep if keep > 0 else None,
            create=True,
            cleanup_tmp_directories=True,
            enable_async_checkpointing=True,
            async_options=ocp.AsyncOptions(post_finalization_callback=self._write_pending_manifest),
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def due(self, step: int) -> bool:
        """Whether the save cadence asks for a checkpoint after optimizer step `step` (spec 11)."""
        return self.save_steps > 0 and step > 0 and step % self.save_steps == 0

    def save(self, step: int, state: Any, extras_json: Mapping[str, Any]) -> None:
        """Start saving `state` (a pytree of arrays, possibly sharded) and `extras_json` as `step`.

        A step that already exists (a run replaying steps after resuming from an older
        checkpoint) is replaced. Raises UserError when `extras_json` is not JSON.
        """
        try:
            extras = json.loads(json.dumps(dict(extras_json), allow_nan=False))
        except (TypeError, ValueError) as err:
            raise UserError(f"checkpoint extras must be plain JSON data: {err}") from None
        self.wait()
        with self._reporting_storage_faults(step):
            if step in self._manager.all_steps():
                log.warning("replacing existing checkpoint step %d in %s", step, self.directory)
                self._manager.delete(step)
            self._pending_step = step
            self._manager.save(
                step,
                args=ocp.args.Composite(**{_STATE: ocp.args.StandardSave(state), _EXTRAS: ocp.args.JsonSave(extras)}),
                force=True,
            )
        if not self.async_save:
            self.wait()

    @contextlib.contextmanager
    def _reporting_storage_faults(self, step: int | None) -> Iterator[None]:
        """A full disk / read-only workdir during a save -> one UserError line naming the step and the
        newest whole checkpoint (untouched: Orbax writes into a temporary directory, which is removed
        here to give the space back). Orbax's background threads' own tracebacks are silenced."""
        try:
            yield
        except Exception as err:
            problem = storage_problem(err)
            if problem is None:
                raise
            self._failed = True
            if step is not None:
                for tmp in self.directory.glob(f"{step}{_TMP_MARKER}*"):
                    shutil.rmtree(tmp, ignore_errors=True)
            whole = [s for s in list_steps(self.directory)
                     if s != step and checkpoint_problem(self.directory / str(s)) is None]
            kept = f"the newest whole checkpoint is step {whole[-1]}" if whole else "no whole checkpoint was saved yet"
            raise StorageFault(
                f"could not write checkpoint step {step} in {self.directory}: {problem}; {kept}. Free space "
                f"(or make the workdir writable) and rerun the same command to resume") from None

    def _write_pending_manifest(self) -> None:
        """Orbax's post-finalisation hook: runs on its background thread before the commit rename."""
        step = self._pending_step
        if step is None or jax.process_index() != 0:
            return
        tmp_dirs = sorted(self.directory.glob(f"{step}{_TMP_MARKER}*"))
        if len(tmp_dirs) != 1:
            log.warning("checkpoint step %d: could not find its temporary directory; no manifest written", step)
            return
        write_manifest(tmp_dirs[0], step)

    def latest_step(self) -> int | None:
        """The newest committed step (committed by this manager or found on disk), or None."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def restore(self, step_or_path: int | str | os.PathLike, target: Any, *, partial: bool = False) -> tuple[Any, dict]:
        """`restore_checkpoint` of step `step_or_path` of this run (or of any step directory)."""
        self.wait()
        path = self.directory / str(step_or_path) if isinstance(step_or_path, int) else pathlib.Path(step_or_path)
        return restore_checkpoint(path, target, partial=partial)

    def wait(self) -> None:
        """Block until the pending save is committed (and pruning is done)."""
        with self._reporting_storage_faults(self._pending_step):
            self._manager.wait_until_finished()

    def close(self) -> None:
        reported = self._failed
        try:
            # A save still in flight when another write failed (metrics.jsonl) fails here too: one line.
            with self._reporting_storage_faults(self._pending_step):
                self._manager.close()
        except StorageFault:
            if not reported:  # else already reported as one line
                raise
        finally:
            if not self._failed:  # after a fault, its write tasks still log when they are collected at exit
                for name in _NOISY_LOGGERS:
                    logging.getLogger(name).removeFilter(self._quiet)

    def __enter__(self) -> "CheckpointManager":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------------------------
# End of training


def export_final(
    params: Any,
    model_config: Any,
    workdir: str | os.PathLike,
    *,
    tokenizer_dir: str | os.PathLike | None,
    controller_state: Mapping[str, Any] | None,
    dtype: str | None = None,
) -> pathlib.Path:
    """Write WORKDIR/final_hf: HF config, safetensors weights and tokenizer, plus controller_state.json.

    `params` / `model_config` are the policy's `nnx.State` (or Decoder) and `ModelConfig`;
    `controller_state` is the controllers' JSON (spec 8.4), stored beside the weights so the
    directory alone can seed another run. Transformers ignores the extra file. The weights
    directory is renamed into place whole; the JSON is then replaced atomically.
    """
    from maxent_jax.model.hf_io import export_hf_checkpoint

    out = export_hf_checkpoint(params, model_config, pathlib.Path(workdir) / FINAL_EXPORT_DIR,
                               tokenizer_dir=tokenizer_dir, dtype=dtype)
    if controller_state is not None and jax.process_index() == 0:
        tmp = out / (CONTROLLER_STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(dict(controller_state), indent=2) + "\n")
        os.replace(tmp, out / CONTROLLER_STATE_FILE)
    return out


MERGED_EXPORT_DIR = "final_merged_hf"


def export_adapter(model: Any, settings: Any, workdir: str | os.PathLike, *, base: Mapping[str, Any],
                   tokenizer_dir: str | os.PathLike | None, controller_state: Mapping[str, Any] | None) -> pathlib.Path:
    """A LoRA run's WORKDIR/final_hf: a PEFT adapter directory (`adapter_config.json`,
    `adapter_model.safetensors`) on the base `base` names, with the tokenizer and controller_state.json."""
    from maxent_jax.model.hf_io import TOKENIZER_FILES
    from maxent_jax.model.lora_io import write_peft_adapter

    out = write_peft_adapter(model, settings, pathlib.Path(workdir) / FINAL_EXPORT_DIR, base_model=base["path"],
                             revision=base["revision"])
    if jax.process_index() == 0:
        for name in TOKENIZER_FILES if tokenizer_dir is not None else ():
            if (pathlib.Path(tokenizer_dir) / name).is_file():
                shutil.copyfile(pathlib.Path(tokenizer_dir) / name, out / name)
        if controller_state is not None:
            tmp = out / (CONTROLLER_STATE_FILE + ".tmp")
            tmp.write_text(json.dumps(dict(controller_state), indent=2) + "\n")
            os.replace(tmp, out / CONTROLLER_STATE_FILE)
    return out


def export_merged(model: Any, model_config: Any, workdir: str | os.PathLike, *,
                  tokenizer_dir: str | os.PathLike | None) -> pathlib.Path:
    """WORKDIR/final_merged_hf: a LoRA run's adapters folded into its base, as a plain HF checkpoint."""
    from maxent_jax.model.lora_io import export_merged as write_merged

    return write_merged(model, model_config, pathlib.Path(workdir) / MERGED_EXPORT_DIR, tokenizer_dir=tokenizer_dir)
