"""Entry point: `python -m maxent_jax.train [--config=X.py] [--recipe=R.yaml] [--workdir=DIR] [--config.a.b=v ...]`.

With no flags it trains the embedded default (configs/tiny.py) in a fresh workdir under var/runs/.
Precedence: the config file, then the reference-style `--recipe` (docs/recipes.md), then every
`--config.a.b=v` override. With `--recipe` and no `--config`, the recipe starts from the base
config (the reference's defaults), not from the tiny demo.
"""

from __future__ import annotations

import json
import pathlib
import sys
import time

import ml_collections
from absl import flags
from ml_collections import config_flags

from maxent_jax import cli, recipes
from maxent_jax import config as config_lib
from maxent_jax.config import to_json_dict
from maxent_jax.errors import UserError, exit_on_user_error

SUMMARY = """Train a policy with GRPO or MaxEnt-GRPO (objective.train_grpo_objective picks one).
The resolved config is printed and written to WORKDIR/config.json before any compute."""


def define_flags() -> flags.FlagValues:
    fv = flags.FlagValues()
    cli.define_config_flag(fv)
    flags.DEFINE_string("workdir", None, "Run directory (default: a fresh var/runs/<timestamp>).", flag_values=fv)
    flags.DEFINE_string(
        "recipe", None, "A reference-style flat YAML recipe to map onto the config (see docs/recipes.md).",
        flag_values=fv,
    )
    return fv


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv if argv is None else argv)
    if cli.help_requested(argv):
        cli.print_help(define_flags(), "maxent_jax.train", SUMMARY)
        return
    fv, rest = cli.parse(define_flags, argv)
    if len(rest) > 1:
        raise UserError(f"unexpected positional arguments: {' '.join(rest[1:])}")
    config = resolve_config(fv)
    workdir = run_workdir(fv.workdir)
    import jax  # after validation: a bad config fails before any backend starts

    from maxent_jax.parallel.distributed import initialize_distributed

    initialize_distributed()  # a no-op for one process; Slurm / MASTER_ADDR variables otherwise
    enable_compilation_cache()
    cli.validated(config, device_count=jax.device_count())
    from maxent_jax.trainer import Trainer

    print(f"workdir: {workdir}")
    if jax.process_index() == 0:
        print(config)
        (workdir / "config.json").write_text(json.dumps(to_json_dict(config), indent=2, sort_keys=True) + "\n")
    trainer = Trainer(config, workdir, config_path=fv["config"].config_filename)
    try:
        last = trainer.run()
    finally:
        trainer.close()
    if last:
        print("final: " + ", ".join(f"{k}={last[k]:.4g}" for k in SUMMARY_KEYS if k in last))


SUMMARY_KEYS = ("train/reward", "train/kl", "train/tau", "train/beta", "eval/mean_reward")


def enable_compilation_cache() -> None:
    """Persist compiled programs under the cache dir, so a rerun (or a resumed run) skips compilation.

    JAX_COMPILATION_CACHE_DIR, when set (the launcher sets var/cache/jax), is where they go."""
    import os

    import jax

    from maxent_jax.run_setup import cache_dir

    jax.config.update("jax_compilation_cache_dir", os.environ.get("JAX_COMPILATION_CACHE_DIR") or str(cache_dir() / "xla"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def run_workdir(flag: str | None) -> pathlib.Path:
    """--workdir, else a fresh var/runs/<UTC timestamp> under the current directory; must be writable."""
    path = pathlib.Path(flag) if flag else pathlib.Path("var/runs") / time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write_test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise UserError(f"--workdir={str(path)!r} is not writable: {err.strerror or err}") from None
    return path.resolve()


def resolve_config(fv: flags.FlagValues) -> ml_collections.ConfigDict:
    """The validated config: file, then --recipe, then the --config.* overrides (they always win)."""
    config = fv.config
    if fv.recipe:
        recipe = recipes.load(fv.recipe)
        for line in recipe.warnings():
            print(f"warning: {line}", file=sys.stderr)
        if not fv["config"].present:
            config = config_lib.get_base_config()
        recipes.apply(config, recipe)
        overrides = config_flags.get_override_values(fv["config"])
        recipe.check_overrides(overrides)
        for path, value in overrides.items():
            *parents, leaf = path.split(".")
            node = config
            for part in parents:
                node = node[part]
            node[leaf] = value
    return cli.validated(config)


if __name__ == "__main__":
    exit_on_user_error(main)
