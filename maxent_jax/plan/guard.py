"""The trainer's check before it loads weights on an accelerator: does the planned run fit the device?

`check_fits(config, mesh_shape)` is a no-op on CPU (tests, demos, CPU runs are unaffected). On an
accelerator it reads the run's plan from the cache (`<cache>/plans/<key>.json`; the key is a hash
of the config sections that shape the programs, and the mesh), making it once with
`python -m maxent_jax.plan` in a CPU subprocess when it is missing (the launcher's `--dry-run`
writes the same file), and stops with one line naming the phase and the bytes when a phase's
planned peak exceeds the device's `bytes_limit`. `MAXENT_SKIP_PLAN_CHECK=1` skips it: the plan's
activations are an upper bound for bf16 programs (docs/planning.md), so a run within that bound
of the limit may still fit.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import subprocess
import sys
import tempfile
from typing import Any

import ml_collections

from maxent_jax.config import to_json_dict
from maxent_jax.errors import UserError

# Config sections that do not change the compiled programs' shapes or dtypes.
NOT_PLANNED = ("vllm", "logging", "checkpoint", "eval", "data", "rewards", "seed")


def plan_key(config: ml_collections.ConfigDict, mesh_shape: tuple[int, ...]) -> str:
    planned = {k: v for k, v in to_json_dict(config).items() if k not in NOT_PLANNED}
    planned["mesh"] = {**planned.get("mesh", {}), "shape": list(mesh_shape)}
    return hashlib.sha256(json.dumps(planned, sort_keys=True).encode()).hexdigest()[:24]


def plan_file(config: ml_collections.ConfigDict, mesh_shape: tuple[int, ...]) -> pathlib.Path:
    from maxent_jax.run_setup import cache_dir

    return cache_dir() / "plans" / f"{plan_key(config, mesh_shape)}.json"


def _config_module(config: ml_collections.ConfigDict) -> str:
    """A config file that rebuilds `config` (JSON lists back to the tuples the fields hold)."""
    return ("import json\nimport ml_collections\n\n\ndef _tuples(x):\n"
            "    if isinstance(x, list):\n        return tuple(_tuples(v) for v in x)\n"
            "    if isinstance(x, dict):\n        return {k: _tuples(v) for k, v in x.items()}\n    return x\n\n\n"
            f"def get_config():\n    return ml_collections.ConfigDict(_tuples(json.loads({json.dumps(json.dumps(to_json_dict(config)))})))\n")


def make_plan(config: ml_collections.ConfigDict, mesh_shape: tuple[int, ...], out: pathlib.Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp) / "run_config.py"
        path.write_text(_config_module(config))
        env = {**os.environ, "JAX_PLATFORMS": "cpu"}
        proc = subprocess.run([sys.executable, "-m", "maxent_jax.plan", f"--config={path}",
                               f"--devices={_prod(mesh_shape)}", f"--mesh={','.join(map(str, mesh_shape))}",
                               "--json", str(out), "--nofixes"], env=env, capture_output=True, text=True)
    if proc.returncode not in (0, 1) or not out.exists():
        raise UserError(f"the memory plan could not be made (python -m maxent_jax.plan exited {proc.returncode}: "
                        f"{(proc.stderr.strip().splitlines() or [''])[-1][:200]}); set MAXENT_SKIP_PLAN_CHECK=1 to skip it")


def verdict(plan: dict[str, Any], bytes_limit: int) -> str | None:
    """The one-line refusal when a phase's planned peak exceeds the device's memory, else None."""
    for name, phase in plan["phases"].items():
        if phase["peak_bytes"] > bytes_limit:
            return (f"the run does not fit: its '{name}' phase needs {phase['peak_bytes'] / 1e9:.1f} GB per device "
                    f"(planned on mesh {tuple(plan['mesh'])}) and the device has {bytes_limit / 1e9:.1f} GB; "
                    f"`python -m maxent_jax.plan` names the cheapest fix (MAXENT_SKIP_PLAN_CHECK=1 skips this check)")
    return None


def check_fits(config: ml_collections.ConfigDict, mesh_shape: tuple[int, ...]) -> None:
    import jax

    device = jax.local_devices()[0]
    if device.platform == "cpu" or os.environ.get("MAXENT_SKIP_PLAN_CHECK") == "1":
        return
    stats = device.memory_stats() or {}
    if "bytes_limit" not in stats:
        return
    path = plan_file(config, mesh_shape)
    if not path.exists():
        make_plan(config, mesh_shape, path)
    problem = verdict(json.loads(path.read_text()), int(stats["bytes_limit"]))
    if problem:
        raise UserError(problem)


def _prod(shape: tuple[int, ...]) -> int:
    out = 1
    for d in shape:
        out *= d
    return out
