"""Entry point: `python -m maxent_jax.train [--config=X.py] [--recipe=R.yaml] [--workdir=DIR] [--config.a.b=v ...]`.

With no flags it trains the embedded default (configs/tiny.py) in a fresh workdir under var/runs/.
Precedence: the config file, then the reference-style `--recipe` (docs/recipes.md), then every
`--config.a.b=v` override. With `--recipe` and no `--config`, the recipe starts from the base
config (the reference's defaults), not from the tiny demo.
"""

from __future__ import annotations

import pathlib
import shlex
import signal
import sys
import time

import ml_collections
from absl import flags

from maxent_jax import cli, console, recipes
from maxent_jax import config as config_lib
from maxent_jax import workdir as workdir_lib
from maxent_jax.errors import StorageFault, UserError, exit_on_user_error

SUMMARY = """Train a policy with GRPO or MaxEnt-GRPO (objective.train_grpo_objective picks one).
The fields that differ from the defaults are printed; the whole config is written to
WORKDIR/config.json. The same command with the same --workdir resumes the run (without --workdir
each run gets a fresh var/runs/<time>); a different config is refused before anything in the
workdir is touched (docs/training.md, "Workdirs")."""


def define_flags() -> flags.FlagValues:
    fv = flags.FlagValues()
    cli.define_config_flag(fv)
    flags.DEFINE_string("workdir", None, "Run directory (default: a fresh var/runs/<timestamp>).", flag_values=fv)
    flags.DEFINE_string(
        "recipe", None, "A reference-style flat YAML recipe to map onto the config (see docs/recipes.md).",
        flag_values=fv,
    )
    flags.DEFINE_bool(
        "dry_run", False, "Make every check the run makes before compute (config, workdir, rewards, dataset, mesh, "
        "rollout server, W&B, disk) without loading weights, print the plan and exit (0, or 2 with the problem).",
        flag_values=fv,
    )
    flags.DEFINE_bool(
        "accept_changes", False, "Resume a workdir's run with the listed config changes (run length, logging, "
        "eval and save cadence, infrastructure).", flag_values=fv,
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
    config_path = fv["config"].config_filename
    if fv.dry_run:
        from maxent_jax.dry_run import dry_run, print_plan

        print_plan(dry_run(config, workdir_path(fv.workdir), accept_changes=fv.accept_changes))
        return
    workdir = run_workdir(fv.workdir)
    existing, changes = workdir_lib.check_reuse(workdir, config, accept_changes=fv.accept_changes)
    if existing is not None and existing.finished and not any(c.field in LENGTH_FIELDS for c in changes):
        print(f"{workdir} holds a finished run ({existing.step} of {existing.total_steps} steps): nothing to do")
        print(console.next_steps(workdir, config))
        return
    from maxent_jax.dry_run import check_rewards

    check_rewards(config)  # before the model loads
    import jax  # after validation: a bad config fails before any backend starts

    from maxent_jax.parallel.distributed import initialize_distributed

    initialize_distributed()  # a no-op for one process; Slurm / MASTER_ADDR variables otherwise
    enable_compilation_cache()
    cli.validated(config, device_count=jax.device_count())
    from maxent_jax.trainer import Trainer

    main_process = jax.process_index() == 0
    if main_process:
        print(f"workdir: {workdir}")
        if changes:
            print("resuming with changes: " + "; ".join(str(c) for c in changes))
        print(console.describe_config(config, workdir), flush=True)
    trainer = Trainer(config, workdir, config_path=config_path)
    try:
        if main_process:  # the run is built (model, data, disk): now the workdir is this run's
            workdir_lib.write_config(workdir, config)
            workdir_lib.write_status(workdir, config, status="running", step=trainer.step,
                                     total_steps=trainer.total_steps)
        last = trainer.run()
    except StorageFault as err:
        if fv.workdir is None:  # the same command without --workdir would start a new run
            raise StorageFault(f"{err} (this run's workdir: --workdir={shlex.quote(str(workdir))})") from None
        raise
    finally:
        trainer.close()
    stopped = trainer.stopped_by
    if main_process:
        workdir_lib.write_status(workdir, config, status="interrupted" if stopped else "finished",
                                 step=trainer.step, total_steps=trainer.total_steps)
    if stopped is not None:
        if trainer.sft_done:  # (a stop in the warm-up was already reported: nothing saved)
            print(console.interrupted(trainer.step, workdir, workdir_given=fv.workdir is not None), file=sys.stderr)
        if stopped == signal.SIGINT:
            raise SystemExit(128 + signal.SIGINT)  # 130, as a shell reports Ctrl-C
        return  # SIGTERM (preemption): exit 0, the job's requeue resumes it
    if last:
        print("final: " + console.summary(last, SUMMARY_KEYS))
    print(console.next_steps(workdir, config))


SUMMARY_KEYS = ("train/reward", "train/kl", "train/tau", "train/beta", "eval/mean_reward")
LENGTH_FIELDS = ("train.max_steps", "train.num_train_epochs")  # a finished run given more steps goes on


def enable_compilation_cache() -> None:
    """Persist compiled programs under the cache dir, so a rerun (or a resumed run) skips compilation.

    JAX_COMPILATION_CACHE_DIR, when set (the launcher sets var/cache/jax), is where they go."""
    import os

    import jax

    from maxent_jax.run_setup import cache_dir

    jax.config.update("jax_compilation_cache_dir", os.environ.get("JAX_COMPILATION_CACHE_DIR") or str(cache_dir() / "xla"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def workdir_path(flag: str | None) -> pathlib.Path:
    """--workdir, else a fresh var/runs/<UTC timestamp> under the current directory."""
    path = pathlib.Path(flag) if flag else pathlib.Path("var/runs") / time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    return path.resolve()


def run_workdir(flag: str | None) -> pathlib.Path:
    """`workdir_path`, created; it must be writable."""
    path = workdir_path(flag)
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
        cli.apply_overrides(config, fv["config"])
    return cli.validated(config)


def _main() -> None:
    """main, with Ctrl-C before training starts (loading, compiling) as one line and status 130."""
    try:
        main()
    except KeyboardInterrupt:
        print("\ninterrupted before the first step; nothing saved: rerun the same command to start", file=sys.stderr)
        raise SystemExit(128 + signal.SIGINT) from None


if __name__ == "__main__":
    exit_on_user_error(_main)
