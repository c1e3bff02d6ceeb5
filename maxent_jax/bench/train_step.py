"""`train-step` target: completion tokens/s of one full RL step of our trainer (vs TRL's GRPOTrainer).

Ours is `Trainer.train_step()` on the default config with the preset's model and batch, EOS
ignored (every completion full length), no supervised warm-up, no evaluation or checkpoints:
prompt stream -> in-process sampler -> rewards -> reference log-probs -> objective weights ->
sharded update -> controllers. Tokens/s = completion tokens of the step / its wall time, for
both sides alike. The peer (`--vs trl`) trains the same initial weights on the same prompts.

Model FLOPs of one step (the same work on both sides, parallel/flops.py convention):

    rollout    P * Tp * fwd(Tp) + rows * Tc * fwd(Tp + Tc)     (prefill, decode)
    reference  rows * S * fwd(S)                                S = Tp + Tc
    update     rows * S * train(S)

and "fraction of measured fp32 matmul rate" = FLOPs / median step time / probe GFLOP/s (the probe
is a bf16 matmul on a GPU: "bf16 matmul rate").
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path
from typing import Callable

from maxent_jax.bench.presets import Preset, default_config
from maxent_jax.bench.probe import matmul_probe, probe_label
from maxent_jax.bench.report import Figure, Report
from maxent_jax.bench.timing import alternate, timed
from maxent_jax.config import set_fields
from maxent_jax.bench.update import model_flops

OURS, OURS_S = "ours: RL step", "ours: RL step time"
TRL, TRL_S = "trl: GRPOTrainer step", "trl: GRPOTrainer step time"


def bench_config(preset: Preset):
    """The default config with the preset's shapes; full-length completions; nothing but steps."""
    c = default_config()
    set_fields(c, preset.config_overrides)
    c.rollout.ignore_eos = True
    c.train.sft_warmup_steps = 0
    c.eval.do_eval = False
    c.checkpoint.export_final = False
    c.logging.wandb = "disabled"
    return c


def step_flops(preset: Preset, prompt_len: int) -> float:
    tc, seq = preset.new_tokens, prompt_len + preset.new_tokens
    rollout = (preset.prompts * prompt_len * model_flops(preset, prompt_len, False)
               + preset.rows * tc * model_flops(preset, seq, False))
    reference = preset.rows * seq * model_flops(preset, seq, False)
    update = preset.rows * seq * model_flops(preset, seq, True)
    return rollout + reference + update


# Trainer attributes timed as the step's phases (each is called once per RL step): label, and
# whether the result is device arrays to wait for. The others return host data (lists, numpy), which
# are ready on return; walking their thousands of leaves to wait on them would cost milliseconds per
# step and slow the very step being timed.
PHASES = {"generate": ("rollout: sampler", False), "rewards": ("rewards", False),
          "reference_logprobs": ("reference log-probs", False), "rl_step": ("update (jitted step)", True),
          "update_controllers": ("controllers", True)}


def time_phases(trainer) -> tuple[dict[str, list[float]], Callable[[], None]]:
    """Wrap the trainer's phase callables (on the instance only) to record their wall seconds.

    Returns the per-phase seconds and a function that puts the original attributes back.
    """
    import jax

    seconds: dict[str, list[float]] = {label: [] for label, _ in PHASES.values()}
    originals = {attr: getattr(trainer, attr) for attr in PHASES}

    def wrap(attr: str, label: str, on_device: bool):
        inner = getattr(trainer, attr)
        call = (lambda *a, **k: jax.block_until_ready(inner(*a, **k))) if on_device else inner

        def timed_call(*args, **kwargs):
            elapsed, out = timed(lambda: call(*args, **kwargs))
            seconds[label].append(elapsed)
            return out

        setattr(trainer, attr, timed_call)

    def restore() -> None:
        for attr, value in originals.items():
            setattr(trainer, attr, value)

    for attr, (label, on_device) in PHASES.items():
        wrap(attr, label, on_device)
    return seconds, restore


def run_train_step(preset: Preset, repeats: int, vs: str | None, torch_threads: int | None = None) -> Report:
    import jax
    import jax.numpy as jnp

    from maxent_jax.bench import peers
    from maxent_jax.data.stream import BatchStream
    from maxent_jax.errors import UserError
    from maxent_jax.run_setup import decode_streams
    from maxent_jax.trainer import Trainer

    if preset.name == "qwen2_5_1_5b":
        raise UserError("--preset qwen2_5_1_5b is for the update and sampler targets on a GPU; use tiny or small for train-step")
    if vs == "trl":
        peers.require("trl")
    config = bench_config(preset)
    with tempfile.TemporaryDirectory(prefix="maxent-bench-") as tmp:
        trainer = Trainer(config, Path(tmp) / "run")
        trainer.reference_params = jax.tree.map(jnp.copy, trainer.state.params)
        phases, restore = time_phases(trainer)
        prompt_len = statistics.mean(len(r["prompt_ids"]) for r in trainer.task.train)
        report = Report("train-step", preset.name, repeats, {
            **preset.describe(), "prompt_len": f"{prompt_len:.1f} (mean, synthetic task)",
            "objective": "grpo" if config.objective.train_grpo_objective else "maxent",
            "beta": config.objective.beta, "remat": config.model.remat,
            "gradient_chunks": config.train.gradient_chunks, "mesh": dict(trainer.mesh.shape),
            "decode_streams": decode_streams(config.rollout.decode_streams, trainer.mesh)})
        report.setup.pop("prompt_len", None)
        report.setup["prompt_tokens_mean"] = round(prompt_len, 1)

        def ours() -> dict[str, float]:
            seconds, metrics = timed(trainer.train_step)
            tokens = metrics["train/completions/mean_length_sampled"] * preset.rows
            return {OURS: tokens / seconds, OURS_S: seconds}

        runs = {"ours": ours}
        units = {OURS: "tokens/s", OURS_S: "s", TRL: "tokens/s", TRL_S: "s"}
        peer = None
        try:
            if vs == "trl":
                from maxent_jax.bench.trl_peer import TrlPeer
                from maxent_jax.rewards import RewardScorer

                # The prompts our stream will serve, in order (a twin stream with the same seed).
                twin = BatchStream(trainer.task.train, trainer.num_prompts, config.seed)
                rows = [r for _ in range(repeats + 2) for r in twin.next()]
                model = peers.export_for_peers(_policy_module(trainer), trainer.policy.model_cfg, Path(tmp) / "model",
                                               tokenizer_dir=trainer.policy.tokenizer_dir)
                scorer = RewardScorer(config.rewards.reward_funcs, config.rewards.reward_weights, num_workers=None)
                peer = TrlPeer(model, [r["prompt"] for r in rows], [r["answer"] for r in rows], preset,
                               beta=config.objective.beta, learning_rate=config.optim.learning_rate,
                               gradient_checkpointing=config.model.remat, scorer=scorer,
                               torch_threads=torch_threads)
                runs["trl"] = peer.run(TRL, TRL_S)
                report.add_package_versions(["torch", "transformers", "trl"])
                report.setup["torch_threads"] = _torch_threads()
                report.setup["trl_gradient_checkpointing"] = peer.trainer.args.gradient_checkpointing
            for figure in alternate(runs, repeats, units):
                report.add(figure)
        finally:
            if peer is not None:
                peer.close()
            restore()
            trainer.close()
    for label, values in phases.items():
        counted = values[-repeats:]  # the warm-up call (compilation) is not counted
        if counted:
            report.add(Figure(f"ours phase: {label}", "s", counted, report.figure(OURS).load))
    if vs == "trl":
        report.ratio("ours / trl (tokens/s)", OURS, TRL)
    flops = step_flops(preset, prompt_len)
    report.setup["model_flops_per_step"] = f"{flops:.3e}"
    probe = report.add(matmul_probe())
    report.ratios[f"ours: fraction of measured {probe_label()} rate"] = (
        flops / report.figure(OURS_S).median / 1e9 / probe.median)
    if vs == "trl":
        report.ratios[f"trl: fraction of measured {probe_label()} rate"] = (
            flops / report.figure(TRL_S).median / 1e9 / probe.median)
    return report


def _policy_module(trainer):
    from flax import nnx

    return nnx.merge(trainer.policy.graphdef, trainer.state.params, trainer.policy.rest)


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()
