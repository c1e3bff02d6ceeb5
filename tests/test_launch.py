"""launch/train.sbatch under a fake Slurm: node split, commands, ports, environment, teardown.

`sbatch`, `srun`, `scontrol` and `curl` are small stand-ins on PATH; the trainer and server
interpreters (MAXENT_PYTHON, VLLM_PYTHON) are a recorder that writes its argv and environment
as JSON, then behaves like a rollout server (answers /health through the fake curl, stops on
SIGTERM) or a trainer (exits with FAKE_TRAIN_RC). Everything else the launcher runs (the
config resolver) is the real Python.
"""

import json
import os
import pathlib
import re
import shutil
import signal
import stat
import subprocess
import sys
import time

import pytest

from maxent_jax.cli import REPO_ROOT

SBATCH = REPO_ROOT / "launch" / "train.sbatch"
JOB_ID = 4242
CONFIG = "configs/qwen2_5_1_5b/maxent_math.py"

FAKE_PYTHON = r'''#!{python}
"""Recorder standing in for the trainer/server interpreter."""
import json, os, signal, sys, time

argv = sys.argv[1:]
fake = os.environ["FAKE_DIR"]
if argv[:1] == ["-c"] and "snapshot_download" in argv[1]:
    os.makedirs(os.path.join(fake, "snapshot"), exist_ok=True)
    with open(os.path.join(fake, "fetch.json"), "w") as f:
        json.dump(argv[2:], f)
    print(os.path.join(fake, "snapshot"))
    sys.exit(0)
if argv[:2] == ["-m", "maxent_jax.plan"]:  # the planner is tested in tests/test_plan.py; record its call
    with open(os.path.join(fake, "plan.json"), "w") as f:
        json.dump(argv[2:], f)
    print("plan: (fake) verdict: fits")
    sys.exit(int(os.environ.get("FAKE_PLAN_RC", "0")))
if argv[:2] not in (["-m", "maxent_jax.serve"], ["-m", "maxent_jax.train"]):
    os.execv("{python}", ["{python}"] + argv)
role = argv[1].split(".")[1]
record = {{"argv": argv, "env": dict(os.environ)}}
path = os.path.join(fake, f"{{role}}.{{os.getpid()}}.json")

def save():
    with open(path + ".tmp", "w") as f:
        json.dump(record, f)
    os.replace(path + ".tmp", path)

if role == "train":
    token_file = next(a.split("=", 1)[1] for a in argv if a.startswith("--config.vllm.token_file=")) \
        if any(a.startswith("--config.vllm.token_file=") for a in argv) else None
    record["token"] = open(token_file).read().strip() if token_file else None
    save()
    if os.environ.get("FAKE_TRAIN_SLEEP"):
        def stopped(*_):
            record["terminated"] = True
            save()
            sys.exit(143)
        signal.signal(signal.SIGTERM, stopped)
        time.sleep(float(os.environ["FAKE_TRAIN_SLEEP"]))
    sys.exit(int(os.environ.get("FAKE_TRAIN_RC", "0")))

save()
if os.environ.get("FAKE_SERVER_DIES"):
    print("fake server: cannot start", file=sys.stderr)
    sys.exit(9)

def stop(*_):
    record["terminated"] = True
    save()
    sys.exit(0)

signal.signal(signal.SIGTERM, stop)
port = argv[argv.index("--port") + 1]
if not os.environ.get("FAKE_SERVER_SILENT"):
    open(os.path.join(fake, f"up-{{port}}"), "w").close()
while True:
    time.sleep(0.05)
'''

FAKE_SRUN = r'''#!/usr/bin/env bash
# Fake srun: records its flags, then runs the command once per task with Slurm's task variables.
ntasks=1 nodelist=""
args=()
while [[ "$1" == --* ]]; do
  args+=("$1")
  case "$1" in --ntasks=*) ntasks="${1#*=}" ;; --nodelist=*) nodelist="${1#*=}" ;; esac
  shift
done
printf '%s\n' "$(printf '%s\t' "${args[@]}")" >> "$FAKE_DIR/srun.log"
IFS=, read -r -a nodes <<<"$nodelist"
pids=()
for ((i = 0; i < ntasks; i++)); do
  SLURM_PROCID=$i SLURM_NTASKS=$ntasks SLURMD_NODENAME="${nodes[$i]}" "$@" &
  pids+=($!)
done
# Like a real step, srun ends only after its tasks: a signal is forwarded, then the tasks are awaited.
trap 'kill -TERM "${pids[@]}" 2>/dev/null' TERM
rc=0
for pid in "${pids[@]}"; do
  while kill -0 "$pid" 2>/dev/null; do wait "$pid" || rc=$?; done
done
exit "$rc"
'''

FAKE_SCONTROL = r'''#!/usr/bin/env bash
[[ "$1 $2" == "show hostnames" ]] || exit 1
tr ',' '\n' <<<"$3"
'''

FAKE_CURL = r'''#!/usr/bin/env bash
# Fake curl: the URL (last argument) answers once a fake server marked its port as up.
url="${@: -1}"
port="${url##*:}"; port="${port%%/*}"
echo "$url" >> "$FAKE_DIR/curl.log"
[[ -e "$FAKE_DIR/up-$port" ]]
'''

FAKE_SBATCH = r'''#!/usr/bin/env bash
# Fake sbatch: runs the script at once in a Slurm-like environment of --nodes=N nodes.
nodes=1
while [[ "$1" == --* ]]; do
  case "$1" in --nodes=*) nodes="${1#*=}" ;; esac
  shift
done
script="$1"; shift
list=""
for ((i = 0; i < nodes; i++)); do list+="${list:+,}n$i"; done
export SLURM_JOB_ID=${FAKE_JOB_ID:-4242} SLURM_JOB_NODELIST="$list" SLURM_JOB_NUM_NODES=$nodes SLURM_GPUS_ON_NODE=8
export SLURM_SUBMIT_DIR="$PWD" SLURM_NTASKS=$nodes
exec bash "$script" "$@"
'''


@pytest.fixture
def slurm(tmp_path):
    """Run `sbatch [--nodes=N] launch/train.sbatch ARGS` under the fakes; returns a runner."""
    bin_dir, fake = tmp_path / "bin", tmp_path / "fake"
    bin_dir.mkdir()
    fake.mkdir()
    scripts = {"srun": FAKE_SRUN, "scontrol": FAKE_SCONTROL, "curl": FAKE_CURL, "sbatch": FAKE_SBATCH,
               "fake-python": FAKE_PYTHON.format(python=sys.executable)}
    for name, text in scripts.items():
        path = bin_dir / name
        path.write_text(text)
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    repo = tmp_path / "repo"  # a copy, so var/ (logs, tokens, caches) stays inside tmp_path
    repo.mkdir()
    for part in ("maxent_jax", "configs", "launch"):
        shutil.copytree(REPO_ROOT / part, repo / part, ignore=shutil.ignore_patterns("__pycache__"))

    def start(*args, nodes=1, env=None):
        full_env = {k: v for k, v in os.environ.items()
                    if not k.startswith(("SLURM_", "WANDB_", "HF_TOKEN", "CUDA_VISIBLE_DEVICES"))}
        full_env.update(PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_DIR=str(fake), HOME=str(tmp_path),
                        MAXENT_PYTHON=str(bin_dir / "fake-python"), VLLM_PYTHON=str(bin_dir / "fake-python"),
                        PYTHONPATH=str(repo))
        full_env.update(env or {})
        return subprocess.Popen(["sbatch", f"--nodes={nodes}", "launch/train.sbatch", *args], cwd=repo,
                                env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def run(*args, nodes=1, env=None, timeout=60):
        proc = start(*args, nodes=nodes, env=env)
        out, err = proc.communicate(timeout=timeout)
        return Result(proc.returncode, out, err, fake, repo)

    run.start = start
    run.fake, run.repo = fake, repo

    return run


class Result:
    def __init__(self, rc, out, err, fake, repo):
        self.rc, self.out, self.err = rc, out, err
        self.fake, self.repo = fake, repo

    def records(self, role):
        return [json.loads(p.read_text()) for p in sorted(self.fake.glob(f"{role}.*.json"))]

    def srun_calls(self):
        path = self.fake / "srun.log"
        return [line.rstrip("\t").split("\t") for line in path.read_text().splitlines()] if path.exists() else []

    def plan(self, tag):
        return [line for line in self.out.splitlines() if line.startswith(f"launch: [{tag}]")]


def _flag(argv, name):
    """Value of `--name=v` or `--name v` in argv (the last one wins, as for absl)."""
    values = [a.split("=", 1)[1] for a in argv if a.startswith(f"--{name}=")]
    values += [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == f"--{name}"]
    return values[-1] if values else None


CREDENTIALS = {"HF_TOKEN": "hf_secret", "WANDB_API_KEY": "wb_secret", "WANDB_PROJECT": "proj", "WANDB_ENTITY": "team"}


def test_help_and_docs_list_every_flag():
    proc = subprocess.run(["bash", str(SBATCH), "--help"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0
    doc = (REPO_ROOT / "docs" / "launch.md").read_text()
    for flag in ("--config", "--model", "--task", "--mesh", "--dp", "--tp", "--vllm-port", "--vllm-args",
                 "--coordinator-port", "--gpus-per-node", "--health-timeout", "--args", "--dry-run", "--help"):
        assert f"  {flag}" in proc.stdout or f" {flag} " in proc.stdout, flag
        assert re.search(rf"`[^`]*{flag}\b", doc), flag


def test_shellcheck_clean():
    shellcheck = shutil.which("shellcheck") or str(pathlib.Path(sys.executable).parent / "shellcheck")
    proc = subprocess.run([shellcheck, "-x", str(SBATCH)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout


@pytest.mark.parametrize("nodes", [1, 2, 4])
def test_dry_run_plan(slurm, nodes):
    r = slurm("--config", CONFIG, "--dry-run", nodes=nodes, env=CREDENTIALS)
    assert r.rc == 0, r.err
    assert not r.records("serve") and not r.records("train") and not r.srun_calls()  # nothing started
    (vllm,), (train,), (env,) = r.plan("vllm"), r.plan("train"), r.plan("env")
    last = f"n{nodes - 1}"
    if nodes == 1:
        # 7 trainer GPUs would not divide Qwen2.5-1.5B's hidden size 1536: vLLM takes 2 (dp 2), training 6.
        assert "using --dp 2 --tp 1: vLLM on 2 GPUs, training on 6 (mesh 1,6,1)" in r.out
        assert "node=n0 gpus=0,1 dp=2 tp=1" in vllm and "--host 127.0.0.1" in vllm
        assert "processes=1 gpus/process=6 (CUDA_VISIBLE_DEVICES=2,3,4,5,6,7) mesh=1,6,1" in train
        assert "--config.vllm.url=http://127.0.0.1:29525/generate" in train and "srun" not in train
    else:
        assert f"node={last} gpus=0 " in vllm and f"srun --nodes=1 --ntasks=1 --nodelist={last}" in vllm
        assert "--host 0.0.0.0" in vllm and f"--config.vllm.url=http://{last}:29525/generate" in train
        trainers = ",".join(f"n{i}" for i in range(nodes - 1))
        assert f"nodes={trainers} processes={nodes - 1} gpus/process=8 mesh={nodes - 1},8,1" in train
        assert ("srun --nodes=" in train) == (nodes > 2)
    assert "<snapshot of Qwen/Qwen2.5-1.5B-Instruct>" in vllm and "--port 29525" in vllm
    assert "HF_TOKEN=<set>" in env and "hf_secret" not in r.out and "WANDB_PROJECT=proj" in env
    assert ("MASTER_ADDR=n0 MASTER_PORT=" in env) == (nodes > 2)
    assert f"train_{JOB_ID}.log" in r.out and f"vllm-{JOB_ID}.out" in r.out
    # The plan for the trainer's devices and mesh (its table is tests/test_plan.py's business).
    plan = json.loads((r.fake / "plan.json").read_text())
    devices = 6 if nodes == 1 else 8 * (nodes - 1)
    assert f"--devices={devices}" in plan and f"--config={CONFIG}" in plan and "--device-memory=80GB" in plan
    assert "--cache" in plan  # stored where the trainer's pre-run check (maxent_jax.plan.guard) finds it
    assert "plan: (fake) verdict: fits" in r.out and "dry run: nothing started" in r.out
    assert "[plan] compiling the trainer's programs on this machine's CPU: minutes" in r.out  # not a hang


def test_dry_run_refuses_a_plan_that_does_not_fit(slurm):
    r = slurm("--config", CONFIG, "--dry-run", env={"FAKE_PLAN_RC": "1", "MAXENT_DEVICE_MEMORY": "16GB"})
    assert r.rc == 2 and "dry run: nothing started" not in r.out
    assert r.err.strip().splitlines() == [
        "launch: error: the plan above does not fit 16GB per GPU on mesh 1,6,1: apply its fix (--args) or use more GPUs"]


def test_a_given_split_that_does_not_divide_the_model_is_refused(slurm):
    r = slurm("--config", CONFIG, "--dp", "1", "--dry-run")
    assert r.rc == 2 and not (r.fake / "plan.json").exists()
    (line,) = r.err.strip().splitlines()
    assert "mesh 1,7,1 on 7 trainer GPUs (8 - vLLM's dp*tp=1) does not divide Qwen/Qwen2.5-1.5B-Instruct" in line
    assert line.endswith("use --dp 2 --tp 1 (vLLM on 2 GPUs, training on 6: mesh 1,6,1)")


def test_dry_run_checks_the_vllm_environment(slurm):
    r = slurm("--config", CONFIG, "--dry-run", env={"VLLM_PYTHON": "/nonexistent/python"})
    assert r.rc == 2 and "rollout-server interpreter /nonexistent/python not found: make vllm-env builds" in r.err


def test_a_resubmitted_job_uses_the_same_run_directory(slurm):
    first = slurm("--config", CONFIG, "--dry-run", env={"FAKE_JOB_ID": "100"})
    second = slurm("--config", CONFIG, "--dry-run", env={"FAKE_JOB_ID": "101"})
    named = slurm("--config", CONFIG, "--run-name", "trial-2", "--dry-run")
    assert [f"train_{job}.log" in r.out for r, job in ((first, 100), (second, 101))] == [True, True]
    workdirs = [_flag(r.plan("train")[0].split(), "workdir") for r in (first, second, named)]
    assert workdirs == ["var/runs/qwen2_5_1_5b-maxent_math"] * 2 + ["var/runs/trial-2"]


def test_one_node_run(slurm):
    r = slurm("--config", CONFIG, "--vllm-port", "31000", "--args", "--config.train.max_steps=3 --workdir=var/runs/x",
              env=CREDENTIALS)
    assert r.rc == 0, r.err
    (server,), (trainer,) = r.records("serve"), r.records("train")
    s_argv, t_argv = server["argv"], trainer["argv"]
    assert server["env"]["CUDA_VISIBLE_DEVICES"] == "0,1"
    assert _flag(s_argv, "backend") == "vllm" and _flag(s_argv, "host") == "127.0.0.1"
    assert _flag(s_argv, "port") == "31000" and _flag(s_argv, "max-model-len") == "4144"
    assert _flag(s_argv, "model") == str(r.fake / "snapshot")  # fetched from the hub id first
    assert json.loads((r.fake / "fetch.json").read_text()) == ["Qwen/Qwen2.5-1.5B-Instruct", "main"]
    assert trainer["env"]["CUDA_VISIBLE_DEVICES"] == "2,3,4,5,6,7"
    assert _flag(t_argv, "config") == CONFIG and _flag(t_argv, "config.mesh.shape") == "(1,6,1)"
    assert _flag(t_argv, "config.rollout.backend") == "server"
    assert _flag(t_argv, "config.vllm.url") == "http://127.0.0.1:31000/generate"
    assert _flag(t_argv, "config.vllm.token_file") == _flag(s_argv, "token-file")
    assert len(trainer["token"]) == 64  # the server's fresh token, readable by the trainer
    assert _flag(t_argv, "workdir") == "var/runs/x" and _flag(t_argv, "config.train.max_steps") == "3"
    for who in (server, trainer):
        assert {k: who["env"].get(k) for k in CREDENTIALS} == CREDENTIALS
        assert who["env"]["HF_HOME"] == str(r.repo / "var/cache/huggingface")
        assert who["env"]["JAX_COMPILATION_CACHE_DIR"] == str(r.repo / "var/cache/jax")
    assert r.records("serve")[0].get("terminated")  # torn down after training
    assert not pathlib.Path(_flag(s_argv, "token-file")).exists()
    logs = r.repo / "var/artifacts/logs"
    assert (logs / f"train_{JOB_ID}.log").exists() and (logs / f"vllm-{JOB_ID}.out").exists()


def test_two_nodes_server_on_the_last(slurm):
    r = slurm("--config", CONFIG, nodes=2, env=CREDENTIALS)
    assert r.rc == 0, r.err
    (server,), (trainer,) = r.records("serve"), r.records("train")
    (srun,) = r.srun_calls()  # only the server runs through srun; the trainer is on the batch node n0
    assert "--nodelist=n1" in srun and "--ntasks=1" in srun
    assert server["env"]["SLURMD_NODENAME"] == "n1" and _flag(server["argv"], "host") == "0.0.0.0"
    assert _flag(trainer["argv"], "config.vllm.url") == "http://n1:29525/generate"
    assert "CUDA_VISIBLE_DEVICES" not in trainer["env"]  # the trainer node keeps all its GPUs
    assert trainer["env"]["SLURM_NTASKS"] == "1"  # not the job's 2: jax.distributed must not wait for a peer
    assert _flag(trainer["argv"], "config.mesh.shape") == "(1,8,1)"
    assert server["env"]["HF_TOKEN"] == "hf_secret" and trainer["env"]["WANDB_API_KEY"] == "wb_secret"
    assert r.records("serve")[0].get("terminated")


def test_four_nodes_multi_host_trainer(slurm, tmp_path):
    model_dir = tmp_path / "local-model"
    model_dir.mkdir()
    r = slurm("--config", CONFIG, "--dp", "4", "--tp", "2", "--coordinator-port", "12345", nodes=4,
              env={**CREDENTIALS, "VLLM_MODEL": str(model_dir), "VLLM_MEM_UTIL": "0.8"})
    assert r.rc == 0, r.err
    (server,), trainers = r.records("serve"), r.records("train")
    assert not (r.fake / "fetch.json").exists()  # a local model directory is served as is
    assert server["env"]["SLURMD_NODENAME"] == "n3" and server["env"]["CUDA_VISIBLE_DEVICES"] == "0,1,2,3,4,5,6,7"
    s_argv = server["argv"]
    assert _flag(s_argv, "model") == str(model_dir)
    engine = [s_argv[i + 1] for i, a in enumerate(s_argv) if a == "--engine-arg"]
    assert engine == ["tensor_parallel_size=2", "data_parallel_size=4", "gpu_memory_utilization=0.8"]
    assert sorted(t["env"]["SLURMD_NODENAME"] for t in trainers) == ["n0", "n1", "n2"]
    assert sorted(t["env"]["SLURM_PROCID"] for t in trainers) == ["0", "1", "2"]
    for t in trainers:
        assert t["env"]["SLURM_NTASKS"] == "3"
        assert (t["env"]["MASTER_ADDR"], t["env"]["MASTER_PORT"]) == ("n0", "12345")
        assert _flag(t["argv"], "config.mesh.shape") == "(3,8,1)"
        assert _flag(t["argv"], "config.vllm.url") == "http://n3:29525/generate"
        assert {k: t["env"].get(k) for k in CREDENTIALS} == CREDENTIALS
        assert len(t["token"]) == 64
    calls = r.srun_calls()
    assert any("--nodelist=n3" in c for c in calls)
    train_call = next(c for c in calls if "--nodelist=n0,n1,n2" in c)
    assert {"--ntasks=3", "--ntasks-per-node=1", "--kill-on-bad-exit=1", "--export=ALL"} <= set(train_call)


def test_sampler_backend_needs_no_server(slurm):
    r = slurm("--config", CONFIG, "--args", "--config.rollout.backend=sampler", nodes=2)
    assert r.rc == 0, r.err
    assert not r.records("serve") and not r.plan("vllm")
    trainers = r.records("train")
    assert sorted(t["env"]["SLURMD_NODENAME"] for t in trainers) == ["n0", "n1"]
    for t in trainers:
        assert _flag(t["argv"], "config.vllm.url") is None and _flag(t["argv"], "config.mesh.shape") == "(2,8,1)"


def test_training_failure_still_stops_the_server(slurm):
    r = slurm("--config", CONFIG, env={"FAKE_TRAIN_RC": "3"})
    assert r.rc == 3 and "training failed (status 3)" in r.err
    assert r.records("serve")[0].get("terminated")


def test_cancelled_job_stops_trainer_and_server(slurm):
    """scancel sends SIGTERM to the batch script: both processes must go down with it."""
    proc = slurm.start("--config", CONFIG, env={"FAKE_TRAIN_SLEEP": "60"})
    deadline = time.monotonic() + 30
    while not list(slurm.fake.glob("train.*.json")) and time.monotonic() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    r = Result(proc.returncode, "", err, slurm.fake, slurm.repo)
    assert r.rc == 143
    assert r.records("train")[0].get("terminated") and r.records("serve")[0].get("terminated")


def test_server_that_dies_stops_the_launch(slurm):
    r = slurm("--config", CONFIG, env={"FAKE_SERVER_DIES": "1"})
    assert r.rc == 1 and "rollout server exited (status 9)" in r.err and "cannot start" in r.err
    assert not r.records("train")


def test_health_timeout(slurm):
    r = slurm("--config", CONFIG, "--health-timeout", "2", env={"FAKE_SERVER_SILENT": "1"})
    assert r.rc == 1 and "no answer from http://127.0.0.1:29525/health within 2s" in r.err
    assert not r.records("train") and r.records("serve")[0].get("terminated")


@pytest.mark.parametrize("model", ["Qwen2.5-1.5B-Instruct", "Qwen/Qwen2.5-1.5B-Instruct", "qwen2_5_1_5b"])
def test_model_and_task_pick_the_recipe(slurm, model):
    r = slurm("--model", model, "--task", "grpo", "--dry-run")
    assert r.rc == 0, r.err
    assert "--config=configs/qwen2_5_1_5b/grpo_math.py" in r.plan("train")[0]


@pytest.mark.parametrize("args,needle", [
    (["--dp", "0"], "--dp=0 is invalid"),
    (["--mesh", "2,2"], "--mesh=2,2 is invalid"),
    (["--mesh", "2,8,1"], "--mesh=2,8,1 does not fit the 7 trainer GPUs"),
    (["--dp", "8"], "leaves no GPU for the trainer"),
    (["--accelerator", "zero3"], "--accelerator is the reference's DeepSpeed choice"),
    (["--bogus"], "unknown argument '--bogus'"),
    (["--model", "Llama3.1-8B-instruct", "--task", "maxent"], "no recipe configs/llama3_1_8b/maxent_math.py"),
    (["--model", "gpt2", "--task", "grpo"], "--model=gpt2 matches no configs"),
    (["--args", "--config.maxent.tau=-1"], "maxent.tau=-1"),
    (["--args", "--workdir='unclosed"], "not a valid word list"),
])
def test_bad_flags_fail_with_one_line(slurm, args, needle):
    if not any(a in ("--model",) for a in args):
        args = ["--config", CONFIG, *args]
    r = slurm(*args, "--dry-run")
    assert r.rc == 2 and needle in r.err, r.err
    assert r.err.strip().splitlines()[-1].count("error:") == 1
