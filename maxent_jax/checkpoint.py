"""Orbax checkpoints of a training run: the asynchronous, atomic save and the restore (onto any mesh).

Every save writes its integrity manifest inside Orbax's temporary directory before the commit
(`maxent_jax.checkpoint_verify` has the layout, the manifest and which step a run resumes from);
a full disk or read-only workdir during a save is one line (`maxent_jax.storage`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pathlib
import shutil
from typing import Any, Iterator, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

from maxent_jax.checkpoint_verify import (CHECKPOINTS_DIR, EXTRAS_ITEM, STATE_ITEM, TMP_MARKER, checkpoint_problem,
                                          list_steps, write_manifest)
from maxent_jax.errors import StorageFault, UserError
from maxent_jax.storage import QuietStorageFailures, silence_late_write_callbacks, storage_problem

log = logging.getLogger(__name__)

# Where Orbax's threads (absl) and its write tasks (asyncio: "Task exception was never retrieved")
# log a failed save once more each; a storage fault is reported as one line instead.
_NOISY_LOGGERS = ("absl", "asyncio")


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
    args = ocp.args.Composite(**{STATE_ITEM: state_args, EXTRAS_ITEM: ocp.args.JsonRestore()})
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
        try:
            restored = checkpointer.restore(path.absolute(), args=args)
        except (ValueError, KeyError, TypeError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise UserError(f"checkpoint {path} does not match the current model/optimizer state: {first}") from None
    return _uncommit(restored[STATE_ITEM], uncommitted), dict(restored[EXTRAS_ITEM])


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
        self._failed_step: int | None = None
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
                args=ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardSave(state), EXTRAS_ITEM: ocp.args.JsonSave(extras)}),
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
                self._failed_step = step
                self._discard_partial(step)
            whole = [s for s in list_steps(self.directory)
                     if s != step and checkpoint_problem(self.directory / str(s)) is None]
            kept = f"the newest whole checkpoint is step {whole[-1]}" if whole else "no whole checkpoint was saved yet"
            raise StorageFault(
                f"could not write checkpoint step {step} in {self.directory}: {problem}; {kept}. Free space "
                f"(or make the workdir writable) and rerun the same command to resume") from None

    def _discard_partial(self, step: int) -> None:
        """Remove a failed save's temporary directory to give its space back.

        Orbax stops waiting at the first failed write while its other writers (the extras JSON, the
        checkpoint metadata) run on, and once this frees space they can finish into a fresh copy of
        the directory; so `close()` removes it again after Orbax has shut down.
        """
        for tmp in self.directory.glob(f"{step}{TMP_MARKER}*"):
            shutil.rmtree(tmp, ignore_errors=True)

    def _write_pending_manifest(self) -> None:
        """Orbax's post-finalisation hook: runs on its background thread before the commit rename."""
        step = self._pending_step
        if step is None or jax.process_index() != 0:
            return
        tmp_dirs = sorted(self.directory.glob(f"{step}{TMP_MARKER}*"))
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
            if self._failed_step is not None:
                self._discard_partial(self._failed_step)
            if not self._failed:  # after a fault, its write tasks still log when they are collected at exit
                for name in _NOISY_LOGGERS:
                    logging.getLogger(name).removeFilter(self._quiet)

    def __enter__(self) -> "CheckpointManager":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
