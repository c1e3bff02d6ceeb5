"""Smoke tests of `python -m maxent_jax.bench`: tiny shapes, one repeat, no peers.

The figures themselves are measurements (docs/benchmarks.md); these tests check the plumbing
that produces them: argument errors, statistics and report output, preset shapes, FLOP
bookkeeping, the missing-peer messages, and that each target runs end to end on a toy shape.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json

import pytest

from maxent_jax.bench import peers
from maxent_jax.bench.__main__ import parse_args
from maxent_jax.bench.presets import get_preset
from maxent_jax.bench.report import Figure, Report
from maxent_jax.errors import UserError
from maxent_jax.parallel.flops import decoder_matmul_params


def _matmul_params(cfg) -> int:
    return decoder_matmul_params(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                                 intermediate_size=cfg.intermediate_size, num_layers=cfg.num_layers,
                                 num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim)


def _toy(**changes):
    """The tiny preset shrunk further: 2 prompts x G=4 (8 rows, one per forced CPU device)."""
    return dataclasses.replace(get_preset("tiny"), **{"prompts": 2, "generations": 4, "new_tokens": 4,
                                                      "prompt_len": 8, **changes})


@pytest.mark.parametrize("argv, needle", [
    (["sampler", "--vs", "trl"], "--vs trl is not a peer of target sampler; valid: transformers, vllm"),
    (["update", "--vs", "vllm"], "valid: none"),
    (["train-step", "--repeats", "0"], "--repeats 0 is invalid"),
    (["sampler", "--size", "10"], "--size 10.0 is invalid"),
    (["sampler", "--init", "sharded"], "--init sharded is for the update target only"),
    (["train-step", "--model", "remat=true"], "--model remat=true is for the update and sampler targets only"),
    (["sampler", "--lora", "16"], "--lora 16 is invalid"),
    (["weight-sync", "--lora", "0"], "--lora 0 is invalid"),
    (["update", "--lora", "0"], "--lora 0 is invalid"),
])
def test_bad_arguments_are_one_line_user_errors(argv, needle):
    with pytest.raises(UserError, match=needle.replace("(", r"\(")):
        parse_args(argv)


def test_model_fields_change_the_preset_with_the_fields_types():
    from maxent_jax.bench.presets import with_model_fields

    changed = with_model_fields(get_preset("small"), ["remat=true", "attention=dot_product", "rms_norm_eps=1e-5"])
    assert changed.model.remat is True and changed.model.attention == "dot_product"
    assert changed.model.rms_norm_eps == 1e-5 and changed.model.hidden_size == get_preset("small").model.hidden_size
    for item, needle in (("depth=3", "FIELD a ModelConfig field"), ("num_layers=two", "num_layers is an integer"),
                         ("remat", "expected FIELD=VALUE"), ("attention=flash", "model.attention='flash' is invalid")):
        with pytest.raises(UserError, match=needle):
            with_model_fields(get_preset("small"), [item])


def test_unknown_target_or_preset_exits_2(capsys):
    for argv in (["speed"], ["sampler", "--preset", "huge"]):
        with pytest.raises(SystemExit) as exit_info:
            parse_args(argv)
        assert exit_info.value.code == 2


def test_report_statistics_table_and_json(tmp_path):
    report = Report("sampler", "tiny", 3, {"G": 8})
    report.add(Figure("ours", "tokens/s", [100.0, 300.0, 200.0], (1.0, 2.0)))
    report.add(Figure("peer", "tokens/s", [50.0, 40.0, 60.0]))
    assert report.figure("ours").median == 200.0
    assert report.figure("ours").spread == pytest.approx(1.0)  # (300 - 100) / 200
    assert report.ratio("ours / peer", "ours", "peer") == pytest.approx(4.0)
    text = report.table()
    assert "ratio ours / peer: 4.00x" in text and "1.0->2.0" in text and "setup: G=8" in text
    assert report.machine["device_count"] >= 1 and report.machine["cores"] >= 1
    report.write_json(tmp_path / "out" / "r.json")
    data = json.loads((tmp_path / "out" / "r.json").read_text())
    assert data["figures"][0]["samples"] == [100.0, 300.0, 200.0]
    assert data["ratios"] == {"ours / peer": 4.0} and data["machine"]["versions"]["jax"]


def test_presets_have_the_issue_shapes():
    small = get_preset("small")
    assert (small.rows, small.generations, small.new_tokens) == (16, 8, 64)
    assert _matmul_params(small.model) == pytest.approx(3.3e6, rel=0.02)
    assert small.model.tie_word_embeddings and small.model.head_dim == 64
    qwen = get_preset("qwen2_5_1_5b")
    assert _matmul_params(qwen.model) == pytest.approx(1.54e9, rel=0.01)
    assert qwen.model.param_dtype == "bfloat16" and qwen.model.attention == "cudnn" and not qwen.model.remat
    tiny = get_preset("tiny")
    from maxent_jax.bench.presets import default_config

    c = default_config()
    assert tiny.model.hidden_size == c.model.tiny.hidden_size
    assert (tiny.generations, tiny.new_tokens) == (c.rollout.num_generations, c.rollout.max_completion_length)
    prompts = tiny.prompt_ids()
    assert prompts == tiny.prompt_ids() and min(min(p) for p in prompts) >= 3  # deterministic, no special ids


def test_sized_model_hits_the_requested_size():
    from maxent_jax.bench.weight_sync import sized_model

    for size in (100, 400):  # whole blocks of 11.3M: within 6% from 100M up
        assert _matmul_params(sized_model(size)) == pytest.approx(size * 1e6, rel=0.06)
    assert sized_model(0.1).num_layers == 1


def test_step_flops_add_rollout_reference_and_update():
    from maxent_jax.bench.train_step import step_flops
    from maxent_jax.bench.update import model_flops

    p = get_preset("small")
    n_mm = _matmul_params(p.model)
    # Without attention terms the step is (prefill + decode + reference) forwards + one training pass.
    attention_free = 2 * n_mm * (p.prompts * 40 + p.rows * 64 + p.rows * 104) + 6 * n_mm * p.rows * 104
    assert step_flops(p, 40) > attention_free
    assert step_flops(p, 40) == pytest.approx(attention_free, rel=0.1)
    assert model_flops(p, 104, True) == pytest.approx(3 * model_flops(p, 104, False))


def test_missing_peer_packages_say_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "trl" else real(name, *a))
    with pytest.raises(UserError, match=r"--vs trl needs .*missing: trl.*make setup"):
        peers.require("trl")
    peers.require("transformers")  # torch and transformers are installed in the dev env


def test_missing_vllm_env_names_make_target(tmp_path, monkeypatch):
    monkeypatch.delenv("VLLM_PYTHON", raising=False)
    with pytest.raises(UserError, match="make vllm-env"):
        peers.vllm_python(str(tmp_path / "nope" / "python"))


def test_child_that_fails_to_start_is_a_user_error_with_its_log():
    """A peer whose interpreter cannot start it (wrong --vllm-python, missing package) gives one line
    naming the program and its exit status, then the end of its log: no traceback of ours."""
    import sys

    from maxent_jax.bench.child import ChildProcess

    child = ChildProcess([sys.executable, "-c", "import sys; print('no module named vllm', file=sys.stderr); sys.exit(3)"],
                         env={})
    assert child.proc.stdout.read() == ""
    err = child.startup_error("vLLM peer")
    assert isinstance(err, UserError)
    first, *log = str(err).splitlines()
    assert first == f"vLLM peer did not start: {sys.executable} exited with status 3; the end of its log:"
    assert log == ["  no module named vllm"]


def test_gpu_preset_is_refused_on_cpu_with_one_line():
    from maxent_jax.bench.update import run_update

    with pytest.raises(UserError, match="qwen2_5_1_5b needs GPUs"):
        run_update(get_preset("qwen2_5_1_5b"), repeats=1)


def test_probe_is_fp32_on_cpu_and_bf16_on_a_gpu(monkeypatch):
    """The probe measures what the models run on: float32 on the CPU, the matrix units' bf16 on a GPU."""
    import types

    import jax

    from maxent_jax.bench import probe

    assert probe.probe_label() == "fp32 matmul" and probe._probe_shape() == ("float32", 1024)
    monkeypatch.setattr(jax, "devices", lambda: [types.SimpleNamespace(platform="gpu")])
    assert probe.probe_label() == "bf16 matmul" and probe._probe_shape() == ("bfloat16", 8192)


def test_sampler_target_runs_ours():
    from maxent_jax.bench.sampler import OURS, run_sampler

    report = run_sampler(_toy(), repeats=1, vs=None)
    assert report.figure(OURS).median > 0 and report.ratios == {}


def test_update_target_reports_tokens_and_fraction_of_matmul_rate():
    from maxent_jax.bench.update import TOKENS, run_update

    report = run_update(_toy(), repeats=1, init="sharded")
    assert report.figure(TOKENS).median > 0
    assert report.setup["init"].startswith("sharded: ") and "first step" in report.setup
    assert 0 < report.ratios["fraction of measured fp32 matmul rate"] < 10
    assert "MFU" not in report.ratios  # a CPU has no spec-sheet peak


@pytest.mark.slow
def test_weight_sync_target_pushes_to_a_real_server():
    from maxent_jax.bench.weight_sync import run_weight_sync

    report = run_weight_sync(_toy(), repeats=1, size_m=None, vs=None, lora_rank=2)
    # The client's own choice is the native layout (the jax server offers it); HF is measured beside it.
    for layout in ("native", "hf"):
        name = f"jax server [{layout}]"
        assert report.figure(f"{name}: push").median > 0
        phases = [f for f in report.figures if f.name.startswith(f"{name}: phase ")]
        assert len(phases) == 4 and sum(f.median for f in phases) <= report.figure(f"{name}: push time").median
    assert report.figure("jax server [hf]: push from host tensors").median > 0
    assert report.ratios["jax server: native / hf layout push"] > 0
    assert report.setup["bytes_per_push"] > 0
    # --lora: adapter-only pushes beside the full ones, a fraction of their bytes
    assert 0 < report.figure("jax server [lora]: push bytes").median < report.setup["bytes_per_push"] / 4
    assert report.ratios["jax server: full (native) / adapter push time"] > 0


@pytest.mark.slow
def test_train_step_target_runs_the_trainer_and_trl():
    """Ours and TRL's GRPOTrainer on the same exported weights and prompts, with full-length completions
    on both sides (same token count per step) and the same activation recompute setting."""
    from maxent_jax.bench.train_step import OURS, TRL, TRL_S, run_train_step

    overrides = {"train.per_device_train_batch_size": 8, "rollout.num_generations": 2,
                 "rollout.max_completion_length": 4}  # prompts split over the 8 forced devices
    report = run_train_step(_toy(prompts=8, generations=2, config_overrides=overrides), repeats=1, vs="trl")
    assert report.figure(OURS).median > 0
    assert report.figure(TRL).median * report.figure(TRL_S).median == pytest.approx(8 * 2 * 4)
    assert report.setup["remat"] is report.setup["trl_gradient_checkpointing"] is False
    assert report.ratios["ours / trl (tokens/s)"] > 0
    assert 0 < report.ratios["ours: fraction of measured fp32 matmul rate"] < 10
    phases = [f for f in report.figures if f.name.startswith("ours phase: ")]
    assert len(phases) == 5 and sum(f.median for f in phases) <= report.figure("ours: RL step time").median * 1.05
