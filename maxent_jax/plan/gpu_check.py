"""Planned vs measured: the update's planned per-device peak beside a GPU's `peak_bytes_in_use`.

    python -m maxent_jax.plan.gpu_check --config=configs/qwen2_5_1_5b/grpo_math.py [--config.x=v ...]

Plans the config in a CPU subprocess (`python -m maxent_jax.plan --json`, update phase on the
config's mesh), then on this process's accelerator builds the train state from random weights,
a reference copy and a batch of the planned shapes, runs one update, and prints both peaks and
their ratio; exit 1 when they differ by more than 10% (`launch/gpu_bench.sh`, step `plan_check`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

from maxent_jax import cli, train
from maxent_jax.errors import UserError, exit_on_user_error


def main() -> int:
    fv, _ = cli.parse(train.define_flags, sys.argv)
    config = train.resolve_config(fv)
    import jax
    import jax.numpy as jnp

    devices = jax.devices()
    if devices[0].platform == "cpu" or devices[0].memory_stats() is None:
        raise UserError("plan.gpu_check needs an accelerator with memory_stats(); jax runs on "
                        f"{devices[0].platform}")
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "plan.json")
        shape = ",".join(map(str, config.mesh.shape))
        argv = sys.argv[1:]
        subprocess.run([sys.executable, "-m", "maxent_jax.plan", *argv, f"--devices={len(devices)}",
                        f"--mesh={shape}", "--json", out, "--nofixes"], check=False,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
        planned = json.loads(open(out).read())["phases"]["update"]["peak_bytes"]

    from maxent_jax.parallel.mesh import make_mesh
    from maxent_jax.parallel.rules import resolve_rules
    from maxent_jax.parallel.train_step import init_sharded_model, init_train_state
    from maxent_jax.plan import programs
    from maxent_jax.plan.architecture import model_config
    from maxent_jax.model.decoder import Decoder

    cfg = model_config(config)
    mesh, rules = make_mesh(tuple(config.mesh.shape)), resolve_rules(tuple(config.mesh.rules))
    setup = programs.build_setup(config, cfg, mesh, rules)
    _, params, _ = init_sharded_model(lambda rngs: Decoder(cfg, rngs=rngs), mesh, rules=rules)
    state = init_train_state(params, setup.optimizer, mesh, rules)
    reference = jax.tree.map(jnp.copy, state.params)
    batch = {k: jax.device_put(jnp.zeros(v.shape, v.dtype), v.sharding) for k, v in programs.step_batch(setup).items()}
    from maxent_jax.parallel.train_step import make_train_step

    step = make_train_step(setup.graphdef, setup.rest, state, setup.optimizer, programs._loss(setup), mesh, rules,
                           gradient_chunks=config.train.gradient_chunks)
    state, metrics = step(state, batch, {"beta": 0.0})
    jax.block_until_ready((state, metrics, reference))
    measured = max(d.memory_stats()["peak_bytes_in_use"] for d in devices)
    ratio = planned / measured
    print(f"update peak per device: planned {planned / 1e9:.2f} GB, measured {measured / 1e9:.2f} GB "
          f"(peak_bytes_in_use), planned/measured {ratio:.2f}")
    return 0 if abs(ratio - 1) <= 0.10 else 1


if __name__ == "__main__":
    raise SystemExit(exit_on_user_error(main))
