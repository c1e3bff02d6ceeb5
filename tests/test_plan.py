"""The planner (`python -m maxent_jax.plan`): its bytes are the trainer's bytes, its FLOPs the
analytic count, its attention stand-in cuDNN's numbers, and bad input is one line, exit 2."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from maxent_jax import optimizer as optimizer_lib
from maxent_jax.config import set_fields
from maxent_jax.errors import UserError
from maxent_jax.model.attention import prefix_causal_attention
from maxent_jax.model.decoder import Decoder
from maxent_jax.model.lora import LoRAParam, LoRASettings, apply_lora
from maxent_jax.parallel.mesh import make_mesh
from maxent_jax.parallel.rules import resolve_rules, tree_shardings
from maxent_jax.parallel.train_step import init_train_state
from maxent_jax.plan import core, flash, programs
from maxent_jax.plan.architecture import model_config

REPO = pathlib.Path(__file__).resolve().parents[1]


def small_config(**changes):
    """configs/tiny.py at a few hundred tokens per device: 8 prompts x 4 completions, 2 micro-batches."""
    sys.path.insert(0, str(REPO))
    from configs import tiny

    c = tiny.get_config()
    c.model.tiny.hidden_size, c.model.tiny.intermediate_size = 64, 128
    c.rollout.num_generations, c.rollout.max_prompt_length, c.rollout.max_completion_length = 4, 16, 16
    c.train.per_device_train_batch_size, c.train.gradient_accumulation_steps, c.train.gradient_chunks = 1, 2, 1
    c.mesh.shape = (2, 4, 1)
    set_fields(c, changes)
    return c


def device_bytes(tree) -> int:
    """The most bytes any one device holds of a tree of real (sharded) arrays."""
    per_device: dict = {}
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
    return max(per_device.values())


@pytest.mark.parametrize("mesh_shape,dtype", [((2, 4, 1), "float32"), ((1, 4, 2), "bfloat16")])
def test_planned_state_bytes_equal_the_trainers_sharded_arrays(mesh_shape, dtype):
    config = small_config(**{"mesh.shape": mesh_shape, "model.param_dtype": dtype, "model.tiny.num_heads": 4,
                             "model.tiny.num_kv_heads": 2})
    cfg = model_config(config)
    mesh = make_mesh(mesh_shape)
    rules = resolve_rules(())
    setup = programs.build_setup(config, cfg, mesh, rules)
    # What the trainer builds: the policy eagerly, then init_train_state places it and the optimizer.
    _, params, _ = nnx.split(Decoder(cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)
    optimizer, _ = optimizer_lib.make_optimizer(config.optim, config.train.max_steps)
    real = init_train_state(params, optimizer, mesh, rules)
    assert programs.per_device_bytes(setup.state.params) == device_bytes(real.params)
    assert programs.per_device_bytes(setup.state.opt_state) == device_bytes(real.opt_state)
    assert device_bytes(real.params) < sum(x.nbytes for x in jax.tree.leaves(real.params))  # really sharded


@pytest.fixture(scope="module")
def small_plan():
    """One plan of every phase, compiled once for the tests that read it."""
    config = small_config(**{"model.attention": "dot_product", "model.score_prompt_once": False})
    return config, core.plan(config, devices=8, device_memory=core.parse_bytes("80GB"), config_name="small")


@pytest.mark.slow
def test_plan_flops_match_the_analytic_count(small_plan):
    _, result = small_plan
    update = next(p for p in result.phases if p.name == "update")
    assert update.flops == pytest.approx(update.model_flops, rel=0.05)


@pytest.mark.slow
def test_plan_accounts_every_phase_and_writes_json(small_plan):
    _, result = small_plan
    out = result.to_json()
    assert out["fits"] is True and set(out["phases"]) == {"update", "score", "sample"}
    for name, phase in out["phases"].items():
        parts = sum(v for k, v in phase.items() if k.endswith("_bytes") and k != "peak_bytes")
        assert phase["peak_bytes"] == parts > 0, name
    assert out["phases"]["sample"]["kv_cache_bytes"] > 0
    assert out["peak_bytes"] == max(p["peak_bytes"] for p in out["phases"].values())
    text = core.table(result)
    assert "verdict: fits" in text and "update" in text


@pytest.mark.slow
def test_a_plan_that_does_not_fit_proposes_the_cheapest_fix(small_plan):
    config, result = small_plan
    update = next(p for p in result.phases if p.name == "update")
    # More FSDP (the cheapest candidate: mesh 2,4,1 -> 1,8,1) halves the state's shards, not the
    # activations (it saves ~0.74 of `state` here); a budget below what that saves needs a later
    # candidate (tensor parallelism 2 saves ~1.0 of it). 0.85 sits between the two.
    state = sum(update.items[k] for k in ("params", "optimizer", "reference", "gradients"))
    tight = core.plan(config, devices=8, device_memory=update.peak_bytes - int(0.85 * state), phases=("update",),
                      flops=False)
    assert not tight.fits
    tight.fix, tight.fixes_searched = core.find_fix(config, tight, devices=8), True
    assert tight.fix is not None and tight.fix.plan.fits
    assert tight.fix.overrides != {"mesh.shape": (1, 8, 1)}
    assert f"cheapest fix that fits: {tight.fix.what}" in core.table(tight) and tight.fix.flags() in core.table(tight)


def test_a_lora_plan_trains_the_adapters_and_holds_the_base_frozen():
    """A LoRA run was planned as full fine-tuning (the base's optimizer state, gradients and reference
    copy), so the trainer's check could refuse a LoRA run that fits; planned now as the trainer splits it."""
    config = small_config(**{"lora.enabled": True, "lora.rank": 4, "lora.base_dtype": "bfloat16"})
    cfg, mesh, rules = model_config(config), make_mesh((2, 4, 1)), resolve_rules(())
    setup = programs.build_setup(config, cfg, mesh, rules)
    model = apply_lora(Decoder(cfg, rngs=nnx.Rngs(0)), LoRASettings.from_config(config.lora), 0,
                       adapter_dtype=cfg.param_dtype)
    _, adapters, base = nnx.split(model, LoRAParam, ...)
    optimizer, _ = optimizer_lib.make_optimizer(config.optim, config.train.max_steps)
    real = init_train_state(adapters, optimizer, mesh, rules)
    placed_base = jax.device_put(base, tree_shardings(base, mesh, rules))
    assert programs.per_device_bytes(setup.state.params) == device_bytes(real.params)
    assert programs.per_device_bytes(setup.state.opt_state) == device_bytes(real.opt_state)
    score = core.plan(config, devices=8, device_memory=core.parse_bytes("80GB"), phases=("score",), flops=False).phases[0]
    assert score.items["base"] == device_bytes(placed_base) > score.items["params"]
    assert score.items["params"] == score.items["reference"] == device_bytes(real.params)


def test_a_fixed_pack_length_is_named_as_outside_the_plan():
    memory = core.parse_bytes("80GB")
    fixed = core.plan(small_config(**{"train.packing": True, "train.pack_length": 128}), devices=8,
                      device_memory=memory, phases=("score",), flops=False)
    assert "train.pack_length=128 is fixed" in core.table(fixed)
    automatic = core.plan(small_config(**{"train.packing": True}), devices=8, device_memory=memory, phases=("score",),
                          flops=False)
    assert "packed update" not in automatic.skipped


def test_candidate_fixes_come_cheapest_first():
    config = small_config(**{"train.per_device_train_batch_size": 4})
    assert [overrides for _, overrides in core.candidate_fixes(config, 8)] == [
        {"mesh.shape": (1, 8, 1)}, {"model.remat": True}, {"train.gradient_chunks": 2}, {"train.gradient_chunks": 4},
        {"train.per_device_train_batch_size": 2, "train.gradient_accumulation_steps": 4},
        {"train.per_device_train_batch_size": 1, "train.gradient_accumulation_steps": 8},
        {"mesh.shape": (2, 2, 2)}, {"mesh.shape": (2, 1, 4)}]
    # One prompt per device still splits: its group of 4 completions in 2 or 4 pieces (the 7B recipes' fix).
    for packing in (False, True):  # packed too: the pieces then hold a copy of the prompt
        one = [o for _, o in core.candidate_fixes(small_config(**{"train.packing": packing}), 8)
               if "train.gradient_chunks" in o]
        assert one == [{"train.gradient_chunks": 2}, {"train.gradient_chunks": 4}], packing


def test_a_mesh_that_does_not_divide_the_model_is_refused_before_compiling():
    config = small_config(**{"model.name_or_path": "Qwen/Qwen2.5-1.5B-Instruct", "mesh.shape": (1, 7, 1)})
    with pytest.raises(UserError, match=r"embed \(hidden_size\)=1536 is not divisible by 7.*e\.g\. 7,1,1"):
        core.plan(config, devices=7, device_memory=80 * 10**9)


@pytest.mark.parametrize("model", ["Qwen/Qwen2.5-0.5B-Instruct", "Qwen/Qwen2.5-1.5B-Instruct", "Qwen/Qwen2.5-7B",
                                   "meta-llama/Llama-3.1-8B-Instruct"])
def test_every_recipe_model_has_a_shipped_architecture(model):
    cfg = model_config(small_config(**{"model.name_or_path": model}))
    params = cfg.num_layers * (cfg.hidden_size * cfg.head_dim * (cfg.num_heads * 2 + cfg.num_kv_heads * 2)
                               + 3 * cfg.hidden_size * cfg.intermediate_size)
    params += cfg.vocab_size * cfg.hidden_size * (1 if cfg.tie_word_embeddings else 2)
    published = {"Qwen/Qwen2.5-0.5B-Instruct": 0.49e9, "Qwen/Qwen2.5-1.5B-Instruct": 1.54e9,
                 "Qwen/Qwen2.5-7B": 7.6e9, "meta-llama/Llama-3.1-8B-Instruct": 8.0e9}[model]
    assert params == pytest.approx(published, rel=0.02)


def test_the_attention_stand_in_equals_the_fused_attention(monkeypatch):
    monkeypatch.setattr(flash, "TILE", 8)  # several tiles of queries and keys, a padded last tile
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (3, 20, 4, 16))
    k, v = (jax.random.normal(key, (3, 20, 2, 16)) for key in keys[1:3])
    lengths, probe = jnp.array([20, 7, 0]), jax.random.normal(keys[3], q.shape)

    def loss(fn):
        return lambda *a: jnp.sum(fn(*a, lengths, 0.25, "cudnn") * probe)

    np.testing.assert_allclose(flash.tiled_prefix_causal_attention(q, k, v, lengths, 0.25, "cudnn"),
                               prefix_causal_attention(q, k, v, lengths, 0.25, "dot_product"), atol=1e-5)
    for got, want in zip(jax.grad(loss(flash.tiled_prefix_causal_attention), (0, 1, 2))(q, k, v),
                         jax.grad(loss(lambda *a: prefix_causal_attention(*a[:5], "dot_product")), (0, 1, 2))(q, k, v)):
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_device_memory_sizes():
    assert core.parse_bytes("80GB") == 80 * 10**9
    assert core.parse_bytes("80GiB") == 80 * 2**30
    assert core.parse_bytes("512mb") == 512 * 10**6
    with pytest.raises(UserError, match="--device-memory='lots'"):
        core.parse_bytes("lots")


def _plan_cli(*args: str, tmp_path: pathlib.Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "maxent_jax.plan", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**__import__("os").environ, "PYTHONPATH": str(REPO)})


@pytest.mark.parametrize("args,message", [
    (["--config=configs/nope.py"], "could not load --config=configs/nope.py"),
    (["--config=configs/qwen2_5_1_5b/grpo_math.py", "--devices", "8", "--mesh", "1,3,1"],
     "mesh.shape"),
    (["--config=configs/qwen2_5_1_5b/grpo_math.py", "--device-memory", "eighty"], "--device-memory='eighty'"),
    (["--config=configs/qwen2_5_1_5b/grpo_math.py", "--config.model.name_or_path=@DIR@"], "model_type='gpt2'"),
])
def test_bad_input_is_one_line_and_exit_2(args, message, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 8}))
    out = _plan_cli(*[a.replace("@DIR@", str(tmp_path)) for a in args], tmp_path=tmp_path)
    assert out.returncode == 2, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], out.stderr


def test_the_trainers_check_refuses_a_plan_over_the_device_memory_in_one_line():
    from maxent_jax.plan import guard

    plan = {"mesh": [1, 8, 1], "phases": {"score": {"peak_bytes": 30 * 10**9}, "update": {"peak_bytes": 93 * 10**9}}}
    assert guard.verdict(plan, 100 * 10**9) is None
    line = guard.verdict(plan, 80 * 10**9)
    assert line.startswith("the run does not fit: its 'update' phase needs 93.0 GB per device (planned on mesh "
                           "(1, 8, 1)) and the device has 80.0 GB") and "\n" not in line


def test_the_trainers_check_is_a_no_op_on_cpu_and_keys_only_what_shapes_the_programs(tmp_path, monkeypatch):
    from maxent_jax.plan import guard

    monkeypatch.setenv("MAXENT_CACHE_DIR", str(tmp_path))
    config = small_config()
    guard.check_fits(config, (2, 4, 1))  # CPU: returns at once, plans nothing
    assert not (tmp_path / "plans").exists()
    key = guard.plan_key(config, (2, 4, 1))
    assert guard.plan_key(core.apply_overrides(config, {"vllm.url": "http://elsewhere:1/generate"}), (2, 4, 1)) == key
    assert guard.plan_key(core.apply_overrides(config, {"train.gradient_accumulation_steps": 4}), (2, 4, 1)) != key
    assert guard.plan_key(config, (1, 8, 1)) != key


def test_the_trainers_config_reaches_the_planner_unchanged(tmp_path):
    from maxent_jax import cli, train
    from maxent_jax.config import to_json_dict
    from maxent_jax.plan import guard

    config = small_config(**{"rollout.stop_sequences": ("</answer>",), "mesh.shape": (1, 8, 1)})
    path = tmp_path / "run_config.py"
    path.write_text(guard._config_module(config))
    fv, _ = cli.parse(train.define_flags, ["plan", f"--config={path}"])
    assert to_json_dict(train.resolve_config(fv)) == to_json_dict(config)


@pytest.mark.slow
def test_extrapolating_from_two_and_three_layers_gives_the_deeper_plan(tmp_path):
    """The 6-layer tiny model planned whole and from 2 and 3 layers (each in its own process, with the
    planner's memory-minimising XLA flags): every phase's peak within 2%, parameters exactly."""
    args = ["--config=configs/tiny.py", "--config.model.tiny.num_layers=6", "--devices=8", "--nofixes"]
    whole, ext = tmp_path / "whole.json", tmp_path / "ext.json"
    for extra, out in (([], whole), (["--extrapolate"], ext)):
        proc = _plan_cli(*args, *extra, "--json", str(out), tmp_path=tmp_path)
        assert proc.returncode == 0, proc.stderr[-2000:]
    a, b = json.loads(whole.read_text()), json.loads(ext.read_text())
    assert b["extrapolated_from_layers"] == [2, 3] and a["extrapolated_from_layers"] is None
    for name in a["phases"]:
        assert b["phases"][name]["params_bytes"] == a["phases"][name]["params_bytes"]
        assert b["phases"][name]["peak_bytes"] == pytest.approx(a["phases"][name]["peak_bytes"], rel=0.02), name
    assert b["phases"]["update"]["flops"] == pytest.approx(a["phases"]["update"]["flops"], rel=0.02)


def test_the_trainer_scores_reference_logprobs_in_the_updates_micro_batches(tmp_path, monkeypatch):
    """The planner found the 1.5B recipes' reference pass scoring all 8,192 rows of a step at once
    (~650 GB per device); the trainer now scores them in the update's micro-batches."""
    from maxent_jax.trainer import Trainer

    monkeypatch.setenv("MAXENT_CACHE_DIR", str(tmp_path / "cache"))
    config = small_config(**{"data.synthetic.num_train": 32, "data.synthetic.num_eval": 4, "logging.progress": False})
    trainer = Trainer(config, tmp_path / "run")
    try:
        assert trainer.score.divisor == 8 * config.train.gradient_accumulation_steps
    finally:
        trainer.close()


def test_the_reference_pass_compiles_in_micro_batches_with_remat():
    """Scoring in micro-batches (`lax.map`) with per-layer remat once failed to trace (an nnx model
    merged outside the map); the planner compiles it as the trainer builds it."""
    config = small_config(**{"model.remat": True})
    setup = programs.build_setup(config, model_config(config), make_mesh((2, 4, 1)), resolve_rules(()))
    assert setup.shapes.num_micro == 2
    assert programs.compile_score(setup).temp > 0


@pytest.mark.parametrize("phase", ["update", "score"])
def test_fsdp_weights_are_gathered_inside_the_micro_batch_loop(phase):
    """The 7B plan found every layer's all-gathered weights hoisted out of the accumulation loop (XLA's
    loop-invariant code motion): the unsharded model live on every device for the whole step.
    `train_step.in_iteration` ties the parameters to each iteration, so no gather is left outside it."""
    config = small_config(**{"mesh.shape": (1, 8, 1), "model.remat": True})
    setup = programs.build_setup(config, model_config(config), make_mesh((1, 8, 1)), resolve_rules(()))
    assert setup.shapes.num_micro == 2
    if phase == "update":
        lowered = setup_update(setup)
    else:
        lowered = setup_score(setup)
    text = lowered.compile().as_text()
    entry = text[text.index("\nENTRY "):]
    entry = entry[:entry.index("\n}\n")]
    assert " all-gather(" in text and " all-gather(" not in entry


def setup_update(setup):
    from maxent_jax.parallel.train_step import make_train_step

    step = make_train_step(setup.graphdef, setup.rest, setup.state, setup.optimizer, programs._loss(setup),
                           setup.mesh, setup.rules)
    return step.lower(setup.state, programs.step_batch(setup), {"beta": 0.0})


def setup_score(setup):
    from maxent_jax.parallel.forward import make_logprob_fn

    s = setup.shapes
    fn = make_logprob_fn(setup.graphdef, setup.rest, setup.state.params, setup.mesh, setup.rules, chunk_size=0,
                         micro_batches=s.num_micro)
    sh = jax.sharding.NamedSharding(setup.mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
    rows = {k: jax.ShapeDtypeStruct((s.rows, s.seq if k != "completion_ids" else s.completion_len),
                                    jnp.bool_ if k == "attention_mask" else jnp.int32, sharding=sh)
            for k in ("input_ids", "positions", "attention_mask", "completion_ids")}
    return fn.jitted.lower(setup.state.params, setup.rest, rows)
