"""One of two JAX processes of `test_two_processes_match_single_device` (not collected by pytest).

Started with SLURM_NTASKS=2, SLURM_PROCID=<rank>, SLURM_NODELIST=localhost, MASTER_PORT and
4 host CPU devices; feeds its half of the 32 test rows and prints the step's metrics as JSON.
"""

import json
import os
import sys

from maxent_jax.parallel.distributed import global_batch, initialize_distributed, is_main_process, read_scalars

assert initialize_distributed()  # before anything touches a JAX backend

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from test_parallel_step import CFG, LOSS, ROWS, record_gradients  # noqa: E402

from maxent_jax.model import Decoder  # noqa: E402
from maxent_jax.parallel.mesh import make_mesh  # noqa: E402
from maxent_jax.parallel.train_step import init_train_state, make_train_step  # noqa: E402

rank = jax.process_index()
rows = dict(np.load(os.path.join(sys.argv[1], "rows.npz")))
half = {k: v[rank * ROWS // 2 : (rank + 1) * ROWS // 2].reshape(4, ROWS // 8, *v.shape[1:]) for k, v in rows.items()}
mesh = make_mesh((2, 2, 2))
graphdef, params, rest = nnx.split(Decoder(CFG, rngs=nnx.Rngs(0)), nnx.Param, ...)
optimizer = record_gradients()
state = init_train_state(params, optimizer, mesh)
step = make_train_step(graphdef, rest, state, optimizer, LOSS, mesh)
batch = global_batch(half, mesh)
assert batch["input_ids"].shape == (4, ROWS // 4, rows["input_ids"].shape[1])
state, metrics = step(state, batch)
scalars = read_scalars(metrics)  # replicated over both processes: each reads every value
print(json.dumps({"rank": rank, "main": is_main_process(), "devices": jax.device_count(),
                  "loss": scalars["loss"], "grad_norm": scalars["grad_norm"]}), flush=True)
