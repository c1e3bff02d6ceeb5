"""Print the facts of a training config that the launcher needs, one `key<TAB>value` per line.

    python launch/resolve_config.py --config=configs/X.py [--recipe=R.yaml] [--config.a.b=v ...]
        [--split=GPUS:NODES:DP:TP:MESH:GIVEN]

It parses exactly the flags `python -m maxent_jax.train` would get (the same precedence:
config file, recipe, overrides) so the launcher starts the rollout server for the model the
trainer will load, with room for the trainer's longest sequence. Bad flags or values fail
here, before any GPU is touched, with the trainer's own one-line error (exit 2).

With --split (GPUs per node, nodes, vLLM dp and tp, the --mesh or '', 1 when the user gave
--dp/--tp/--mesh) it also checks the node's split between vLLM and the trainer against the
model's sharded dimensions (`maxent_jax.plan.split.check_split`) and prints the split to use.
"""

from __future__ import annotations

import sys

from maxent_jax import cli, train
from maxent_jax.errors import exit_on_user_error


def main() -> None:
    if cli.help_requested(sys.argv):
        cli.print_help(train.define_flags(), "launch.resolve_config", __doc__.split("\n\n")[0])
        return
    split = [a for a in sys.argv if a.startswith("--split=")]
    fv, _ = cli.parse(train.define_flags, [a for a in sys.argv if not a.startswith("--split=")])
    config = train.resolve_config(fv)
    facts = {
        "model": config.model.name_or_path,
        "revision": config.model.revision,
        "backend": config.rollout.backend,
        "mesh": ",".join(str(d) for d in config.mesh.shape),
        "max_model_len": config.rollout.max_prompt_length + config.rollout.max_completion_length,
        "dtype": config.model.param_dtype,
    }
    if split:
        from maxent_jax.plan.split import check_split

        gpus, nodes, dp, tp, mesh, given = split[-1].split("=", 1)[1].split(":")
        facts.update({f"split_{k}": v for k, v in check_split(
            config, gpus=int(gpus), nodes=int(nodes), dp=int(dp), tp=int(tp), mesh=mesh, serve=facts["backend"] == "server",
            given=given == "1").items()})
    for key, value in facts.items():
        print(f"{key}\t{value}")


if __name__ == "__main__":
    exit_on_user_error(main)
