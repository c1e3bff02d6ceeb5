"""`python -m maxent_jax.bench TARGET [--preset tiny|small|qwen2_5_1_5b] [--repeats N] [--json PATH] [--vs PEER]`.

Prints a table (machine, versions, setup, median / min / max / spread of every figure, the
load average around it, ratios) and optionally writes the same as JSON. docs/benchmarks.md
describes every target and lists the measured figures.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from maxent_jax import flag_spelling
from maxent_jax.errors import UserError, exit_on_user_error

TARGETS = ("train-step", "update", "sampler", "weight-sync", "e2e")
PEERS = {"train-step": ("trl",), "sampler": ("transformers", "vllm"), "weight-sync": ("vllm",)}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    from maxent_jax.bench.presets import PRESETS

    parser = flag_spelling.ArgumentParser(prog="python -m maxent_jax.bench", description=__doc__.splitlines()[0])
    parser.add_argument("target", choices=TARGETS)
    parser.add_argument("--preset", default="tiny", choices=PRESETS, help="model and batch shape (default: tiny)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per side after one warm-up (default: 5)")
    parser.add_argument("--json", help="also write the report as JSON to this path")
    parser.add_argument("--vs", choices=("trl", "transformers", "vllm"),
                        help="peer measured in the same invocation, runs alternated with ours")
    parser.add_argument("--size", type=float, help="weight-sync: model size in millions of parameters (random weights)")
    parser.add_argument("--vllm-python", help="the vLLM environment's python (default: $VLLM_PYTHON or .venv-vllm)")
    parser.add_argument("--torch-threads", type=int,
                        help="torch peers: intra-op threads (default: torch's own, the core count)")
    parser.add_argument("--init", choices=("eager", "sharded"), default="eager",
                        help="update: build the model eagerly, or with the jitted born-sharded initialiser "
                             "(default: eager)")
    parser.add_argument("--model", action="append", default=[], metavar="FIELD=VALUE",
                        help="update, sampler: change a field of the preset's ModelConfig, e.g. attention=cudnn "
                             "(repeatable)")
    parser.add_argument("--lora", type=int, metavar="RANK",
                        help="update: also time LoRA adapters of this rank on every projection, beside full fine-tuning; "
                             "weight-sync: also time adapter-only pushes of this rank, beside full pushes")
    parser.add_argument("--lengths", choices=("skewed", "equal"),
                        help="update, train-step: packed buffers (train.packing) against the padded layout, "
                             "alternating, on this completion-length mix (docs/benchmarks.md)")
    parser.add_argument("--pack-length", type=int, default=0,
                        help="--lengths: buffer tokens (default 0: chosen per step, train.pack_length=0)")
    parser.add_argument("--max-steps", type=int, help="e2e: give up after this many RL steps (default: the config's)")
    parser.add_argument("--rollout", choices=("sampler", "server"), default="sampler",
                        help="e2e: 'server' runs a spawned jax rollout server, s = 0 and --max-staleness alternately")
    parser.add_argument("--max-staleness", type=int, help="e2e --rollout server: the asynchronous side's s (default 1)")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        raise UserError(f"--repeats {args.repeats} is invalid; expected an integer >= 1")
    if args.vs is not None and args.vs not in PEERS.get(args.target, ()):
        valid = ", ".join(PEERS.get(args.target, ())) or "none"
        raise UserError(f"--vs {args.vs} is not a peer of target {args.target}; valid: {valid}")
    if args.init != "eager" and args.target != "update":
        raise UserError(f"--init {args.init} is for the update target only")
    if args.lengths and args.target not in ("update", "train-step"):
        raise UserError(f"--lengths {args.lengths} is for the update and train-step targets only")
    if args.lengths and args.vs:
        raise UserError(f"--vs {args.vs} and --lengths {args.lengths} are separate measurements; choose one")
    if args.pack_length < 0 or (args.pack_length and not args.lengths):
        raise UserError(f"--pack-length {args.pack_length} is invalid; a token count >= 0 with --lengths only")
    if args.model and args.target not in ("update", "sampler"):
        raise UserError(f"--model {args.model[0]} is for the update and sampler targets only")
    if args.lora is not None and (args.target not in ("update", "weight-sync") or args.lora < 1):
        raise UserError(f"--lora {args.lora} is invalid; it is a rank >= 1 for the update and weight-sync targets only")
    if args.size is not None and (args.target != "weight-sync" or not args.size > 0):
        raise UserError(f"--size {args.size} is invalid; it is a positive size in M params for weight-sync only")
    if (args.rollout != "sampler" or args.max_staleness is not None) and args.target != "e2e":
        raise UserError("--rollout and --max-staleness are for the e2e target only")
    if args.max_staleness is not None and args.rollout != "server":
        raise UserError(f"--max-staleness {args.max_staleness} needs --rollout server (the in-process sampler cannot overlap)")
    return args


def run(args: argparse.Namespace):
    """Dispatch to the target's module (each imports what it needs only when chosen)."""
    from maxent_jax.bench.presets import get_preset, with_model_fields

    preset = with_model_fields(get_preset(args.preset), args.model)
    if args.target == "sampler":
        from maxent_jax.bench.sampler import run_sampler

        return run_sampler(preset, args.repeats, args.vs, args.vllm_python, args.torch_threads)
    if args.target == "update" and args.lengths:
        from maxent_jax.bench.packing import run_packed_update

        return run_packed_update(preset, args.repeats, args.lengths, args.pack_length)
    if args.target == "update":
        from maxent_jax.bench.update import run_update

        return run_update(preset, args.repeats, args.init, args.lora or 0)
    if args.target == "weight-sync":
        from maxent_jax.bench.weight_sync import run_weight_sync

        return run_weight_sync(preset, args.repeats, args.size, args.vs, args.vllm_python, args.lora or 0)
    if args.target == "train-step" and args.lengths:
        from maxent_jax.bench.packing import run_packed_train_step

        return run_packed_train_step(preset, args.repeats, args.lengths, args.pack_length)
    if args.target == "train-step":
        from maxent_jax.bench.train_step import run_train_step

        return run_train_step(preset, args.repeats, args.vs, args.torch_threads)
    if args.rollout == "server":
        from maxent_jax.bench.e2e_async import run_e2e_async

        return run_e2e_async(args.max_steps, 1 if args.max_staleness is None else args.max_staleness, args.repeats)
    from maxent_jax.bench.e2e import run_e2e

    return run_e2e(args.max_steps)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("WANDB_MODE", "disabled")
    report = run(args)
    print(report.table(), flush=True)
    if args.json:
        report.write_json(args.json)
        print(f"wrote {args.json}", file=sys.stderr)


if __name__ == "__main__":
    exit_on_user_error(main)
