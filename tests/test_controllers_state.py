"""Controller state as a pytree: vmap over configs, JSON and Orbax round trips, resume rules."""

import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from optax.tree_utils import tree_get
import pytest

from maxent_jax.controllers import (
    FILENAME,
    ControllerInputs,
    ControllerSettings,
    from_json,
    init_controller_state,
    read_controller_state,
    resume_controller_state,
    to_json,
    update_controllers,
    write_controller_state,
)
from maxent_jax.errors import UserError

step_fn = jax.jit(update_controllers)


def _assert_same(a, b):
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    assert ta == tb
    for x, y in zip(la, lb):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(x, y)


def _stack(items):
    return jax.tree.map(lambda *xs: jnp.stack([jnp.asarray(x) for x in xs]), *items)


def _adam_settings(**kw) -> ControllerSettings:
    return ControllerSettings(**{**dict(beta_init=0.04, tau_init=0.3, meta_enabled=True, meta_optimizer="adam",
                                        meta_tau_lr=0.01, meta_beta_lr=0.002, target_weight_entropy=1.0,
                                        kl_target=0.05), **kw})


def _run(settings, steps=3, state=None):
    state = init_controller_state(settings) if state is None else state
    for step in range(int(state.step) + 1, int(state.step) + steps + 1):
        inputs = ControllerInputs(weight_entropy=jnp.float32(0.6 + 0.1 * step), kl=jnp.float32(0.02 * step))
        state, _ = step_fn(state, inputs, settings, step, jnp.float32(0.5))
    return state


@pytest.mark.parametrize("meta", [False, True])
def test_vmap_over_a_batch_of_configs_equals_each_config_alone(meta):
    if meta:
        configs = [_adam_settings(meta_tau_lr=lr, kl_target=t, tau_init=tau)
                   for lr, t, tau in [(0.01, 0.05, 0.3), (0.1, 0.2, 0.8), (0.0, 0.01, 0.05)]]
    else:
        configs = [ControllerSettings(beta_init=b, tau_init=tau, kl_target=t, kl_horizon=5, kl_ctl_step_size=0.3,
                                      target_weight_entropy=h, tau_lr=0.2, tau_max=mx)
                   for b, tau, t, h, mx in [(0.04, 0.3, 0.05, 1.0, 0.0), (0.1, 0.5, 0.0, 0.5, 0.6), (0.2, 0.1, 0.3, 2.0, 1.0)]]
    inputs = [ControllerInputs(weight_entropy=jnp.float32(h), kl=jnp.float32(k)) for h, k in [(0.7, 0.1), (0.4, 0.02), (1.1, 0.3)]]
    batched = jax.jit(jax.vmap(update_controllers, in_axes=(0, 0, 0, None, None)))
    state_b, metrics_b = batched(_stack([init_controller_state(c) for c in configs]), _stack(inputs), _stack(configs),
                                 4, jnp.float32(0.5))
    for i, (c, x) in enumerate(zip(configs, inputs)):
        state_i, metrics_i = step_fn(init_controller_state(c), x, c, 4, jnp.float32(0.5))
        _assert_same(jax.tree.map(lambda v: v[i], state_b), state_i)
        assert float(metrics_b["train/tau"][i]) == float(metrics_i["train/tau"])
    assert len({float(t) for t in state_b.tau}) == 3  # the configs really differ


def test_json_round_trip_is_exact_and_resumes_identically():
    s = _adam_settings()
    state = _run(s, steps=3)
    assert int(tree_get(state.meta_opt_state, "count")) == 3
    doc = json.loads(json.dumps(to_json(state, s)))
    restored = from_json(doc, s)
    _assert_same(restored, state)
    _assert_same(_run(s, 2, restored), _run(s, 2, state))


def test_json_layout_is_the_reference_one(tmp_path):
    s = _adam_settings()
    state = _run(s, steps=2)
    path = write_controller_state(tmp_path / "run" / FILENAME, state, s)
    assert sorted(p.name for p in path.parent.iterdir()) == [FILENAME]  # no .tmp left behind
    doc = json.loads(path.read_text())
    assert {"beta", "tau", "tau_log", "tau_entropy_ema", "meta"} <= doc.keys()
    assert doc["meta"]["version"] == 1
    assert set(doc["meta"]["controller"]) == {
        "enabled", "method", "learning_rate", "tau_learning_rate", "beta_learning_rate", "beta_grad_clip",
        "update_interval", "objective", "analytic_steps", "optimizer", "truncation_steps", "use_hessian",
        "last_tau_grad", "last_beta_grad"}
    assert doc["tau"] == float(state.tau) and doc["tau_entropy_ema"] == doc["tau"]  # EMA unset: written as tau
    _assert_same(read_controller_state(path, s), state)


def test_reference_written_file_loads_and_bad_files_fail_in_one_line(tmp_path, caplog):
    s = _adam_settings()
    ref = {"beta": 0.05, "tau": 0.25, "tau_entropy_ema": 0.9,
           "meta": {"version": 1, "controller": {"optimizer": "sgd", "last_tau_grad": 0.1, "last_beta_grad": -0.02}}}
    state = from_json(ref, s)
    assert float(state.log_tau) == pytest.approx(np.log(0.25))  # derived when missing
    assert bool(state.entropy_ema_set) and float(state.entropy_ema) == pytest.approx(0.9)
    assert float(state.last_beta_grad) == pytest.approx(-0.02)
    _assert_same(state.meta_opt_state, init_controller_state(s).meta_opt_state)
    with pytest.raises(UserError, match="'tau'"):
        from_json({"beta": 0.1}, s)
    bad = tmp_path / FILENAME
    bad.write_text("{not json")
    with pytest.raises(UserError, match="unreadable"):
        read_controller_state(bad, s)
    # Another optimizer in the file: its state is not reused, and the log says so.
    doc = to_json(_run(_adam_settings(meta_optimizer="adamw")), _adam_settings(meta_optimizer="adamw"))
    with caplog.at_level(logging.WARNING):
        state = from_json(doc, s)
    assert "restarts" in caplog.text and int(tree_get(state.meta_opt_state, "count")) == 0


def test_resume_takes_the_checkpoint_unless_overwrite_from_config():
    s = _adam_settings()
    state = _run(s, steps=3)
    _assert_same(resume_controller_state(state, s), state)
    fresh = resume_controller_state(None, s, step=0)
    _assert_same(fresh, init_controller_state(s))
    over = resume_controller_state(state, _adam_settings(tau_init=0.7, beta_init=0.2, overwrite_from_config=True))
    assert (float(over.tau), float(over.beta), bool(over.entropy_ema_set)) == (pytest.approx(0.7), pytest.approx(0.2), False)
    assert int(over.step) == 3 and int(tree_get(over.meta_opt_state, "count")) == 0


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_orbax_round_trip_is_exact(tmp_path, optimizer):
    s = _adam_settings(meta_optimizer=optimizer)
    state = _run(s, steps=3)
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(tmp_path / "standard", state)
        ckpt.wait_until_finished()
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, init_controller_state(s))
        restored = ckpt.restore(tmp_path / "standard", abstract)
    _assert_same(restored, state)
    pytree = ocp.PyTreeCheckpointer()
    pytree.save(tmp_path / "pytree", state)
    template = init_controller_state(s)
    restore_args = ocp.checkpoint_utils.construct_restore_args(template)
    _assert_same(pytree.restore(tmp_path / "pytree", item=template, restore_args=restore_args), state)


def test_bad_value_in_a_state_file_is_a_one_line_user_error(tmp_path):
    s = _adam_settings()
    doc = to_json(_run(s, steps=1), s)
    doc["maxent_jax"]["step"] = "three"
    path = tmp_path / FILENAME
    path.write_text(json.dumps(doc))
    with pytest.raises(UserError, match="invalid"):
        read_controller_state(path, s)
