"""Entry point: `python -m maxent_jax.train [--config=configs/X.py] [--workdir=DIR] [--config.a.b=v ...]`.

With no flags it trains the embedded default (configs/tiny.py) in a fresh workdir under var/runs/.
"""

from __future__ import annotations

import sys

from absl import flags

from maxent_jax import cli
from maxent_jax.errors import UserError, exit_on_user_error

SUMMARY = """Train a policy with GRPO or MaxEnt-GRPO (objective.train_grpo_objective picks one).
The resolved config is printed and written to WORKDIR/config.json before any compute."""


def _define_flags() -> flags.FlagValues:
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
        cli.print_help(_define_flags(), "maxent_jax.train", SUMMARY)
        return
    fv, rest = cli.parse(_define_flags, argv)
    if len(rest) > 1:
        raise UserError(f"unexpected positional arguments: {' '.join(rest[1:])}")
    config = cli.validated(fv.config)
    print(config)


if __name__ == "__main__":
    exit_on_user_error(main)
