"""LoRA: config validation, adapters on the decoder (training and KV-cache paths), adapter-only
training, the reference from the base without a copy, PEFT parity with transformers, merged export,
and the frozen base's identity."""

from __future__ import annotations

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec

from maxent_jax import scoring
from maxent_jax.cli import REPO_ROOT
from maxent_jax.config import get_base_config
from maxent_jax.config_check import validate
from maxent_jax.errors import UserError
from maxent_jax.model.config import ModelConfig
from maxent_jax.model.decoder import Decoder
from maxent_jax.model.lora import (BASE, LoRAParam, LoRAProjection, LoRASettings, apply_lora, resolve_targets,
                                   write_base)
from maxent_jax.model.lora_io import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, base_identity, export_merged, restore_base,
                                      write_peft_adapter)
from maxent_jax.parallel.forward import make_logprob_fn
from maxent_jax.parallel.mesh import make_mesh
from maxent_jax.parallel.rules import tree_shardings
from maxent_jax.parallel.train_step import init_train_state, make_train_step
from maxent_jax.policy import sft_loss

CFG = ModelConfig.tiny(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16, intermediate_size=64)


def _perturb(model: nnx.Module, seed: int = 1) -> None:
    """Non-zero B (and fresh A) everywhere, so the adapters change the outputs."""
    key = jax.random.key(seed)
    for i, (_, var) in enumerate(nnx.iter_graph(model)):
        if isinstance(var, LoRAParam):
            var.set_value(0.3 * jax.random.normal(jax.random.fold_in(key, i), var.shape, var.dtype))


def _lora_model(targets=("all-linear",), rank=4, perturb=True, cfg=CFG) -> Decoder:
    model = Decoder(cfg, rngs=nnx.Rngs(0))
    apply_lora(model, LoRASettings(rank, 8.0, resolve_targets(targets)), seed=0)
    if perturb:
        _perturb(model)
    return model


def _batch(rows=8, seed=0):
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(1, 100, size=rng.integers(3, 8)).tolist() for _ in range(rows)]
    completions = [rng.integers(1, 100, size=rng.integers(2, 6)).tolist() for _ in range(rows)]
    return scoring.build_score_batch(prompts, completions, prompt_len=8, completion_len=8, pad_id=0)


# -- config ---------------------------------------------------------------------------------


@pytest.mark.parametrize("field, value, says", [
    ("rank", 0, "lora.rank=0"),
    ("target_modules", ("q_proj", "qkv"), "'qkv'"),
    ("target_modules", (), "lora.target_modules"),
    ("dropout", 1.0, "lora.dropout"),
    ("base_dtype", "float16", "lora.base_dtype"),
])
def test_bad_lora_fields_are_one_line_errors(field, value, says):
    config = get_base_config()
    config.lora.enabled = True
    config.lora[field] = value
    with pytest.raises(UserError, match=says.replace("(", r"\(").replace(")", r"\)")) as err:
        validate(config)
    assert "\n" not in str(err.value)


def test_targets_resolve_in_model_order_and_all_linear_names_all_seven():
    assert resolve_targets(("v_proj", "q_proj")) == ("q_proj", "v_proj")
    assert resolve_targets("all-linear") == ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                             "down_proj")


def test_a_family_lacking_a_named_module_is_an_error():
    model = Decoder(CFG, rngs=nnx.Rngs(0))
    for block in model.layers:  # a decoder without a gate projection (no family here lacks one)
        block.mlp.gate_proj = None
    apply_lora(model, LoRASettings(2, 4.0, ("q_proj",)), seed=0)
    with pytest.raises(UserError, match="'gate_proj', which a qwen2 decoder lacks"):
        apply_lora(model, LoRASettings(2, 4.0, ("gate_proj",)), seed=0)


def test_cli_lora_mistake_is_one_line_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "maxent_jax.train", f"--workdir={tmp_path}",
                           "--config.lora.enabled=True", "--config.lora.rank=0"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "lora.rank" in proc.stderr


# -- model ----------------------------------------------------------------------------------


def test_initial_adapters_compute_the_base_bit_for_bit():
    base = Decoder(CFG, rngs=nnx.Rngs(0))
    lora = _lora_model(perturb=False)
    ids = jnp.asarray(_batch()["input_ids"])
    pos = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
    mask = jnp.ones(ids.shape, bool)
    np.testing.assert_array_equal(np.asarray(base(ids, pos, mask)[0]), np.asarray(lora(ids, pos, mask)[0]))


@pytest.mark.slow
def test_kv_cache_decode_takes_the_adapters():
    """Prefill + token-by-token decode with non-zero adapters (merged into the stacked k/v and gate/up
    kernels, unmerged elsewhere) equals the cache-free forward."""
    model = _lora_model()
    ids = jnp.asarray(np.random.default_rng(0).integers(1, 100, (2, 7)))
    pos = jnp.broadcast_to(jnp.arange(7), ids.shape)
    mask = jnp.ones(ids.shape, bool)
    full = model(ids, pos, mask)[0]
    cache = model.init_cache(2, 8)
    hidden, cache = model(ids[:, :4], pos[:, :4], mask[:, :4], cache)
    steps = [hidden]
    for t in range(4, 7):
        hidden, cache = model(ids[:, t:t + 1], pos[:, t:t + 1], mask[:, t:t + 1], cache)
        steps.append(hidden)
    np.testing.assert_allclose(np.asarray(jnp.concatenate(steps, 1)), np.asarray(full), atol=2e-5)
    assert not np.allclose(np.asarray(full), np.asarray(Decoder(CFG, rngs=nnx.Rngs(0))(ids, pos, mask)[0]), atol=1e-3)


def test_adapters_carry_logical_axes_and_the_rank_is_replicated():
    model = _lora_model(targets=("q_proj", "o_proj", "down_proj"))
    _, adapters, _ = nnx.split(model, LoRAParam, ...)
    attn = adapters["layers"][0]["attn"]
    assert attn["q_proj"]["lora_a"].get_metadata()["out_sharding"] == ("embed", "lora_rank")
    assert attn["q_proj"]["lora_b"].get_metadata()["out_sharding"] == ("lora_rank", "heads", "head_dim")
    assert attn["o_proj"]["lora_a"].get_metadata()["out_sharding"] == ("heads", "head_dim", "lora_rank")
    assert "k_proj" not in attn or not isinstance(model.layers[0].attn.k_proj, LoRAProjection)
    shardings = tree_shardings(adapters, make_mesh((1, 4, 2)))
    q = shardings["layers"][0]["attn"]["q_proj"]
    assert q["lora_a"].spec == PartitionSpec("fsdp", None)
    assert q["lora_b"].spec == PartitionSpec(None, "tensor", None)


def test_bfloat16_base_under_float32_adapters():
    model = Decoder(CFG, rngs=nnx.Rngs(0))
    apply_lora(model, LoRASettings(2, 4.0, ("q_proj",), base_dtype="bfloat16"), seed=0)
    _, adapters, rest = nnx.split(model, LoRAParam, ...)
    assert {x.dtype for x in jax.tree.leaves(adapters)} == {jnp.dtype("float32")}
    assert {x.dtype for x in jax.tree.leaves(rest)} == {jnp.dtype("bfloat16")}


# -- training -------------------------------------------------------------------------------


def test_train_step_differentiates_and_updates_the_adapters_only():
    model = _lora_model(perturb=False)
    graphdef, adapters, rest = nnx.split(model, LoRAParam, ...)
    base_before = jax.tree.map(np.asarray, rest)
    mesh = make_mesh((1, 8, 1))
    opt = optax.adam(1e-2)
    state = init_train_state(adapters, opt, mesh)
    step = make_train_step(graphdef, rest, state, opt, sft_loss(0), mesh)
    batch = {k: jnp.asarray(v)[None, :, None] for k, v in _batch().items()}
    nll = []
    for _ in range(3):
        state, metrics = step(state, batch)
        nll.append(float(metrics["sft/nll"]))
    assert nll[-1] < nll[0]
    moments = [x for x in jax.tree.leaves(state.opt_state) if getattr(x, "ndim", 0) > 0]
    assert sum(x.size for x in moments) == 2 * sum(x.size for x in jax.tree.leaves(adapters))
    jax.tree.map(np.testing.assert_array_equal, base_before, jax.tree.map(np.asarray, step.rest))
    assert float(jnp.abs(state.params["layers"][0]["attn"]["q_proj"]["lora_b"][...]).max()) > 0


def test_reference_from_the_base_equals_an_explicit_reference_copy():
    """The LoRA run's reference (base + adapters as RL began, megabytes) scores like a separate, explicit
    copy of the base weights (the full fine-tuning path), up to float rounding (the two programs fuse
    differently: 1-ulp differences)."""
    mesh = make_mesh((1, 8, 1))
    plain = Decoder(CFG, rngs=nnx.Rngs(0))
    p_graphdef, p_params, p_rest = nnx.split(plain, nnx.Param, ...)
    copy = jax.tree.map(jnp.copy, p_params)
    explicit = make_logprob_fn(p_graphdef, p_rest, copy, mesh, chunk_size=0)
    graphdef, adapters, rest = nnx.split(_lora_model(perturb=False), LoRAParam, ...)
    shared = make_logprob_fn(graphdef, rest, adapters, mesh, chunk_size=0)
    batch = {k: jnp.asarray(v) for k, v in _batch().items()}
    np.testing.assert_allclose(np.asarray(shared(adapters, batch)), np.asarray(explicit(copy, batch)), rtol=1e-6,
                               atol=1e-6)


def test_write_base_reaches_every_holder_of_rest():
    graphdef, adapters, rest = nnx.split(_lora_model(), LoRAParam, ...)
    _, base, _ = nnx.split(nnx.merge(graphdef, adapters, rest), BASE, ...)
    write_base(rest, jax.tree.map(lambda x: x * 0, base))
    assert all(float(jnp.abs(x).max()) == 0 for x in jax.tree.leaves(rest))


# -- base identity --------------------------------------------------------------------------


def test_a_different_base_is_a_one_line_error(tmp_path):
    _, _, rest = nnx.split(_lora_model(), LoRAParam, ...)
    saved = base_identity(rest, path="some/base", revision="main")
    restore_base(rest, saved, tmp_path, "float32")  # same base: fine
    _, _, other = nnx.split(Decoder(CFG, rngs=nnx.Rngs(1)), LoRAParam, ...)
    with pytest.raises(UserError, match="trained on base 'some/base'") as err:
        restore_base(other, saved, tmp_path, "float32")
    assert "\n" not in str(err.value)
    assert base_identity(other, path="x", revision="main")["sha256"] != saved["sha256"]


# -- PEFT and merged export -----------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_base(tmp_path_factory):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    out = tmp_path_factory.mktemp("hf_base")
    torch.manual_seed(0)
    config = transformers.Qwen2Config(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                      max_position_embeddings=64, tie_word_embeddings=True,
                                      initializer_range=0.1, attn_implementation="eager")
    transformers.Qwen2ForCausalLM(config).eval().save_pretrained(out)
    return out


def _hf_logprobs(model, ids: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        logits = model(torch.as_tensor(ids)).logits.double()
    logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, torch.as_tensor(ids)[:, 1:, None])[..., 0]
    return logp.numpy()


def _our_logprobs(model: Decoder, ids: np.ndarray) -> np.ndarray:
    pos = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
    hidden = model(jnp.asarray(ids), pos, jnp.ones(ids.shape, bool))[0]
    logp = jax.nn.log_softmax(model.logits(hidden)[:, :-1].astype(jnp.float64 if jax.config.x64_enabled else
                                                                     jnp.float32))
    return np.take_along_axis(np.asarray(logp), ids[:, 1:, None], -1)[..., 0]


@pytest.mark.slow
@pytest.mark.parametrize("targets", [("all-linear",), ("q_proj", "v_proj", "down_proj")])
def test_peft_loads_our_adapter_with_equal_logprobs(hf_base, tmp_path, targets):
    peft = pytest.importorskip("peft")
    import transformers

    from maxent_jax.model.hf_io import load_hf_checkpoint

    _, model = load_hf_checkpoint(hf_base)
    settings = LoRASettings(4, 8.0, resolve_targets(targets))
    apply_lora(model, settings, seed=0)
    _perturb(model)
    out = write_peft_adapter(model, settings, tmp_path / "adapter", base_model=str(hf_base))
    assert sorted(p.name for p in out.iterdir()) == [ADAPTER_CONFIG, ADAPTER_WEIGHTS]
    assert json.loads((out / ADAPTER_CONFIG).read_text())["target_modules"] == list(settings.targets)
    ids = np.random.default_rng(0).integers(0, 128, (3, 12))
    base = transformers.AutoModelForCausalLM.from_pretrained(hf_base, dtype="float32")
    peft_model = peft.PeftModel.from_pretrained(base, out).eval()
    ours = _our_logprobs(model, ids)
    theirs = _hf_logprobs(peft_model, ids)
    plain = _hf_logprobs(transformers.AutoModelForCausalLM.from_pretrained(hf_base, dtype="float32"), ids)
    assert np.abs(theirs - plain).max() > 1e-2  # the adapter really changes the model
    np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=1e-5)


def test_merged_export_loads_in_transformers_without_peft(hf_base, tmp_path):
    import transformers

    from maxent_jax.model.hf_io import load_hf_checkpoint

    cfg, model = load_hf_checkpoint(hf_base)
    apply_lora(model, LoRASettings(4, 8.0, resolve_targets("all-linear")), seed=0)
    _perturb(model)
    out = export_merged(model, cfg, tmp_path / "merged", tokenizer_dir=None)
    ids = np.random.default_rng(1).integers(0, 128, (2, 10))
    merged = transformers.AutoModelForCausalLM.from_pretrained(out, dtype="float32")
    np.testing.assert_allclose(_our_logprobs(model, ids), _hf_logprobs(merged, ids), atol=1e-5, rtol=1e-5)


def test_a_reference_recipe_with_use_peft_maps_onto_the_lora_section():
    from maxent_jax import recipes

    recipe = recipes.translate({"use_peft": True, "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.0,
                                "lora_target_modules": ["q_proj", "v_proj"], "lora_task_type": "CAUSAL_LM"})
    config = recipes.apply(get_base_config(), recipe)
    validate(config)
    assert (config.lora.enabled, config.lora.rank, config.lora.alpha) == (True, 8, 16.0)
    assert tuple(config.lora.target_modules) == ("q_proj", "v_proj")
    assert [key for key, _ in recipe.ignored] == ["lora_task_type"]


@pytest.mark.parametrize("size", ["0_5b", "1_5b", "7b"])
def test_each_qwen2_5_size_has_a_lora_recipe_that_differs_from_maxent_only_in_lora(size):
    import importlib

    lora = importlib.import_module(f"configs.qwen2_5_{size}.maxent_lora_math").get_config()
    full = importlib.import_module(f"configs.qwen2_5_{size}.maxent_math").get_config()
    validate(lora)
    assert lora.lora.enabled and lora.lora.base_dtype == "bfloat16" and lora.model.param_dtype == "float32"
    lora.lora, lora.model.param_dtype = full.lora, full.model.param_dtype
    assert lora.to_dict() == full.to_dict()


def test_remat_with_lora_gives_the_same_gradient_as_without():
    """`model.remat` on a LoRA run failed in the train step with flax's 'Cannot mutate Param from a
    different trace level': the frozen base comes from outside the gradient's trace, and `nnx.remat`
    merged it back into the caller's Variables. Every LoRA recipe has remat on."""
    ids = jnp.asarray(np.random.default_rng(0).integers(1, 100, (2, 12)), jnp.int32)
    positions, valid = jnp.broadcast_to(jnp.arange(12), (2, 12)), jnp.ones((2, 12), bool)
    grads = []
    for remat in (False, True):
        model = _lora_model(cfg=CFG.replace(remat=remat))
        graphdef, adapters, base = nnx.split(model, LoRAParam, ...)

        def loss(adapters, base):
            hidden, _ = nnx.merge(graphdef, adapters, base)(ids, positions, valid)
            return jnp.sum(hidden ** 2)

        grads.append(jax.jit(jax.grad(loss))(adapters, base))  # the base passed through, not differentiated
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), *grads)
