"""A user's first hour (issue 20): protected workdirs, --dry_run, honest console output, one line per mistake.

Most checks run before JAX starts, so they are fast; one real run (slow) is interrupted with
Ctrl-C and rerun, covering the exit status, the resume, the metrics file and the console.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
from unittest import mock

import pytest

from maxent_jax import checkpoint_verify, cli, disk_space, train
from maxent_jax import workdir as workdir_lib
from maxent_jax.errors import UserError

REPO = pathlib.Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
       "JAX_PLATFORMS": "cpu", "WANDB_MODE": "disabled"}
# A run of a few tiny steps: no warm-up, no eval, no export; checkpoints every 3 steps.
STEPS = 8
RUN = [f"--config.train.max_steps={STEPS}", "--config.train.sft_warmup_steps=0",
       "--config.train.per_device_train_batch_size=2", "--config.train.gradient_chunks=1",
       "--config.rollout.num_generations=4", "--config.rollout.max_completion_length=8",
       "--config.eval.do_eval=False", "--config.checkpoint.save_steps=3", "--config.checkpoint.export_final=False"]


def _train(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "maxent_jax.train", *args], cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=600, **kwargs)


def _parse(*args: str):
    """cli.parse of `train ARGS` (ml_collections reads --config.* overrides from sys.argv)."""
    argv = ["train", *args]
    with mock.patch.object(sys, "argv", argv):
        return cli.parse(train.define_flags, argv)[0]


def _config(*args: str):
    return train.resolve_config(_parse(*args))


def _stored_run(workdir: pathlib.Path, *args: str, status: str = "running", step: int = 3) -> bytes:
    """A workdir as a run of `args` leaves it (config.json, run.json); returns config.json's bytes."""
    config = _config(*args)
    workdir.mkdir(parents=True, exist_ok=True)
    workdir_lib.write_config(workdir, config)
    workdir_lib.write_status(workdir, config, status=status, step=step, total_steps=STEPS)
    return (workdir / "config.json").read_bytes()


# ---------------------------------------------------------------------------------------
# Workdirs are never damaged


def test_another_config_in_a_used_workdir_is_one_line_and_writes_nothing(tmp_path):
    stored = _stored_run(tmp_path, *RUN)
    proc = _train(f"--workdir={tmp_path}", *RUN, "--config.model.tiny.hidden_size=128",
                  "--config.optim.learning_rate=0.01")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "model.tiny.hidden_size 64 -> 128; optim.learning_rate 0.0003 -> 0.01" in proc.stderr
    assert "use a new --workdir" in proc.stderr and "Traceback" not in proc.stderr
    assert (tmp_path / "config.json").read_bytes() == stored
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "run.json"]


def test_resumable_changes_need_accept_changes(tmp_path):
    _stored_run(tmp_path, *RUN)
    with pytest.raises(UserError, match=r"\(logging.progress true -> false; train.max_steps 8 -> 20\); rerun with "
                                        r"--accept_changes"):
        workdir_lib.check_reuse(tmp_path, _config(*RUN, "--config.train.max_steps=20", "--config.logging.progress=False"),
                                accept_changes=False)
    existing, changes = workdir_lib.check_reuse(tmp_path, _config(*RUN, "--config.train.max_steps=20"),
                                                accept_changes=True)
    assert existing.step == 3 and [str(c) for c in changes] == ["train.max_steps 8 -> 20"]


def test_a_finished_run_rerun_says_so_and_exits_0(tmp_path, capsys):
    stored = _stored_run(tmp_path, *RUN, status="finished", step=STEPS)
    argv = ["train", f"--workdir={tmp_path}", *RUN]
    with mock.patch.object(sys, "argv", argv):
        train.main(argv)  # returns: exit status 0
    out = capsys.readouterr().out
    assert f"holds a finished run ({STEPS} of {STEPS} steps): nothing to do" in out
    assert f"python -m maxent_jax.plot {tmp_path}" in out
    assert (tmp_path / "config.json").read_bytes() == stored


def test_the_next_evaluate_command_keeps_the_runs_own_config(tmp_path, capsys):
    """evaluate with --config=FILE replaces the run's config.json, dropping the run's overrides:
    the printed command named the --config of a non-default run."""
    variant = tmp_path / "variant.py"
    variant.write_text("from configs import tiny\n\n\ndef get_config():\n    c = tiny.get_config()\n"
                       "    c.rollout.max_completion_length = 12\n    return c\n")
    workdir = tmp_path / "run"
    args = (f"--config={variant}", *RUN, "--config.rollout.max_completion_length=10",
            "--config.checkpoint.export_final=True")
    _stored_run(workdir, *args, status="finished", step=STEPS)
    argv = ["train", f"--workdir={workdir}", *args]
    with mock.patch.object(sys, "argv", argv):
        train.main(argv)
    out = capsys.readouterr().out
    assert out.rstrip().endswith(f"next:\n  python -m maxent_jax.plot {workdir}\n"
                                 f"  python -m maxent_jax.evaluate --checkpoint={workdir / 'final_hf'}"), out


def test_a_lora_run_points_evaluate_at_its_merged_model(tmp_path):
    """A LoRA run's final_hf holds adapters: the printed evaluate command failed on it."""
    from maxent_jax import console, evaluate

    config = _config(*RUN, "--config.lora.enabled=True", "--config.checkpoint.export_final=True")
    assert console.next_steps(tmp_path, config).endswith(f"--checkpoint={tmp_path / 'final_merged_hf'}")
    adapter = tmp_path / "final_hf"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    with pytest.raises(UserError, match=r"is a LoRA adapter directory .*evaluate the run's merged model: "
                                        f"--checkpoint={tmp_path / 'final_merged_hf'}$"):
        evaluate.resolve_checkpoint_arg(str(adapter))
    workdir_lib.write_config(tmp_path, config)
    assert evaluate.run_dir_of("hf", tmp_path / "final_merged_hf") == tmp_path  # its config and results: the run's


def test_an_unknown_reward_stops_the_run_before_the_model_loads_and_writes_no_config(tmp_path):
    proc = _train(f"--workdir={tmp_path}", "--config.rewards.reward_funcs=('accuracy',)")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "config field rewards.reward_funcs entry 'accuracy' is not a registered reward (did you mean " \
           "'pure_accuracy_math'?)" in proc.stderr
    assert not (tmp_path / "config.json").exists() and "workdir:" not in proc.stdout


# ---------------------------------------------------------------------------------------
# --dry_run


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path):
    workdir = tmp_path / "run"
    proc = _train("--dry_run", f"--workdir={workdir}", *RUN, "--config.mesh.shape=(1,1,1)")
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[0] == "dry run: every check passed (nothing loaded or written)"
    plan = dict(line.strip().split(":", 1) for line in lines[1:] if not line.startswith("  note"))
    assert "the built-in tiny decoder (2 layers, hidden 64" in plan["model"]
    assert plan["mesh"].strip() == "data 1 x fsdp 1 x tensor 1 on 1 cpu device"
    assert plan["batch"].strip() == "2 prompts x 4 completions = 8 completions per optimizer step"
    assert plan["steps"].strip() == str(STEPS) and "(new run)" in plan["workdir"]
    assert plan["W&B"].strip() == "disabled" and "MiB needed" in plan["disk"]
    assert not workdir.exists()


def test_dry_run_catches_what_the_run_would_fail_on(tmp_path, monkeypatch):
    from maxent_jax.dry_run import dry_run

    def plan(*args, device_count=1):
        return dry_run(_config(*RUN, *args), tmp_path / "run", device_count=device_count, device_kind="cpu")

    with pytest.raises(UserError, match=r"rewards.eval_reward_funcs entry 'acc'"):
        plan("--config.rewards.eval_reward_funcs=('acc',)")
    with pytest.raises(UserError, match=r"dataset '.*missing.jsonl'"):
        plan(f"--config.data.dataset_name={tmp_path / 'missing.jsonl'}")
    with pytest.raises(UserError, match=r"mesh.shape=\(1, 8, 1\) .* device count \(4\), e.g. --config.mesh.shape=\(1,-1,1\)"):
        plan("--config.mesh.shape=(1,8,1)", device_count=4)
    notes = plan("--config.mesh.shape=(1,3,1)", device_count=3).notes
    assert notes == ["model dimension embed=64 is not divisible by mesh fsdp=3: it is replicated on every device"]
    server = ("--config.rollout.backend=server", "--config.vllm.url=http://127.0.0.1:9/generate")
    with pytest.raises(UserError, match=r"config field vllm.token_file='.*nope' is not a readable file"):
        plan(*server, f"--config.vllm.token_file={tmp_path / 'nope'}")
    assert plan(*server).notes[0].startswith("no rollout server answers at http://127.0.0.1:9/health yet")
    usage = disk_space.shutil.disk_usage(tmp_path)
    monkeypatch.setattr("maxent_jax.dry_run.shutil.disk_usage", lambda _: usage._replace(free=3 * 2**20))
    with pytest.raises(UserError, match=r"has 3.0 MiB free but the run needs about \d+\.\d MiB"):
        plan()


def test_dry_run_counts_an_epochs_driven_run_as_the_trainer_does(tmp_path):
    """max_steps=-1 (a TRL recipe's `max_steps: -1`) is num_train_epochs passes: the plan printed `steps: -1`."""
    from maxent_jax.dry_run import dry_run

    config = _config(*RUN, "--config.train.max_steps=-1", "--config.train.num_train_epochs=2")
    plan = dry_run(config, tmp_path / "run", device_count=1, device_kind="cpu")
    prompts_per_step = config.train.per_device_train_batch_size
    assert plan.total_steps == 2 * (config.data.synthetic.num_train // prompts_per_step) > 0 and not plan.notes


# ---------------------------------------------------------------------------------------
# One clear line for every user mistake


@pytest.mark.parametrize("args, message", [
    (["--config.train.max-steps=5"], "flag --config.train.max-steps: config field names use letters, digits and '_' "
                                     "(did you mean --config.train.max_steps?)"),
    (["--config.train.max_steps=ten"], "flag --config.train.max_steps=ten: config field train.max_steps takes an integer"),
    (["--config.rollout.top_p=high"], "config field rollout.top_p takes a number"),
    (["--config.eval.do_eval=maybe"], "config field eval.do_eval takes true or false"),
    (["--config.mesh.shape", "fsdp"], "config field mesh.shape takes a tuple"),
    (["--config.learning_rate=1"], "unknown config field (did you mean --config.lora.learning_rate or --config.optim.learning_rate?)"),
    (["--config.train=3"], "'train' is a section, not a field"),
    (["--max_steps=5"], "unknown flag --max_steps: config fields are set as --config.SECTION.FIELD, here "
                        "--config.train.max_steps=VALUE"),
    (["--steps=5"], "unknown flag --steps; the flags are --accept_changes, --config, --dry_run, --recipe, --workdir"),
])
def test_flag_mistakes_are_one_line(args, message):
    with pytest.raises(UserError) as err:
        _parse(*args)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_train_help_says_resuming_needs_the_workdir(capsys):
    """--help said "Rerunning the same command resumes the run": without --workdir it starts a new one."""
    train.main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "The same command with the same --workdir resumes the run" in out and "fresh var/runs/<time>" in out


def test_resolve_config_has_help():
    proc = subprocess.run([sys.executable, "-m", "launch.resolve_config", "--help"], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: python -m launch.resolve_config"), proc.stderr
    assert "--config.SECTION.FIELD=VALUE" in proc.stdout


def test_the_launchers_compilation_cache_dir_is_honoured(tmp_path, monkeypatch):
    """The launcher exports JAX_COMPILATION_CACHE_DIR=var/cache/jax; the trainer's own default overrode it."""
    import jax

    before = (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs)
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "jax"))
    try:
        train.enable_compilation_cache()
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "jax")
    finally:
        jax.config.update("jax_compilation_cache_dir", before[0])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", before[1])


def test_sizes_show_their_unit():
    assert [disk_space.format_bytes(n) for n in (512, 5 * 2**20, 0.01 * 2**30, 3 * 2**30)] == \
        ["512 B", "5.0 MiB", "10.2 MiB", "3.0 GiB"]


def test_make_setup_shows_progress():
    if shutil.which("make") is None:
        pytest.skip("no make")
    proc = subprocess.run(["make", "-n", "-B", "setup"], cwd=REPO, capture_output=True, text=True, timeout=60)
    steps = [line for line in proc.stdout.splitlines() if line.startswith('echo "setup [')]
    installs = [line for line in proc.stdout.splitlines() if "pip install" in line and "constraints.txt" in line]
    assert len(steps) == 3 and installs and " -q " not in installs[0], proc.stdout


def test_readme_demo_figures_come_from_the_script(tmp_path):
    from maxent_jax import demo_report

    records = [{"step": 1, "train/initial_reward": 0.0}] + [
        {"step": s, "train/reward": s / 100} for s in range(1, 101)] + [{"step": 100, "eval/mean_reward": 0.4}]
    values = demo_report.figures(records)
    assert values["RL steps 41-50"] == pytest.approx(0.455) and values[demo_report.HELD_OUT] == 0.4
    block = demo_report.render(values, wall_s=33.2, cpu_s=44.9, sha="abc1234", date="2026-12-06", machine="a box", load=0.1)
    readme = demo_report.README.read_text()
    rewritten = demo_report.rewrite(readme, block)
    assert demo_report.read_table(rewritten) == pytest.approx(values)
    assert "code `abc1234`" in rewritten and rewritten.replace(block, "") == readme.replace(demo_report._block(readme), "")
    assert set(demo_report.read_table(readme)) == set(values)  # README carries the script's block


def test_the_demo_time_is_quoted_only_from_the_measured_block():
    """docs/index.md said the demo takes 30-35 s while README's measured block said 49 s."""
    import re

    from maxent_jax import demo_report

    duration = re.compile(r"\b\d+(?:-\d+)? ?(?:s|seconds|minutes)\b(?! per| of CPU)")
    readme = demo_report.README.read_text()
    outside = readme.replace(demo_report._block(readme), "")
    for name, text in (("README.md", outside), ("docs/index.md", (REPO / "docs" / "index.md").read_text())):
        demo = [p for p in text.split("\n\n") if "demo" in p]
        assert not [m.group() for p in demo for m in duration.finditer(p)], name


# ---------------------------------------------------------------------------------------
# One real run: Ctrl-C, then the same command again


@pytest.mark.slow
def test_ctrl_c_exits_130_and_the_rerun_finishes_the_run_with_each_step_once(tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    # Rows of an earlier attempt killed before its first checkpoint: a fresh start must not keep them.
    (workdir / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "train/reward": 9.0}) + "\n"
                                                   for s in range(1, 6)))
    command = [sys.executable, "-m", "maxent_jax.train", f"--workdir={workdir}", *RUN]
    proc = subprocess.Popen(command, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = []
    for line in proc.stdout:
        first.append(line)
        if line.startswith("step 1/"):
            proc.send_signal(signal.SIGINT)
            break
    out, err = proc.communicate(timeout=600)
    out = "".join(first) + out
    assert proc.returncode == 130, err[-2000:]
    stopped = int(err.strip().splitlines()[-1].split()[3].rstrip(";"))
    assert err.strip().splitlines()[-1] == f"interrupted at step {stopped}; saved; rerun the same command to resume"
    assert 1 <= stopped < STEPS and "final:" not in out and "next:" not in out
    # The console: the changed fields only, and step 1 marked as compiling with no ETA.
    assert "fields differ from the defaults" in out and "!!python" not in out and len(out.splitlines()) < 25
    assert "\n  train: max_steps=8 sft_learning_rate=0.003\n" in out
    assert first[-1].startswith("step 1/8 (12%) | ") and "<? |" in first[-1] and first[-1].rstrip().endswith("(compiling)")

    again = subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"resumed from {workdir / 'checkpoints' / str(stopped)} at step {stopped}" in again.stdout
    steps = [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1))
    assert STEPS in checkpoint_verify.list_steps(workdir / "checkpoints")  # the last step is saved (save_steps=3)
    assert f"next:\n  python -m maxent_jax.plot {workdir}\n  python -m maxent_jax.evaluate " \
           f"--checkpoint={workdir / 'checkpoints' / str(STEPS)}" in again.stdout
    assert json.loads((workdir / "run.json").read_text())["status"] == "finished"

    done = subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "holds a finished run (8 of 8 steps): nothing to do" in done.stdout


@pytest.mark.slow
def test_ctrl_c_without_workdir_names_the_workdir_to_resume(tmp_path):
    """Without --workdir the same command starts a fresh var/runs/<time>: the line names the flag."""
    env = {**ENV, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "maxent_jax.train", *RUN], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("step 1/"):
            proc.send_signal(signal.SIGINT)
            break
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 130, err[-2000:]
    (workdir,) = (tmp_path / "var" / "runs").iterdir()
    last = err.strip().splitlines()[-1]
    assert last.startswith("interrupted at step ") and last.endswith(
        f"; saved; rerun the same command with --workdir={workdir} to resume"), last
    assert checkpoint_verify.list_steps(workdir / "checkpoints")


def test_a_storage_fault_without_workdir_names_the_workdir_to_resume(tmp_path, monkeypatch):
    """"Free space and rerun the same command" starts a fresh var/runs/<time> without --workdir:
    the line names the run's workdir, as the Ctrl-C line does."""
    from maxent_jax import trainer as trainer_lib
    from maxent_jax.errors import StorageFault

    class FullDisk:
        step, total_steps, stopped_by = 0, STEPS, None

        def __init__(self, config, workdir, config_path=None):
            pass

        def run(self):
            raise StorageFault("could not write metrics.jsonl: the disk is full; free space and rerun the same "
                               "command to resume from the newest checkpoint")

        def close(self):
            pass

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(trainer_lib, "Trainer", FullDisk)
    argv = ["train", *RUN]
    with mock.patch.object(sys, "argv", argv), pytest.raises(StorageFault) as err:
        train.main(argv)
    (workdir,) = (tmp_path / "var" / "runs").iterdir()
    assert str(err.value).endswith(f"(this run's workdir: --workdir={workdir})"), err.value
