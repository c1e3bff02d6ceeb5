"""The sharded train step and forward on 8 CPU devices, against a single-device run.

Each compile of the tiny decoder's step costs seconds on 2 shared cores, so one step per mesh
checks several things at once: the sharded step with 4 micro-batches must reproduce the
single-device step on the same 32 rows as ONE big batch (sharding and accumulation together),
and its outputs must carry the shardings the rules give.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from maxent_jax.checkpoint import CheckpointManager
from maxent_jax.errors import UserError
from maxent_jax.model import Decoder, ModelConfig
from maxent_jax.parallel.forward import make_logprob_fn
from maxent_jax.parallel.mesh import make_mesh
from maxent_jax.parallel.next_token_loss import next_token_loss
from maxent_jax.parallel.rules import logical_to_spec
from maxent_jax.parallel.train_step import (
    TrainState,
    init_train_state,
    make_train_step,
    sharded_abstract_state,
)
from maxent_jax.scoring import build_score_batch

CFG = ModelConfig.tiny(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=8,
                       num_kv_heads=2, head_dim=4, tie_word_embeddings=False)
ROWS, PROMPT, COMPLETION = 32, 4, 4
LOSS = functools.partial(next_token_loss, chunk_size=4)


def scaled_loss(model, batch):
    """next-token loss times a per-step scalar (how controller values such as beta reach a loss)."""
    loss, metrics = LOSS(model, batch)
    return loss * batch["loss_scale"], metrics


def record_gradients() -> optax.GradientTransformation:
    """State = the last gradient (read back exactly by the tests); update = 0 * gradient, which
    leaves params unchanged unless the gradient is not finite (then they would turn NaN)."""
    return optax.GradientTransformation(
        lambda params: jax.tree.map(jnp.zeros_like, params),
        lambda grads, state, params=None: (jax.tree.map(lambda g: 0.0 * g, grads), grads),
    )


@pytest.fixture(scope="module")
def model_parts():
    graphdef, params, rest = nnx.split(Decoder(CFG, rngs=nnx.Rngs(0)), nnx.Param, ...)
    return graphdef, jax.tree.map(np.asarray, params), rest  # host copy: donation never eats it


@pytest.fixture(scope="module")
def rows():
    """32 score-batch rows: prompts of 1..4 tokens (left-padded), full 4-token completions."""
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, CFG.vocab_size, rng.integers(1, PROMPT + 1)) for _ in range(ROWS)]
    completions = [rng.integers(3, CFG.vocab_size, COMPLETION) for _ in range(ROWS)]
    batch = build_score_batch(prompts, completions, prompt_len=PROMPT, completion_len=COMPLETION, pad_id=0)
    batch["completion_mask"] = batch["completion_mask"].astype(np.float32)  # float, so a NaN can be planted
    return batch


@pytest.fixture(scope="module")
def group_rows():
    """32 rows in 8 groups of 4 completions (1..4 tokens, right-padded) sharing their group's prompt."""
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, CFG.vocab_size, rng.integers(1, PROMPT + 1)) for _ in range(ROWS // 4)]
    completions = [rng.integers(3, CFG.vocab_size, rng.integers(1, COMPLETION + 1)) for _ in range(ROWS)]
    return build_score_batch([p for p in prompts for _ in range(4)], completions, prompt_len=PROMPT,
                             completion_len=COMPLETION, pad_id=0)


def micro_batches(rows: dict, num_micro: int) -> dict:
    return {k: v.reshape(num_micro, ROWS // num_micro, *v.shape[1:]) for k, v in rows.items()}


def run_step(model_parts, mesh, optimizer, batch):
    """Place the params on `mesh`, build the step, run it once; returns (state, metrics, step)."""
    graphdef, params, rest = model_parts
    state = init_train_state(params, optimizer, mesh)
    step = make_train_step(graphdef, rest, state, optimizer, scaled_loss, mesh)
    return *step(state, batch, {"loss_scale": 1.0}), step


@pytest.fixture(scope="module")
def single_device(model_parts, rows):
    """Loss and gradients of the whole 32-row batch on one device, without accumulation."""
    mesh = make_mesh((1, 1, 1), jax.devices()[:1])
    state, metrics, _ = run_step(model_parts, mesh, record_gradients(), micro_batches(rows, 1))
    return float(metrics["loss"]), jax.tree.map(np.asarray, state.opt_state)


# Hand-written expectations (independent of the rules code) for a few parameters.
EXPECTED = {
    (8, 1, 1): {"embedding": P(), "layers/0/mlp/gate_proj/kernel": P()},
    (1, 8, 1): {"embedding": P(None, "fsdp"), "layers/0/attn/q_proj/kernel": P("fsdp")},
    (1, 1, 8): {"embedding": P("tensor"), "layers/0/attn/q_proj/kernel": P(None, "tensor"),
                "layers/0/attn/k_proj/kernel": P(), "lm_head": P(None, "tensor")},
    (2, 2, 2): {"embedding": P("tensor", "fsdp"), "layers/0/attn/k_proj/kernel": P("fsdp", "tensor"),
                "layers/0/mlp/down_proj/kernel": P("tensor", "fsdp"), "final_norm/scale": P("fsdp")},
    (1, 2, 4): {"layers/0/attn/k_proj/kernel": P("fsdp"), "layers/0/attn/q_proj/kernel": P("fsdp", "tensor"),
                "layers/0/attn/o_proj/kernel": P("tensor", None, "fsdp")},
}


def flat(tree) -> dict:
    return {"/".join(map(str, k)): v for k, v in nnx.to_flat_state(tree)}


@pytest.mark.parametrize(
    "shape",
    [
        (2, 2, 2),
        (1, 2, 4),
        pytest.param((8, 1, 1), marks=pytest.mark.slow),
        pytest.param((1, 8, 1), marks=pytest.mark.slow),
        pytest.param((1, 1, 8), marks=pytest.mark.slow),
    ],
)
def test_sharded_accumulated_step_equals_single_device_big_batch_and_skips_nan(model_parts, rows, single_device, shape):
    mesh = make_mesh(shape)
    state, metrics, step_again = run_step(model_parts, mesh, record_gradients(), micro_batches(rows, 4))
    ref_loss, ref_grads = single_device
    assert abs(float(metrics["loss"]) - ref_loss) <= 1e-5 * abs(ref_loss)
    assert not bool(metrics["skipped"]) and int(state.step) == 1
    assert float(metrics["tokens"]) == ROWS // 4 * COMPLETION  # metrics are micro-batch means
    grads, want = flat(state.opt_state), flat(ref_grads)
    assert grads.keys() == want.keys()
    for name, g in grads.items():
        g, w = np.asarray(g.get_value()), want[name].get_value()
        assert np.linalg.norm(g - w) <= 1e-5 * np.linalg.norm(w), name
    for tree in (state.params, state.opt_state):
        for name, var in flat(tree).items():
            value = var.get_value()
            ruled = logical_to_spec(var.get_metadata()["out_sharding"], value.shape, mesh, where=name)
            assert value.sharding.is_equivalent_to(NamedSharding(mesh, ruled), value.ndim), name
    for name, spec in EXPECTED[shape].items():
        value = flat(state.params)[name].get_value()
        assert value.sharding.is_equivalent_to(NamedSharding(mesh, spec), value.ndim), name

    # A NaN in the loss: the same compiled step skips the update, state stays bit-identical.
    bad = micro_batches(rows, 4)
    bad["completion_mask"] = bad["completion_mask"].copy()
    bad["completion_mask"][2, 0, 1] = np.nan
    before = jax.tree.map(np.asarray, state)
    state, metrics = step_again(state, bad, {"loss_scale": 1.0})
    assert bool(metrics["skipped"]) and not np.isfinite(float(metrics["loss"]))
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, state), before)

    # A new scalar value reaches the loss without recompiling: loss and gradients double.
    state, metrics = step_again(state, micro_batches(rows, 4), {"loss_scale": 2.0})
    assert step_again.jitted._cache_size() == 1
    assert abs(float(metrics["loss"]) - 2 * ref_loss) <= 2e-5 * abs(ref_loss)
    for name, g in flat(state.opt_state).items():
        g, w = np.asarray(g.get_value()), want[name].get_value()
        assert np.linalg.norm(g - 2 * w) <= 2e-5 * np.linalg.norm(w), name


def test_fused_attention_with_save_dots_remat_on_the_mesh_equals_the_blocked_single_device_step(
        model_parts, rows, single_device):
    """model.attention='dot_product' (rows rotated per row, lengths) with remat_policy='save_dots',
    sharded (2, 2, 2) and accumulated over 4 micro-batches: the blocked model's loss and gradients."""
    _, params, rest = model_parts
    fused = CFG.replace(attention="dot_product", remat=True, remat_policy="save_dots")
    graphdef = nnx.split(Decoder(fused, rngs=nnx.Rngs(0)), nnx.Param, ...)[0]
    state, metrics, _ = run_step((graphdef, params, rest), make_mesh((2, 2, 2)), record_gradients(),
                                 micro_batches(rows, 4))
    ref_loss, ref_grads = single_device
    assert abs(float(metrics["loss"]) - ref_loss) <= 1e-5 * abs(ref_loss)
    want = flat(ref_grads)
    for name, g in flat(state.opt_state).items():
        g, w = np.asarray(g.get_value()), want[name].get_value()
        assert np.linalg.norm(g - w) <= 1e-5 * np.linalg.norm(w), name


def test_prompt_scored_once_per_group_on_the_mesh_equals_whole_rows_on_one_device(model_parts, group_rows):
    """model.score_prompt_once: the step sharded (2, 2, 2) with 2 micro-batches of 4 groups, each group's
    prompt scored once, gives the single-device loss and gradients of scoring the rows whole (same
    micro-batches); so does the sharded, micro-batched reference forward."""
    graphdef, params, rest = model_parts
    losses = {group: functools.partial(next_token_loss, chunk_size=4, group=group) for group in (1, 4)}
    results = {}
    num_micro = 2
    for group, mesh in ((1, make_mesh((1, 1, 1), jax.devices()[:1])), (4, make_mesh((2, 2, 2)))):
        state = init_train_state(params, record_gradients(), mesh)
        step = make_train_step(graphdef, rest, state, record_gradients(), losses[group], mesh)
        batch = {k: v.reshape(num_micro, ROWS // num_micro, *v.shape[1:]) for k, v in group_rows.items()}
        state, metrics = step(state, batch)
        scores = make_logprob_fn(graphdef, rest, params, mesh, chunk_size=3, micro_batches=num_micro, group=group)
        results[group] = float(metrics["loss"]), flat(state.opt_state), np.asarray(scores(params, group_rows))
    (want_loss, want, want_logp), (loss, grads, logp) = results[1], results[4]
    assert abs(loss - want_loss) <= 1e-5 * abs(want_loss)
    for name, g in grads.items():
        g, w = np.asarray(g.get_value()), want[name].get_value()
        assert np.linalg.norm(g - w) <= 1e-5 * np.linalg.norm(w), name
    real = group_rows["completion_mask"]
    np.testing.assert_allclose(logp[real], want_logp[real], rtol=1e-5, atol=1e-5)


def test_reference_forward_refuses_rows_that_are_not_whole_groups(model_parts, group_rows):
    graphdef, params, rest = model_parts
    scores = make_logprob_fn(graphdef, rest, params, make_mesh((1, 1, 1), jax.devices()[:1]), chunk_size=3, group=3)
    with pytest.raises(UserError, match="32 rows are not whole groups; expected a multiple of 3"):
        scores(params, group_rows)


@pytest.mark.slow
def test_nonfinite_step_is_skipped_with_adamw(model_parts, rows):
    """AdamW + clipping (the project optimizer); a NaN in the loss leaves params and moments as they were."""
    from maxent_jax.config import get_base_config
    from maxent_jax.optimizer import make_optimizer

    optim = get_base_config().optim
    optim.learning_rate, optim.warmup_ratio, optim.warmup_steps, optim.max_grad_norm = 1e-2, 0.0, 0, 0.5
    optimizer, _ = make_optimizer(optim, total_steps=10)
    graphdef, params, rest = model_parts
    mesh = make_mesh((1, 2, 4))
    state = init_train_state(params, optimizer, mesh)
    step = make_train_step(graphdef, rest, state, optimizer, LOSS, mesh)
    good = micro_batches(rows, 2)
    bad = dict(good, completion_mask=good["completion_mask"].copy())
    bad["completion_mask"][1, 0, 0] = np.nan

    state, metrics = step(state, good)
    assert not bool(metrics["skipped"]) and int(state.step) == 1
    assert float(metrics["grad_norm"]) > 0.5  # reported before clipping
    before = jax.tree.map(np.asarray, state)
    state, metrics = step(state, bad)
    assert bool(metrics["skipped"]) and not np.isfinite(float(metrics["loss"]))
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, state), before)
    state, metrics = step(state, good)
    assert not bool(metrics["skipped"]) and int(state.step) == 2


def test_sharded_logprobs_match_full_logits(model_parts, rows):
    """Policy and reference params through one compiled, sharded, micro-batched forward."""
    graphdef, params, rest = model_parts
    mesh = make_mesh((2, 2, 2))
    fn = make_logprob_fn(graphdef, rest, params, mesh, chunk_size=3, micro_batches=2)
    reference = jax.tree.map(lambda x: x * 1.5, params)
    for p in (params, reference):
        logp = fn(p, rows)
        assert logp.shape == (ROWS, COMPLETION)
        assert logp.sharding.is_equivalent_to(NamedSharding(mesh, P(("data", "fsdp"))), 2)
        model = nnx.merge(graphdef, p, rest)
        hidden, _ = model(rows["input_ids"], rows["positions"], rows["attention_mask"])
        full = jax.nn.log_softmax(model.logits(hidden), axis=-1)[:, PROMPT - 1 : PROMPT - 1 + COMPLETION]
        want = np.take_along_axis(np.asarray(full), rows["completion_ids"][..., None], axis=-1)[..., 0]
        np.testing.assert_allclose(np.asarray(logp), want, rtol=1e-5, atol=1e-5)


def test_checkpoint_written_on_one_mesh_restores_onto_another(model_parts, tmp_path):
    graphdef, params, rest = model_parts
    optimizer = optax.adamw(1e-3)
    source = init_train_state(params, optimizer, make_mesh((1, 8, 1)))
    source = source._replace(opt_state=jax.tree.map(lambda x: x + 3, source.opt_state))  # non-trivial moments/count
    with CheckpointManager(tmp_path, save_steps=1, keep=1, async_save=False) as manager:
        manager.save(1, source, {"note": "fsdp"})
    target_mesh = make_mesh((2, 1, 4))
    target = sharded_abstract_state(params, optimizer, target_mesh)
    with CheckpointManager(tmp_path, save_steps=1, keep=1) as manager:
        restored, extras = manager.restore(1, target)
    assert isinstance(restored, TrainState) and extras == {"note": "fsdp"}
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), restored, source)
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(target)):
        assert got.sharding == want.sharding
    emb = restored.params["embedding"].get_value()
    assert emb.sharding.is_equivalent_to(NamedSharding(target_mesh, P("tensor", None)), 2)
    assert source.params["embedding"].get_value().sharding.spec == P(None, "fsdp")


@pytest.mark.parametrize("shape", [(1, 1, 8), pytest.param((1, 8, 1), marks=pytest.mark.slow)])
def test_train_step_memory_is_sharded(shape):
    """Compile (not run) the step of a 10 MB model. Every device receives only its shard of the
    state, updates it in place (donation), and its arguments plus temporaries stay below the
    whole train state. On a tensor-parallel mesh no weight is ever gathered: the program has no
    all-gather at all and its temporaries are smaller than the model's parameters."""
    cfg = CFG.replace(vocab_size=1536, hidden_size=256, intermediate_size=768, num_layers=2, num_heads=8,
                      num_kv_heads=8, head_dim=32)
    graphdef, params, rest = nnx.split(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0))), nnx.Param, ...)
    mesh = make_mesh(shape)
    optimizer = optax.adamw(1e-3)
    state = sharded_abstract_state(params, optimizer, mesh)
    step = make_train_step(graphdef, rest, state, optimizer, LOSS, mesh)
    rows, length = 8, 16
    batch = {k: jax.ShapeDtypeStruct((1, rows, length if k in ("input_ids", "positions", "attention_mask") else 8), dt)
             for k, dt in [("input_ids", jnp.int32), ("positions", jnp.int32), ("attention_mask", jnp.bool_),
                           ("completion_ids", jnp.int32), ("completion_mask", jnp.float32)]}
    compiled = step.lower(state, batch).compile()

    nbytes = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))  # noqa: E731
    state_bytes, param_bytes, batch_bytes = nbytes(state), nbytes(state.params), nbytes(batch)
    shard_bytes = sum(np.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(state))
    assert shard_bytes < 1.01 * state_bytes / 8  # only small biases stay replicated
    memory = compiled.memory_analysis()
    assert memory.argument_size_in_bytes <= shard_bytes + batch_bytes
    assert memory.alias_size_in_bytes >= 0.99 * shard_bytes  # the new state is written over the old
    assert memory.argument_size_in_bytes + memory.temp_size_in_bytes < state_bytes
    if shape == (1, 1, 8):
        assert "all-gather" not in compiled.as_text()
        assert memory.temp_size_in_bytes < param_bytes


@pytest.mark.slow
def test_two_processes_match_single_device(rows, single_device, tmp_path):
    """Two JAX processes (4 CPU devices each) joined from Slurm-style variables, each feeding
    its half of the rows into a (2, 2, 2) mesh, reproduce the single-device loss and gradient norm."""
    import json
    import os
    import pathlib
    import socket
    import subprocess
    import sys

    np.savez(tmp_path / "rows.npz", **rows)
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    root = pathlib.Path(__file__).parent.parent
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
               SLURM_NTASKS="2", SLURM_NODELIST="localhost", MASTER_PORT=str(port),
               PYTHONPATH=f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    worker = pathlib.Path(__file__).parent / "parallel_two_process_worker.py"
    procs = [subprocess.Popen([sys.executable, str(worker), str(tmp_path)], env=dict(env, SLURM_PROCID=str(rank)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    outputs = [p.communicate(timeout=400) for p in procs]
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    ref_loss, ref_grads = single_device
    ref_norm = np.sqrt(sum(float(np.sum(np.square(g))) for g in jax.tree.leaves(ref_grads)))
    assert [r["main"] for r in results] == [True, False] and results[0]["devices"] == 8
    for r in results:
        assert abs(r["loss"] - ref_loss) <= 1e-5 * abs(ref_loss)
        assert abs(r["grad_norm"] - ref_norm) <= 1e-5 * ref_norm
