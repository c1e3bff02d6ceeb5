"""Checkpoint manager: exact round trip, cross-mesh restore, pruning, async, integrity, resume policy."""

from __future__ import annotations

import json
import logging
import pathlib
import shutil
import subprocess
import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from maxent_jax import checkpoint as ckpt
from maxent_jax import checkpoint_verify, disk_space
from maxent_jax import export as export_lib
from maxent_jax.errors import UserError

REPO = pathlib.Path(__file__).resolve().parents[1]


def _mesh(shape: tuple[int, ...]) -> Mesh:
    return Mesh(np.array(jax.devices()[:8]).reshape(shape), ("data", "fsdp", "tensor"))


def _state(mesh: Mesh, seed: int = 0) -> dict:
    """A small train-state-like pytree: sharded params and optimizer moments, controller scalars,
    a typed RNG key and its raw key data, integer counters."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((8, 16)).astype(np.float32)
    emb = rng.standard_normal((4, 16)).astype(np.float32)
    shard = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))  # noqa: E731
    return {
        "params": {"w": shard(w, P("fsdp", "tensor")), "emb": shard(jnp.asarray(emb, jnp.bfloat16), P(None, "fsdp"))},
        "opt": {"mu": shard(w * 0.1, P("fsdp", "tensor")), "count": shard(np.int32(7), P())},
        "controllers": {"tau": shard(np.float32(0.25), P()), "beta": shard(np.float32(0.04), P())},
        "key": jax.random.key(seed + 1),
        "key_data": jax.random.key_data(jax.random.key(seed + 2)),
        "step": shard(np.int64(12) if jax.config.jax_enable_x64 else np.int32(12), P()),
    }


EXTRAS = {"data_position": {"epoch": 0, "index": 96}, "config_hash": "abc123", "num_tokens": 4096,
          "controller_state": {"tau": 0.25, "beta": 0.04, "meta": {"version": 1}}}


def _assert_same(a: dict, b: dict) -> None:
    leaves_a, tree_a = jax.tree.flatten(a)
    leaves_b, tree_b = jax.tree.flatten(b)
    assert tree_a == tree_b
    for x, y in zip(leaves_a, leaves_b):
        assert x.dtype == y.dtype
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_is_exact(tmp_path):
    state = _state(_mesh((1, 8, 1)))
    with ckpt.CheckpointManager(tmp_path, save_steps=5, keep=3) as manager:
        manager.save(5, state, EXTRAS)
        manager.wait()
        assert manager.latest_step() == 5
        restored, extras = manager.restore(5, state)
    _assert_same(state, restored)
    assert extras == EXTRAS
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
        assert got.sharding.is_equivalent_to(want.sharding, got.ndim)
        assert got.committed == want.committed  # fresh keys stay uncommitted: usable with mesh arrays
    assert not restored["key"].committed and restored["params"]["w"].committed
    w = restored["params"]["w"]
    jax.jit(lambda k, x: jax.random.normal(jax.random.wrap_key_data(k), ()) + x)(restored["key_data"], w)
    assert (tmp_path / "checkpoints" / "5" / checkpoint_verify.MANIFEST).exists()


def test_restore_onto_a_different_mesh(tmp_path):
    """Saved with fsdp=8, restored onto data=2 x tensor=4 with other partition specs."""
    state_a = _state(_mesh((1, 8, 1)))
    with ckpt.CheckpointManager(tmp_path, save_steps=1, keep=0) as manager:
        manager.save(1, state_a, EXTRAS)
    mesh_b = _mesh((2, 1, 4))
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(
            x.shape, x.dtype,
            sharding=NamedSharding(mesh_b, P("data", "tensor") if x.ndim == 2 else P())),
        state_a,
    )
    with ckpt.CheckpointManager(tmp_path, save_steps=1, keep=0) as manager:
        restored, _ = manager.restore(1, target)
    _assert_same(state_a, restored)
    w = restored["params"]["w"]
    assert w.sharding.mesh.shape == {"data": 2, "fsdp": 1, "tensor": 4}
    assert w.sharding.spec == P("data", "tensor")
    assert len(w.addressable_shards) == 8 and w.addressable_shards[0].data.shape == (4, 4)


def test_keeps_only_the_newest_steps(tmp_path):
    state = _state(_mesh((1, 8, 1)))
    with ckpt.CheckpointManager(tmp_path, save_steps=1, keep=2) as manager:
        for step in (1, 2, 3, 4):
            manager.save(step, state, {"step": step})
        manager.wait()
        assert manager.all_steps() == [3, 4]
    assert checkpoint_verify.list_steps(tmp_path / "checkpoints") == [3, 4]


def test_save_returns_before_the_checkpoint_is_written(tmp_path, monkeypatch):
    """The background writer is held on an event: an asynchronous save() returns while nothing is
    committed; a synchronous save would only return after the commit (and fail the first assert)."""
    release = threading.Event()
    real_write = checkpoint_verify.write_manifest

    def held_write(step_dir, step):
        release.wait(timeout=60)
        real_write(step_dir, step)

    monkeypatch.setattr(ckpt, "write_manifest", held_write)
    state = _state(_mesh((1, 8, 1)))
    with ckpt.CheckpointManager(tmp_path, save_steps=1, keep=0, async_save=True) as manager:
        manager.save(1, state, EXTRAS)
        assert checkpoint_verify.list_steps(tmp_path / "checkpoints") == []
        release.set()
        manager.wait()
        assert checkpoint_verify.list_steps(tmp_path / "checkpoints") == [1]
    monkeypatch.setattr(ckpt, "write_manifest", real_write)
    with ckpt.CheckpointManager(tmp_path, save_steps=1, keep=0, async_save=False) as manager:
        manager.save(2, state, EXTRAS)
        assert checkpoint_verify.list_steps(tmp_path / "checkpoints") == [1, 2]


def _three_checkpoints(tmp_path) -> dict:
    state = _state(_mesh((1, 8, 1)))
    with ckpt.CheckpointManager(tmp_path, save_steps=1, keep=0) as manager:
        for step in (1, 2, 3):
            manager.save(step, state, {"step": step})
    return state


def _largest_file(step_dir: pathlib.Path) -> pathlib.Path:
    return max((p for p in step_dir.rglob("*") if p.is_file() and p.name != checkpoint_verify.MANIFEST), key=lambda p: p.stat().st_size)


def test_damaged_latest_falls_back_to_the_previous_one(tmp_path, caplog):
    state = _three_checkpoints(tmp_path)
    steps_dir = tmp_path / "checkpoints"
    truncated = _largest_file(steps_dir / "3")
    truncated.write_bytes(truncated.read_bytes()[:-7])
    flipped = _largest_file(steps_dir / "2")
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0xFF
    flipped.write_bytes(bytes(data))
    assert "bytes, the manifest says" in checkpoint_verify.checkpoint_problem(steps_dir / "3")
    assert "CRC32" in checkpoint_verify.checkpoint_problem(steps_dir / "2")

    with caplog.at_level(logging.WARNING, logger="maxent_jax.checkpoint_verify"):
        point = checkpoint_verify.resolve_resume("latest", tmp_path)
    assert point == checkpoint_verify.ResumePoint(1, steps_dir / "1")
    assert "falling back to the previous one" in caplog.text
    assert checkpoint_verify.list_steps(steps_dir) == [1]
    assert sorted(p.name for p in (tmp_path / checkpoint_verify.REJECTED_DIR).iterdir()) == ["2", "3"]
    with ckpt.CheckpointManager(tmp_path, save_steps=1, keep=0) as manager:
        restored, extras = manager.restore(point.step, state)
        manager.save(2, state, {"step": 2})  # the replayed run saves step 2 again without colliding
    assert extras == {"step": 1}
    _assert_same(state, restored)
    assert checkpoint_verify.list_steps(steps_dir) == [1, 2]


def test_no_usable_checkpoint_is_an_error(tmp_path):
    _three_checkpoints(tmp_path)
    for step in (1, 2, 3):
        (tmp_path / "checkpoints" / str(step) / "_CHECKPOINT_METADATA").unlink()
    with pytest.raises(UserError, match=r"checkpoint.resume='latest': no usable checkpoint .*step 3: missing"):
        checkpoint_verify.resolve_resume("latest", tmp_path)


def test_resume_policy(tmp_path):
    assert checkpoint_verify.resolve_resume("latest", tmp_path) is None
    assert checkpoint_verify.resolve_resume("none", tmp_path) is None
    _three_checkpoints(tmp_path)
    assert checkpoint_verify.resolve_resume("latest", tmp_path).step == 3
    with pytest.raises(UserError, match=r"checkpoint.resume='none' but .* already holds checkpoints \[1, 2, 3\]"):
        checkpoint_verify.resolve_resume("none", tmp_path)
    other = tmp_path / "other"
    assert checkpoint_verify.resolve_resume(str(tmp_path / "checkpoints" / "2"), other) == checkpoint_verify.ResumePoint(
        2, tmp_path / "checkpoints" / "2")
    assert checkpoint_verify.resolve_resume(str(tmp_path), other).step == 3  # a run directory: its newest step
    with pytest.raises(UserError, match=r"checkpoint.resume='/nonexistent/x': no such checkpoint path"):
        checkpoint_verify.resolve_resume("/nonexistent/x", other)
    (tmp_path / "checkpoints" / "2" / "extras").rename(tmp_path / "moved")
    with pytest.raises(UserError, match="the checkpoint is not usable: missing extras"):
        checkpoint_verify.resolve_resume(str(tmp_path / "checkpoints" / "2"), other)


def test_partial_restore_reads_only_the_named_subtrees(tmp_path):
    state = _three_checkpoints(tmp_path)
    with ckpt.CheckpointManager(tmp_path, save_steps=1, keep=0) as manager:
        restored, extras = manager.restore(2, {"params": state["params"]}, partial=True)
    assert set(restored) == {"params"} and extras == {"step": 2}
    _assert_same(state["params"], restored["params"])


def test_restore_into_a_different_structure_is_a_user_error(tmp_path):
    state = _three_checkpoints(tmp_path)
    wrong = dict(state, params={"w": state["params"]["w"]})
    with ckpt.CheckpointManager(tmp_path, save_steps=1, keep=0) as manager:
        with pytest.raises(UserError, match="does not match the current model/optimizer state"):
            manager.restore(3, wrong)


_CRASH_SCRIPT = """
import os, sys, jax, jax.numpy as jnp
from maxent_jax import checkpoint as ckpt
state = {"w": jnp.arange(4096.0)}
manager = ckpt.CheckpointManager(sys.argv[1], save_steps=1, keep=0)
manager.save(1, state, {"step": 1})
manager.wait()
def crash(step_dir, step):
    os._exit(9)  # the process dies after writing the data, before Orbax's commit rename
ckpt.write_manifest = crash  # the manager's own reference
manager.save(2, state, {"step": 2})
manager.wait()
"""


def test_a_crash_mid_save_leaves_no_checkpoint_that_looks_valid(tmp_path):
    proc = subprocess.run([sys.executable, "-c", _CRASH_SCRIPT, str(tmp_path)], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env={**__import__("os").environ, "XLA_FLAGS": ""})
    assert proc.returncode == 9, proc.stderr[-2000:]
    steps_dir = tmp_path / "checkpoints"
    assert any(checkpoint_verify.TMP_MARKER in p.name for p in steps_dir.iterdir())  # the unfinished save is there ...
    assert checkpoint_verify.list_steps(steps_dir) == [1]  # ... but is not a step
    assert checkpoint_verify.resolve_resume("latest", tmp_path).step == 1
    with ckpt.CheckpointManager(tmp_path, save_steps=1, keep=0) as manager:
        manager.wait()
        assert manager.all_steps() == [1]
        restored, extras = manager.restore(1, {"w": jnp.zeros(4096)})
    assert extras == {"step": 1} and float(restored["w"][-1]) == 4095.0


def test_a_failed_save_leaves_no_temporary_directory_after_close(tmp_path, monkeypatch):
    """Orbax reports the first failed write while its other writers run on; one that finishes after the
    fault's cleanup freed space recreates the step's temporary directory (seen once in CI), which
    close() removes again."""
    manager = ckpt.CheckpointManager(tmp_path, save_steps=1, keep=0)
    state = {"w": jnp.arange(16.0)}
    manager.save(1, state, {"step": 1})
    manager.wait()
    partial = tmp_path / "checkpoints" / f"2{checkpoint_verify.TMP_MARKER}"

    def disk_full(step, **_):
        (partial / "state").mkdir(parents=True)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(manager._manager, "save", disk_full)
    with pytest.raises(UserError, match="could not write checkpoint step 2 .*newest whole checkpoint is step 1"):
        manager.save(2, state, {"step": 2})
    assert not partial.exists()
    (partial / "extras").mkdir(parents=True)  # a writer that finished after the cleanup
    manager.close()
    assert not partial.exists()
    assert checkpoint_verify.list_steps(tmp_path / "checkpoints") == [1]


def test_preflight_rejects_an_unwritable_or_full_workdir(tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(UserError, match=r"--workdir=.*a_file/run is not writable"):
        disk_space.preflight(blocker / "run", checkpoint_bytes=10, keep=3)

    disk_space.preflight(tmp_path / "ok", checkpoint_bytes=10, keep=3)
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(disk_space.shutil, "disk_usage", lambda _: usage._replace(free=3 * 2**30))
    with pytest.raises(UserError, match=r"has 3.0 GiB free but the run needs about 4.2 GiB \(4 more checkpoint\(s\) of 1.0 GiB"):
        disk_space.preflight(tmp_path / "full", checkpoint_bytes=2**30, keep=3)
    disk_space.preflight(tmp_path / "fits", checkpoint_bytes=2**30, keep=1)
    monkeypatch.setattr(disk_space.shutil, "disk_usage", lambda _: usage._replace(free=5 * 2**20))
    with pytest.raises(UserError, match=r"has 5.0 MiB free but the run needs about 6.3 MiB \(2 more checkpoint\(s\) of 3.0 MiB"):
        disk_space.preflight(tmp_path / "small", checkpoint_bytes=3 * 2**20, keep=1)  # not '0.00 GiB free'


def test_state_nbytes_counts_every_leaf():
    state = {"a": jnp.zeros((4, 8), jnp.float32), "b": jax.ShapeDtypeStruct((3,), jnp.bfloat16),
             "k": jax.random.key(0), "n": 3}
    assert disk_space.state_nbytes(state) == 4 * 8 * 4 + 3 * 2 + 8


def test_extras_must_be_json(tmp_path):
    with ckpt.CheckpointManager(tmp_path, save_steps=1, keep=0) as manager:
        with pytest.raises(UserError, match="checkpoint extras must be plain JSON data"):
            manager.save(1, {"w": jnp.zeros(2)}, {"bad": object()})
    assert json.loads(json.dumps(EXTRAS)) == EXTRAS


def test_final_export_is_a_loadable_hf_directory_with_controller_state(tmp_path):
    from flax import nnx

    from maxent_jax.data.tokenizer import build_offline_tokenizer
    from maxent_jax.model.config import ModelConfig
    from maxent_jax.model.decoder import Decoder
    from maxent_jax.model.hf_io import load_hf_checkpoint

    cfg = ModelConfig.tiny(num_layers=1)
    abstract = nnx.state(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0))), nnx.Param)
    rng = np.random.default_rng(0)  # host-made values: no per-op compiles of a random init
    params = jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape).astype(a.dtype)), abstract)
    controller = {"beta": 0.04, "tau": 0.1, "tau_log": -2.302585, "tau_entropy_ema": 0.1}
    tokenizer_dir = build_offline_tokenizer(tmp_path / "tok")
    out = export_lib.export_final(params, cfg, tmp_path, tokenizer_dir=tokenizer_dir, controller_state=controller)
    assert out == tmp_path / "final_hf"
    assert json.loads((out / "controller_state.json").read_text()) == controller
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    loaded_cfg, loaded = load_hf_checkpoint(out)
    assert loaded_cfg.vocab_size == cfg.vocab_size
    want = dict(nnx.to_flat_state(params))
    got = dict(nnx.to_flat_state(nnx.state(loaded, nnx.Param)))
    assert want.keys() == got.keys()
    for path in want:
        np.testing.assert_array_equal(np.asarray(want[path].get_value()), np.asarray(got[path].get_value()))
