"""The planner's command: validate, plan, look for a fix, print the table, write the JSON."""

from __future__ import annotations

import json
import pathlib
import re

import ml_collections

from maxent_jax import cli
from maxent_jax.errors import UserError
from maxent_jax.plan import core


def parse_mesh(text: str) -> tuple[int, int, int]:
    if not re.fullmatch(r"(-1|[1-9][0-9]*),(-1|[1-9][0-9]*),(-1|[1-9][0-9]*)", text.strip()):
        raise UserError(f"--mesh={text} is invalid; expected three sizes D,F,T (data, fsdp, tensor), e.g. 1,8,1")
    return tuple(int(x) for x in text.split(","))  # type: ignore[return-value]


def resolve(config: ml_collections.ConfigDict, *, devices: int, mesh: str | None) -> ml_collections.ConfigDict:
    """The config with --mesh applied, validated against `devices` (a wrong mesh is one line, exit 2)."""
    if mesh:
        config = core.apply_overrides(config, {"mesh.shape": parse_mesh(mesh)})
    return cli.validated(config, device_count=devices)


def run(config: ml_collections.ConfigDict, *, config_name: str, devices: int, mesh: str | None,
        device_memory: str, json_path: str | None, fixes: bool = True, cache: bool = False,
        extrapolate: bool = False) -> int:
    """Print the plan; 0 when it fits, 1 when it does not (the table says why and what would fit)."""
    memory = core.parse_bytes(device_memory)
    config = resolve(config, devices=devices, mesh=mesh)
    result = core.plan(config, devices=devices, device_memory=memory, config_name=_short(config_name),
                       extrapolate=extrapolate)
    if not result.fits and fixes:
        result.fix = core.find_fix(config, result, devices=devices, extrapolate=extrapolate)
        result.fixes_searched = True
    print(core.table(result), flush=True)
    paths = [pathlib.Path(json_path)] if json_path else []
    if cache:  # where the trainer's check (plan.guard) looks for this run's plan
        from maxent_jax.plan.guard import plan_file

        paths.append(plan_file(config, result.mesh))
    for path in paths:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(result.to_json(), indent=2) + "\n")
        except OSError as err:
            raise UserError(f"--json={path}: cannot write ({err.strerror or err})") from None
    return 0 if result.fits else 1


def _short(name: str) -> str:
    """A config path relative to the repository when it is inside it."""
    path = pathlib.Path(name).resolve()
    try:
        return str(path.relative_to(cli.REPO_ROOT))
    except ValueError:
        return name
