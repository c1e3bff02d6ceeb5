"""`python -m maxent_jax.plan --config=RECIPE [--config.x=...] [--devices 8] [--mesh D,F,T]
[--device-memory 80GB] [--json PATH]`: will this run fit, and what does a step cost?

CPU host devices stand in for the accelerators, so the device count must be set before jax
starts: this module reads `--devices` from the command line first and sets XLA_FLAGS.
"""

from __future__ import annotations

import os
import sys

SUMMARY = """Plan a training run without its hardware: compile the trainer's programs (update, reference
scoring, in-process sampling) for the config's mesh on CPU host devices, from the model's config.json
(no weights), and print per-device memory, FLOPs and whether it fits --device-memory; when it does not,
the cheapest change that fits. Exit 0 when it fits, 1 when it does not, 2 on bad input."""


def _requested_devices(argv: list[str]) -> int:
    """--devices N / --devices=N from argv (default 8), read before jax is imported."""
    for i, arg in enumerate(argv):
        value = arg.split("=", 1)[1] if arg.startswith("--devices=") else (
            argv[i + 1] if arg == "--devices" and i + 1 < len(argv) else None)
        if value is not None:
            if not value.isdigit() or int(value) < 1:
                print(f"error: --devices={value} is invalid; expected a positive integer", file=sys.stderr)
                raise SystemExit(2)
            return int(value)
    return 8


# XLA:CPU's default scheduler orders independent work for concurrency and keeps every layer's
# buffers alive at once (a 7B forward's temporaries grew by ~20 GB per layer); GPUs schedule with
# memory in mind. The memory-minimising order is what a plan must measure.
PLAN_XLA_FLAGS = ("--xla_cpu_enable_concurrency_optimized_scheduler=false",)


def _host_devices(count: int) -> None:
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
             if "xla_force_host_platform_device_count" not in f and f not in PLAN_XLA_FLAGS]
    os.environ["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={count}", *PLAN_XLA_FLAGS])
    os.environ["JAX_PLATFORMS"] = "cpu"


def define_flags():
    from absl import flags

    from maxent_jax import cli

    fv = flags.FlagValues()
    cli.define_config_flag(fv)
    flags.DEFINE_integer("devices", 8, "Devices of the target mesh (CPU host devices stand in for them).",
                         flag_values=fv)
    flags.DEFINE_string("mesh", None, "Mesh D,F,T (data, fsdp, tensor); default: the config's mesh.shape.",
                        flag_values=fv)
    flags.DEFINE_string("device_memory", "80GB", "Memory of one device: 80GB (10^9 bytes), 80GiB, 141GB.",
                        flag_values=fv)
    flags.DEFINE_string("json", None, "Also write the plan as JSON here.", flag_values=fv)
    flags.DEFINE_boolean("extrapolate", False, "Compile the model at 2 and 3 layers and extend every count "
                         "linearly to its depth: minutes instead of tens of minutes for a 28-layer model.",
                         flag_values=fv)
    flags.DEFINE_boolean("cache", False, "Also store the plan where the trainer's pre-run check looks for it "
                         "(the launcher's --dry-run does).", flag_values=fv)
    flags.DEFINE_boolean("fixes", True, "When the plan does not fit, plan candidate fixes and print the cheapest "
                         "that fits.", flag_values=fv)
    return fv


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv if argv is None else argv)
    # absl spells the flag --device_memory; accept the issue's --device-memory too.
    argv = [a.replace("--device-memory", "--device_memory", 1) if a.startswith("--device-memory") else a for a in argv]
    from maxent_jax import cli

    if cli.help_requested(argv):
        cli.print_help(define_flags(), "maxent_jax.plan", SUMMARY)
        return 0
    _host_devices(_requested_devices(argv))
    fv, rest = cli.parse(define_flags, argv)
    from maxent_jax.errors import UserError

    if len(rest) > 1:
        raise UserError(f"unexpected positional arguments: {' '.join(rest[1:])}")
    from maxent_jax.plan.run import run

    return run(fv.config, config_name=fv["config"].config_filename, devices=fv.devices, mesh=fv.mesh,
               device_memory=fv.device_memory, json_path=fv.json, fixes=fv.fixes, cache=fv.cache,
               extrapolate=fv.extrapolate)


if __name__ == "__main__":
    from maxent_jax.errors import exit_on_user_error

    raise SystemExit(exit_on_user_error(main))
