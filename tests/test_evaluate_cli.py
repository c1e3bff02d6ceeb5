"""`python -m maxent_jax.evaluate` end to end on the tiny model: an HF directory and an Orbax checkpoint,
resume of the results file, and the one-line errors."""

from __future__ import annotations

import json
import sys

import jax
import pytest

from maxent_jax import checkpoint as ckpt
from maxent_jax import export as export_lib
from maxent_jax import evaluate as ev
from maxent_jax import run_setup
from maxent_jax.errors import UserError
from maxent_jax.config import get_base_config, to_json_dict

SMALL = ["--config.data.synthetic.num_eval=4", "--config.eval.per_device_eval_batch_size=4",
         "--config.rollout.max_completion_length=8"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A run directory holding an Orbax checkpoint (trainer layout) and a final_hf export of the tiny policy."""
    workdir = tmp_path_factory.mktemp("run")
    config = get_base_config()
    policy = run_setup.load_policy(config)
    with ckpt.CheckpointManager(workdir, save_steps=1, keep=0) as manager:
        manager.save(1, {"train": {"params": policy.params, "step": jax.numpy.int32(1)}}, {"step": 1})
    export_lib.export_final(policy.params, policy.model_cfg, workdir, tokenizer_dir=policy.tokenizer_dir,
                      controller_state=None)
    # the run's own config, as train writes it: the small eval settings live here, not on the command line
    small = config.copy_and_resolve_references()
    small.data.synthetic.num_eval, small.eval.per_device_eval_batch_size = 4, 4
    small.rollout.max_completion_length = 8
    (workdir / "config.json").write_text(json.dumps(to_json_dict(small)))
    return workdir


def _main(monkeypatch, argv):
    """ml_collections reads --config.* overrides from sys.argv, so the entry point sees argv there too."""
    monkeypatch.setattr(sys, "argv", argv)
    return ev.main(argv)


@pytest.mark.slow
def test_hf_directory_then_resume(tiny_run, tmp_path, capsys, monkeypatch):
    out = tmp_path / "results.jsonl"
    argv = ["evaluate", f"--checkpoint={tiny_run}", "--num_samples=2", "--k=1,2", f"--output={out}", *SMALL]
    summary = _main(monkeypatch, argv)
    assert summary["problems"] == 4 and summary["samples"] == 8
    assert set(summary) >= {"accuracy", "pass@1", "pass@2", "format/missing_answer_frac"}
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert lines[0]["settings"]["checkpoint"] == str((tiny_run / "final_hf").resolve())
    assert [len(r["completions"]) for r in lines[1:]] == [2, 2, 2, 2]
    text = capsys.readouterr().out
    assert "pass@2" in text and "synthetic:arithmetic (n=2" in text
    saved = json.loads(out.with_suffix(".summary.json").read_text())
    assert saved["summary"] == summary

    again = _main(monkeypatch, argv)
    assert again == summary
    assert "resuming" in capsys.readouterr().out and len(out.read_text().splitlines()) == 5
    with pytest.raises(UserError, match=r"holds results for other settings \(differs in num_samples\)"):
        _main(monkeypatch, [*argv[:2], "--num_samples=3", *argv[3:]])


@pytest.mark.slow
def test_orbax_checkpoint(tiny_run, tmp_path, monkeypatch):
    out = tmp_path / "orbax.jsonl"
    summary = _main(monkeypatch, ["evaluate", f"--checkpoint={tiny_run / 'checkpoints' / '1'}", f"--output={out}",
                                  *SMALL])
    assert summary["problems"] == 4 and summary["samples"] == 4
    settings = json.loads(out.read_text().splitlines()[0])["settings"]
    assert settings["checkpoint"] == str((tiny_run / "checkpoints" / "1").resolve())


@pytest.mark.slow
def test_orbax_step_uses_the_run_config_and_writes_under_the_run(tiny_run, monkeypatch, capsys):
    """No --config, no --output: the run's config.json (4 eval problems, 8 tokens) and WORKDIR/eval/."""
    summary = _main(monkeypatch, ["evaluate", f"--checkpoint={tiny_run / 'checkpoints' / '1'}", "--num_samples=2",
                                  "--config.rollout.temperature=0.6"])
    assert summary["problems"] == 4 and summary["samples"] == 8
    assert f"config: {tiny_run.resolve() / 'config.json'} (the run's own)" in capsys.readouterr().out
    [out] = (tiny_run / "eval").glob("step1-n2-*.jsonl")
    settings = json.loads(out.read_text().splitlines()[0])["settings"]
    assert (settings["max_tokens"], settings["temperature"]) == (8, 0.6)  # the run's, plus the override


def test_default_output_is_per_settings_under_the_run(tiny_run):
    """A new --num_samples gets its own default file instead of a settings clash; the same settings resume."""
    step = tiny_run / "checkpoints" / "1"
    run = ev.run_dir_of("orbax", step)
    assert run == tiny_run.resolve() and ev.run_dir_of("hf", tiny_run / "final_hf") == tiny_run.resolve()
    config = get_base_config()
    paths = [ev.default_output(run, "orbax", step, ev._settings(config, step, n)) for n in (1, 4, 4)]
    assert paths[0].parent == run / "eval" and paths[0].name.startswith("step1-n1-")
    assert paths[0] != paths[1] and paths[1] == paths[2]
    assert ev.run_dir_of("hf", tiny_run) is None  # a model directory outside a run


@pytest.mark.parametrize("args, message", [
    ([], "--checkpoint is required"),
    (["--checkpoint=/nonexistent/ckpt"], "--checkpoint=/nonexistent/ckpt: no such file or directory"),
    (["--checkpoint=.", "--num_samples=2", "--k=1,4"], "--k=1,4 with --num_samples=2 is invalid"),
    (["--checkpoint=.", "--k=a"], "--k=a is invalid"),
])
def test_argument_errors(args, message, monkeypatch):
    with pytest.raises(UserError, match=message):
        _main(monkeypatch, ["evaluate", *args])


def test_checkpoint_kinds(tmp_path):
    run = tmp_path / "run"
    with ckpt.CheckpointManager(run, save_steps=1, keep=0) as manager:
        manager.save(3, {"w": jax.numpy.zeros(2)}, {})
    hf = run / "final_hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    (hf / "model.safetensors").write_bytes(b"")
    assert ev.resolve_checkpoint_arg(str(run)) == ("hf", hf)
    assert ev.resolve_checkpoint_arg(str(hf)) == ("hf", hf)
    assert ev.resolve_checkpoint_arg(str(run / "checkpoints" / "3")) == ("orbax", run / "checkpoints" / "3")
    assert ev.resolve_checkpoint_arg(str(run / "checkpoints")) == ("orbax", run / "checkpoints" / "3")
    with pytest.raises(UserError, match="neither an HF model directory nor an Orbax checkpoint"):
        ev.resolve_checkpoint_arg(str(tmp_path))
