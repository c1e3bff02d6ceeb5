"""Mesh construction, the rules table, batch checks, multi-host start and model FLOPs (no compiles)."""

from __future__ import annotations

import logging

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from maxent_jax.errors import UserError
from maxent_jax.model import Decoder, ModelConfig
from maxent_jax.parallel import distributed
from maxent_jax.parallel.distributed import expand_nodelist, global_batch, initialize_distributed
from maxent_jax.parallel.flops import decoder_flops_per_token, decoder_matmul_params, model_flops_utilization
from maxent_jax.parallel.mesh import MESH_AXES, make_mesh, resolve_mesh_shape
from maxent_jax.parallel.rules import (
    LOGICAL_AXIS_RULES,
    activation_sharding,
    batch_divisor,
    batch_spec,
    constrain_activation,
    logical_to_spec,
    resolve_rules,
    tree_shardings,
)
from maxent_jax.parallel.train_step import check_batch


# --- mesh -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape, expected",
    [((1, -1, 1), (1, 8, 1)), ((2, 2, 2), (2, 2, 2)), ((-1, 1, 4), (2, 1, 4)), ((8, 1, 1), (8, 1, 1))],
)
def test_mesh_shape_resolves_minus_one(shape, expected):
    mesh = make_mesh(shape)
    assert mesh.axis_names == MESH_AXES
    assert tuple(mesh.shape.values()) == expected
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


def test_mesh_on_a_subset_of_devices():
    mesh = make_mesh((1, 1, 1), jax.devices()[:1])
    assert mesh.devices.size == 1


@pytest.mark.parametrize(
    "shape, axes, fragment",
    [
        ((2, 2, 1), MESH_AXES, "multiplies to 4 but there are 8 devices"),
        ((-1, -1, 1), MESH_AXES, "more than one -1"),
        ((3, -1, 1), MESH_AXES, "not divisible"),
        ((8, 1), MESH_AXES, "has 2 entries"),
        ((0, 8, 1), MESH_AXES, "positive"),
        ((1, 8, 1), ("data", "fsdp", "model"), "unknown axis 'model'"),
    ],
)
def test_invalid_mesh_is_one_line_user_error(shape, axes, fragment):
    with pytest.raises(UserError, match=fragment) as err:
        resolve_mesh_shape(shape, 8, axes)
    assert "\n" not in str(err.value)


# --- rules ------------------------------------------------------------------------------


def test_rules_table_is_the_documented_parallelism():
    table = dict(LOGICAL_AXIS_RULES)
    assert table["batch"] == ("data", "fsdp")
    assert table["embed"] == ("fsdp",)
    assert {table[n] for n in ("heads", "kv_heads", "mlp", "vocab")} == {("tensor",)}


def test_rule_overrides_replace_and_add_entries():
    rules = dict(resolve_rules(["embed=none", "mlp=fsdp+tensor", "experts=data"]))
    assert rules["embed"] == () and rules["mlp"] == ("fsdp", "tensor") and rules["experts"] == ("data",)
    assert rules["vocab"] == ("tensor",)


@pytest.mark.parametrize("entry, fragment", [("mlp", "expected 'logical=mesh_axis'"), ("mlp=model", "unknown mesh axis 'model'")])
def test_bad_rule_override_is_user_error(entry, fragment):
    with pytest.raises(UserError, match=fragment):
        resolve_rules([entry])


def test_spec_follows_rules_and_replicates_indivisible_dims(caplog):
    mesh = make_mesh((1, 2, 4))
    assert logical_to_spec(("embed", "mlp"), (32, 64), mesh) == P("fsdp", "tensor")
    assert logical_to_spec(("vocab", "embed"), (64, 32), mesh) == P("tensor", "fsdp")
    with caplog.at_level(logging.WARNING, logger="maxent_jax.parallel.rules"):
        spec = logical_to_spec(("embed", "kv_heads", "head_dim"), (32, 3, 4), mesh, where="k_proj")
    assert spec == P("fsdp", None, None)
    assert "k_proj" in caplog.text and "not divisible" in caplog.text
    # size-1 mesh axes are dropped: on (8,1,1) every weight is replicated (pure data parallel)
    assert logical_to_spec(("embed", "mlp"), (32, 64), make_mesh((8, 1, 1))) == P(None, None)
    # an axis already used by an earlier dimension is not used twice
    rules = resolve_rules(["mlp=fsdp"])
    assert logical_to_spec(("embed", "mlp"), (32, 64), mesh, rules) == P("fsdp", None)


def test_unknown_logical_name_is_user_error():
    with pytest.raises(UserError, match="logical axis 'experts' has no sharding rule"):
        logical_to_spec(("experts", "embed"), (4, 32), make_mesh((1, 8, 1)), where="moe")


def test_decoder_param_and_opt_state_shardings_follow_the_table():
    """Every Decoder parameter (and its Adam moments) gets the spec its logical names ask for."""
    import optax

    cfg = ModelConfig.tiny(vocab_size=64, hidden_size=32, intermediate_size=64, num_heads=8, num_kv_heads=2,
                           head_dim=4, tie_word_embeddings=False)
    abstract = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))
    params = nnx.state(abstract, nnx.Param)
    mesh = make_mesh((2, 2, 2))
    shardings = tree_shardings(params, mesh)
    specs = {"/".join(map(str, k)): v.get_value().spec for k, v in nnx.to_flat_state(shardings)}
    assert specs["embedding"] == P("tensor", "fsdp")
    assert specs["lm_head"] == P("fsdp", "tensor")
    assert specs["layers/0/attn/q_proj/kernel"] == P("fsdp", "tensor", None)
    assert specs["layers/1/attn/k_proj/bias"] == P("tensor", None)
    assert specs["layers/0/attn/o_proj/kernel"] == P("tensor", None, "fsdp")
    assert specs["layers/0/mlp/down_proj/kernel"] == P("tensor", "fsdp")
    assert specs["final_norm/scale"] == P("fsdp")
    opt_state = jax.eval_shape(optax.adam(1e-3).init, params)
    opt_sh = tree_shardings(opt_state, mesh)
    assert opt_sh[0].mu["lm_head"].get_value().spec == P("fsdp", "tensor")
    assert opt_sh[0].count == NamedSharding(mesh, P())


def test_constrain_activation_pins_the_batch_only_inside_the_context():
    mesh = make_mesh((2, 2, 2))
    x = np.ones((8, 3, 4), np.float32)
    assert constrain_activation(x, ("batch", "seq", "act_embed")) is x  # eager / single-device code

    def double(x):
        with activation_sharding(mesh):
            return constrain_activation(x * 2, ("batch", "seq", "act_embed"))

    y = jax.jit(double)(x)
    assert y.sharding.is_equivalent_to(NamedSharding(mesh, P(("data", "fsdp"))), 3)
    assert constrain_activation(x, ("batch", "seq", "act_embed")) is x  # context left


# --- batch ------------------------------------------------------------------------------


def test_batch_spec_and_divisor_follow_the_batch_rule():
    mesh = make_mesh((2, 2, 2))
    assert batch_spec() == P(None, ("data", "fsdp"))
    assert batch_spec(micro_batched=False) == P(("data", "fsdp"))
    assert batch_divisor(mesh) == 4
    assert batch_divisor(mesh, resolve_rules(["batch=data"])) == 2


@pytest.mark.parametrize(
    "batch, fragment",
    [
        ({"ids": np.zeros((2, 6, 3))}, "6 rows .* multiple of 4"),
        ({"ids": np.zeros((8,))}, r"expected \[num_micro, micro_batch, ...\]"),
        ({"ids": np.zeros((2, 8, 3)), "mask": np.zeros((1, 8, 3))}, "differ"),
    ],
)
def test_bad_batch_is_user_error(batch, fragment):
    with pytest.raises(UserError, match=fragment):
        check_batch(batch, 4, micro_batched=True)


def test_global_batch_single_process_is_a_sharded_put():
    mesh = make_mesh((2, 2, 2))
    local = {"ids": np.arange(2 * 8 * 3).reshape(2, 8, 3)}
    out = global_batch(local, mesh)
    np.testing.assert_array_equal(np.asarray(out["ids"]), local["ids"])
    assert out["ids"].sharding.is_equivalent_to(NamedSharding(mesh, P(None, ("data", "fsdp"))), 3)


# --- multi-host start -------------------------------------------------------------------


@pytest.mark.parametrize(
    "nodelist, hosts",
    [
        ("node[01-04,07]", ["node01", "node02", "node03", "node04", "node07"]),
        ("gpu7", ["gpu7"]),
        ("a1,b[2-3],c[09-10]", ["a1", "b2", "b3", "c09", "c10"]),
        ("rack[1-2]-gpu[8,10]", ["rack1-gpu8", "rack1-gpu10", "rack2-gpu8", "rack2-gpu10"]),
        ("n[098-101]", ["n098", "n099", "n100", "n101"]),
    ],
)
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("nodelist", ["node[01-04", "node[a-b]", "node[4-2]", ""])
def test_bad_nodelist_is_user_error(nodelist):
    with pytest.raises(UserError, match="SLURM_NODELIST"):
        expand_nodelist(nodelist)


@pytest.fixture
def fake_initialize(monkeypatch):
    calls = []
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    return calls


def test_single_process_is_a_no_op(fake_initialize):
    assert initialize_distributed(env={}) is False
    assert initialize_distributed(env={"SLURM_NTASKS": "1", "SLURM_PROCID": "0"}) is False
    assert fake_initialize == []


def test_slurm_environment_starts_jax_distributed(fake_initialize):
    env = {"SLURM_NTASKS": "4", "SLURM_PROCID": "2", "SLURM_JOB_NODELIST": "gpu[12-15]", "SLURM_JOB_ID": "4097"}
    assert initialize_distributed(env=env) is True
    port = distributed._PORT_BASE + 1
    assert fake_initialize == [{"coordinator_address": f"gpu12:{port}", "num_processes": 4, "process_id": 2}]


def test_master_addr_and_explicit_flags_take_precedence(fake_initialize):
    env = {"SLURM_NTASKS": "2", "SLURM_PROCID": "1", "SLURM_NODELIST": "a[1-2]",
           "MASTER_ADDR": "10.0.0.5", "MASTER_PORT": "1234"}
    initialize_distributed(env=env)
    initialize_distributed("head:99", num_processes=3, process_id=0, env=env)
    assert fake_initialize == [
        {"coordinator_address": "10.0.0.5:1234", "num_processes": 2, "process_id": 1},
        {"coordinator_address": "head:99", "num_processes": 3, "process_id": 0},
    ]


@pytest.mark.parametrize(
    "env, fragment",
    [
        ({"SLURM_NTASKS": "2"}, "process_id=None is invalid"),
        ({"SLURM_NTASKS": "2", "SLURM_PROCID": "2", "MASTER_ADDR": "h"}, "process_id=2 is invalid"),
        ({"SLURM_NTASKS": "2", "SLURM_PROCID": "0"}, "coordinator address is missing"),
        ({"SLURM_NTASKS": "two"}, "SLURM_NTASKS='two'"),
    ],
)
def test_incomplete_multi_host_setup_is_user_error(fake_initialize, env, fragment):
    with pytest.raises(UserError, match=fragment):
        initialize_distributed(env=env)
    assert fake_initialize == []


def test_is_main_process_in_a_single_process():
    assert distributed.is_main_process()


# --- model FLOPs ------------------------------------------------------------------------


def test_flops_per_token_by_hand():
    # L=2, D=8, H=2, K=1, d=4, F=16, V=10, S=5
    dims = dict(vocab_size=10, hidden_size=8, intermediate_size=16, num_layers=2, num_heads=2, num_kv_heads=1,
                head_dim=4)
    attention = 8 * (8 + 2 * 4) + 8 * 8  # q,k,v (widths 8, 4, 4) and o
    n_mm = 2 * (attention + 3 * 8 * 16) + 8 * 10
    assert decoder_matmul_params(**dims) == n_mm == 1232
    assert decoder_flops_per_token(**dims, seq_len=5) == 6 * n_mm + 12 * 2 * 2 * 4 * 5
    assert decoder_flops_per_token(**dims, seq_len=5, training=False) == 2 * n_mm + 4 * 2 * 2 * 4 * 5


def test_flops_match_the_decoder_parameter_count():
    """N_mm equals the Decoder's real parameter count minus embedding, biases and norm scales."""
    cfg = ModelConfig.tiny(tie_word_embeddings=False, attention_bias=False)
    params = nnx.state(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0))), nnx.Param)
    total = sum(x.size for x in jax.tree.leaves(params))
    norms = (2 * cfg.num_layers + 1) * cfg.hidden_size
    n_mm = decoder_matmul_params(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                                 intermediate_size=cfg.intermediate_size, num_layers=cfg.num_layers,
                                 num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim)
    assert n_mm == total - norms - cfg.vocab_size * cfg.hidden_size


def test_mfu():
    assert model_flops_utilization(1000.0, 6e9, 1e12, 8) == pytest.approx(0.75)


def test_init_sharded_model_equals_eager_init():
    from maxent_jax.parallel.train_step import init_sharded_model

    cfg = ModelConfig.tiny(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=8,
                           num_kv_heads=2, head_dim=4)
    mesh = make_mesh((1, 2, 4))
    graphdef, params, rest = init_sharded_model(lambda rngs: Decoder(cfg, rngs=rngs), mesh, seed=3)
    eager = nnx.state(Decoder(cfg, rngs=nnx.Rngs(3)), nnx.Param)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6), params, eager)
    want = tree_shardings(params, mesh)
    for got, spec in zip(jax.tree.leaves(params), jax.tree.leaves(want)):
        assert got.sharding.is_equivalent_to(spec, got.ndim)
    assert params["embedding"].get_value().sharding.spec == P("tensor", "fsdp")


def test_the_trainer_applies_mesh_rules_from_the_config(tmp_path):
    """`mesh.rules` strings reach the trainer's table (they were once re-parsed as tuples and refused)."""
    from maxent_jax.trainer import Trainer
    from tests.fault_fixtures import tiny_config

    trainer = Trainer(tiny_config(**{"mesh.rules": ("embed=none", "mlp=fsdp+tensor")}), tmp_path)
    try:
        table = dict(trainer.rules)
        assert table["embed"] == () and table["mlp"] == ("fsdp", "tensor")
    finally:
        trainer.close()
