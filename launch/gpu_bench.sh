#!/usr/bin/env bash
# The GPU figures of docs/benchmarks.md in one run: `update` on the 1.5B shape (MFU), `sampler --vs
# transformers` on it, `train-step --vs trl` on `small`, a GPU pass of the device-agnostic tests
# (float32 matmuls at full precision, not TF32, since they compare against float32 references),
# `sampler --vs transformers` on `small`, and the born-sharded initialiser's cost on the 1.5B shape.
#
#   bash launch/gpu_bench.sh [OUT_DIR]       (default: var/gpu-bench)
#
# Each step has its own time limit and writes its log (and JSON) under OUT_DIR, so a step that
# fails or runs long costs only itself. The machine's own jax, flax and optax are used. Wheels in
# .whl/ (WHEELS=DIR for another folder) are installed to a private site directory first, each only
# if the machine lacks that distribution: pure-python packages (ml_collections, math-verify and its
# parsers, trl, datasets, dill, multiprocess, pytest-xdist); a flax/optax/orbax the machine has
# must stay, since its version matches the machine's jax.
# BIG / SMALL pick the presets (qwen2_5_1_5b / small); STEPS a subset of the steps, in order; a
# CPU dry run uses BIG=tiny SMALL=tiny WHEELS=none.
set -u
out=${1:-${OUT:-var/gpu-bench}}
mkdir -p "$out"
big=${BIG:-qwen2_5_1_5b}
small=${SMALL:-small}
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false WANDB_MODE=disabled HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
# The torch peers share the process with jax: leave them part of the GPU's memory.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.6}
wheels=${WHEELS:-.whl}
rm -rf /tmp/site  # a stale copy from an earlier run would shadow the machine's own packages
export PYTHONPATH=$PWD
missing=()
for wheel in "$wheels"/*.whl; do  # only what the machine lacks: its own flax/optax/orbax match its jax
    [ -e "$wheel" ] || continue
    dist=$(basename "$wheel" | cut -d- -f1)
    "$py" -c 'import importlib.metadata as m, sys; m.version(sys.argv[1])' "$dist" 2>/dev/null || missing+=("$wheel")
done
if [ ${#missing[@]} -gt 0 ]; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "${missing[@]}" || exit 1
    export PYTHONPATH=/tmp/site:$PWD
fi
echo "installed from $wheels: ${missing[*]:-nothing}"

step() {  # step NAME SECONDS COMMAND...: run with a limit, log to OUT_DIR/NAME.log, report rc and time
    local name=$1 limit=$2 start rc
    shift 2
    start=$(date +%s)
    # SIGINT first: python and pytest then print where they were (pytest its summary) before exiting.
    timeout --signal=INT --kill-after=20 "$limit" "$@" >"$out/$name.log" 2>&1
    rc=$?
    echo "== $name: rc=$rc in $(( $(date +%s) - start )) s" | tee -a "$out/summary.txt"
}

{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv 2>/dev/null
    "$py" -c 'import jax, flax, optax, sys; print(sys.version.split()[0], "jax", jax.__version__, "flax", flax.__version__, "optax", optax.__version__, jax.devices())'
    "$py" -c 'import torch, transformers; print("torch", torch.__version__, "cuda", torch.cuda.is_available(), "transformers", transformers.__version__)'
} >"$out/versions.txt" 2>&1
cat "$out/versions.txt"

bench() {  # bench NAME SECONDS TARGET ARGS...
    local name=$1 limit=$2
    shift 2
    step "$name" "$limit" "$py" -m maxent_jax.bench "$@" --json "$out/$name.json"
}

device_tests=(
    tests/test_attention.py tests/test_model_decoder.py tests/test_gumbel.py tests/test_sampler.py
    tests/test_objectives_maxent.py tests/test_objectives_grpo.py tests/test_objectives_infoseed.py
    tests/test_objectives_kl.py tests/test_objectives_finite.py tests/test_controllers_meta.py
    tests/test_controllers_rules.py tests/test_controllers_state.py tests/test_optimizer.py tests/test_scoring.py
)
tests() {  # the device-agnostic tests (TEST_FILES: a subset) on one GPU, in parallel when pytest-xdist is there
    local parallel=()
    "$py" -c 'import xdist' 2>/dev/null && parallel=(-n "${TEST_WORKERS:-8}")
    # shellcheck disable=SC2086  # TEST_FILES is a list of paths
    JAX_PLATFORMS='' JAX_DEFAULT_MATMUL_PRECISION=highest XLA_PYTHON_CLIENT_PREALLOCATE=false \
        step tests "${T_TESTS:-150}" "$py" -m pytest -q -p no:cacheprovider "${parallel[@]}" \
        ${TEST_FILES:-${device_tests[@]}} \
        --deselect tests/test_sampler.py::test_runs_on_params_sharded_over_the_training_mesh  # needs 8 devices
}

# STEPS picks and orders the steps (default: all of them). `update_big+FIELD=VALUE+...` is `update_big`
# with ModelConfig fields changed (bench --model), e.g. update_big+attention=cudnn+remat_policy=save_dots.
for name in ${STEPS:-update_big sampler_big train_step_small tests sampler_small update_big_sharded plan_check}; do
    case $name in
        update_big | update_big+*)
            fields=()
            [ "$name" = update_big ] || IFS=+ read -r -a fields <<<"${name#update_big+}"
            # No torch in this process: the step may use most of the GPU's memory (the preset has no remat).
            XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 bench "${name//[+=]/_}" "${T_UPDATE:-240}" update --preset "$big" \
                --repeats 5 "${fields[@]/#/--model=}" ;;
        sampler_big) bench sampler_big "${T_SAMPLER:-170}" sampler --preset "$big" --repeats 2 --vs transformers ;;
        train_step_small) bench train_step_small "${T_TRAIN:-120}" train-step --preset "$small" --repeats 3 --vs trl ;;
        tests) tests ;;
        sampler_small) bench sampler_small "${T_SAMPLER_SMALL:-60}" sampler --preset "$small" --repeats 3 --vs transformers ;;
        # The born-sharded initialiser's compile time.
        update_big_sharded) bench update_big_sharded "${T_SHARDED:-90}" update --preset "$big" --repeats 1 --init sharded ;;
        # The planner's update peak (compiled on CPU host devices) vs this GPU's peak_bytes_in_use for the
        # Qwen2.5-1.5B update on one device (docs/planning.md); exit 1 beyond 10%.
        plan_check) XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 step plan_check "${T_PLAN:-400}" "$py" -m maxent_jax.plan.gpu_check \
                --config=configs/qwen2_5_1_5b/grpo_math.py "--config.mesh.shape=(1,1,1)" \
                --config.rollout.max_completion_length=1024 --config.train.per_device_train_batch_size=1 \
                --config.train.gradient_accumulation_steps=2 ;;
        *) echo "unknown step $name" >&2; exit 2 ;;
    esac
done

for f in "$out"/*.log; do echo "---- $f"; tail -n 25 "$f"; done
cat "$out/summary.txt"
