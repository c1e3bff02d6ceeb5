"""`update --lengths skewed|equal`: the RL update on packed buffers against the padded layout
(`train-step --lengths`: whole RL steps, `run_packed_train_step`).

Both sides run the same jitted train step (the default objective, MaxEnt, through `policy.rl_loss`
with `model.score_prompt_once`, clip + AdamW) on the same completions; the packed side adds the
`train.packing` buffers (`maxent_jax.packing`). Runs alternate (padded, packed, padded, ...).
The packed side's time includes the host's packing (choosing the buffer length and filling the
buffers); with the automatic length a step may keep the padded layout, and then both sides run the
same program. Throughput counts real tokens, the same number on both sides: every row's prompt and completion
tokens (what the padded layout's attention mask holds), so `packed_vs_padded` is the speed ratio.

Completion lengths (`completion_lengths`), for `rows` completions of at most `max_len` tokens:
    skewed: max(1, round(rows / 16)) completions at max_len, the rest
            clip(round(exp(N(ln(max_len / 6.4), 0.6^2))), 1, max_len - 1), shuffled (seeded): a
            log-normal body whose mean is about max_len / 5.3 and a tail at the maximum, so the
            mean is about a quarter of the maximum (15.1 of 64 for the small preset's 16 rows);
    equal:  every completion max_len tokens (nothing to remove: the no-gain case).
"""

from __future__ import annotations

import time

import numpy as np

from maxent_jax.bench.presets import Preset
from maxent_jax.bench.report import Report
from maxent_jax.bench.timing import alternate, progress, timed

LENGTHS = ("skewed", "equal")


def completion_lengths(kind: str, rows: int, max_len: int, seed: int = 0) -> np.ndarray:
    """The benchmark's completion lengths (module docstring)."""
    if kind == "equal":
        return np.full(rows, max_len)
    rng = np.random.default_rng(seed)
    at_max = max(1, round(rows / 16))
    body = np.exp(rng.normal(np.log(max_len / 6.4), 0.6, rows - at_max))
    lengths = np.concatenate([np.full(at_max, max_len), np.clip(np.round(body), 1, max_len - 1)])
    return rng.permutation(lengths).astype(int)


def step_arrays(preset: Preset, lengths: np.ndarray) -> dict[str, np.ndarray]:
    """Grouped `[P, G, ...]` score rows of the preset with these completion lengths, plus MaxEnt's arrays."""
    import jax.numpy as jnp

    from maxent_jax.objectives.maxent import prepare_maxent_batch
    from maxent_jax.scoring import bucket, build_score_batch

    rng = np.random.default_rng(1)
    prompts = [p for p in preset.prompt_ids() for _ in range(preset.generations)]
    completions = [list(rng.integers(3, preset.model.vocab_size, n)) for n in lengths]
    rows = build_score_batch(prompts, completions, prompt_len=preset.prompt_len,
                             completion_len=bucket(int(lengths.max()), 8, preset.new_tokens), pad_id=0)
    p, g = preset.prompts, preset.generations
    grouped = {k: v.reshape(p, g, *v.shape[1:]) for k, v in rows.items()}
    mask = grouped["completion_mask"].astype(bool)
    valid = np.ones((p, g), bool)
    utilities = rng.integers(0, 2, (p, g)).astype(np.float32)
    ref = np.where(mask, -rng.random(mask.shape) * 4, 0.0).astype(np.float32)
    weights, _ = prepare_maxent_batch(jnp.asarray(utilities), jnp.asarray(valid), jnp.asarray(ref.sum(-1)),
                                      jnp.asarray(mask.sum(-1)), 0.1, 0.04, q_temperature=1.0, q_epsilon=1e-6)
    return {**grouped, "token_mask": mask, "valid": valid, "ref_logp": ref, "weights": np.asarray(weights)}


def run_packed_update(preset: Preset, repeats: int, lengths_kind: str, pack_length: int = 0) -> Report:
    import jax
    from flax import nnx

    from maxent_jax.config import get_base_config
    from maxent_jax.model.decoder import Decoder
    from maxent_jax.objectives import ObjectiveSettings, get_objective
    from maxent_jax.optimizer import make_optimizer
    from maxent_jax.packing import Costs, Packer
    from maxent_jax.parallel.mesh import make_mesh
    from maxent_jax.parallel.train_step import init_train_state, make_train_step
    from maxent_jax.policy import rl_loss

    if preset.name == "qwen2_5_1_5b" and jax.devices()[0].platform == "cpu":
        from maxent_jax.errors import UserError

        raise UserError("--preset qwen2_5_1_5b needs GPUs; on a CPU use --preset tiny or small")
    start = time.perf_counter()
    mesh = make_mesh((1, -1, 1))
    devices = mesh.shape["data"] * mesh.shape["fsdp"]
    lengths = completion_lengths(lengths_kind, preset.rows, preset.new_tokens)
    arrays = step_arrays(preset, lengths)
    packer = Packer(pack_length, devices, costs=Costs.of(preset.model))
    packed, stats = packer(arrays)
    real = int(arrays["attention_mask"].sum())
    report = Report("update", preset.name, repeats, {
        **preset.describe(), "mesh": dict(mesh.shape), "lengths": lengths_kind,
        "completion lengths": " ".join(map(str, lengths)), "mean completion": float(lengths.mean()),
        "loss": "MaxEnt (rl_loss, score_prompt_once) + clip + AdamW", "attention": preset.model.attention,
        "real tokens per step": real,
        "padded layout": f"{preset.prompts} rows x {arrays['input_ids'].shape[-1] - arrays['completion_ids'].shape[-1]}"
                         f" + {preset.generations} x {arrays['completion_ids'].shape[-1]} tokens",
        "packed layout": (f"{packed['buffer_ids'].shape[0]} buffers x {packed['buffer_ids'].shape[1]} tokens, "
                          f"head {packed['buffer_predict'].shape[1]}, fill {stats['pack/fill']:.2f}") if packed
                         else "none: the padded layout is estimated cheaper (--pack-length forces buffers)"})
    graphdef, params, rest = nnx.split(Decoder(preset.model, rngs=nnx.Rngs(0)), nnx.Param, ...)
    optimizer, _ = make_optimizer(get_base_config().optim, 1000)
    loss = rl_loss(get_objective("maxent"), ObjectiveSettings(), preset.logprob_chunk_size, score_prompt_once=True)
    sides = {"padded": arrays, "packed": {**arrays, **packed}}
    steps, holders, batches = {}, {}, {}
    for side, side_arrays in sides.items():
        state = init_train_state(params, optimizer, mesh)
        steps[side] = make_train_step(graphdef, rest, state, optimizer, loss, mesh)
        batches[side] = jax.device_put({k: np.asarray(v)[None] for k, v in side_arrays.items()})
        holders[side] = state
        memory = steps[side].lower(state, batches[side], {"beta": 0.04}).compile().memory_analysis()
        if memory is not None:
            report.setup[f"{side}: compiled temporaries"] = f"{memory.temp_size_in_bytes / 2**20:.1f} MiB"
    progress("both steps compiled", start)

    def runner(side: str):
        def run() -> dict[str, float]:
            def one():
                if side == "packed":  # the host's packing is part of the packed step's cost
                    packer(arrays)
                holders[side], metrics = steps[side](holders[side], batches[side], scalars={"beta": 0.04})
                return float(metrics["loss"])

            seconds, _ = timed(one)
            return {f"{side}: real tokens/s": real / seconds, f"{side}: update step time": seconds}

        return run

    units = {f"{s}: real tokens/s": "tokens/s" for s in sides} | {f"{s}: update step time": "s" for s in sides}
    for figure in alternate({side: runner(side) for side in sides}, repeats, units):
        report.add(figure)
    report.ratios["packed_vs_padded"] = (report.figure("packed: real tokens/s").median
                                         / report.figure("padded: real tokens/s").median)
    return report



def run_packed_train_step(preset: Preset, repeats: int, lengths_kind: str, pack_length: int = 0) -> Report:
    """`train-step --lengths`: whole RL steps of one trainer (`train.packing` on, automatic length unless
    `pack_length`) alternating with the packer switched off (the padded layout), on this length mix.

    The sampler decodes every completion to full length (EOS ignored, as the plain train-step target
    does); each completion is then cut to its drawn length (`completion_lengths`, a fresh draw each
    call), as if it had sampled EOS there. So both sides decode the same work and differ in the
    scoring forwards: the reference log-probs and the update. Figures: real (prompt + completion)
    tokens per second of the whole step and of those two phases, and their `packed_vs_padded` ratios.
    """
    import tempfile
    from pathlib import Path

    import jax
    import jax.numpy as jnp

    from maxent_jax.bench.train_step import bench_config
    from maxent_jax.errors import UserError
    from maxent_jax.trainer import Trainer

    if preset.name == "qwen2_5_1_5b":
        raise UserError("--preset qwen2_5_1_5b is for the update and sampler targets on a GPU; use tiny or small "
                        "for train-step")
    config = bench_config(preset)
    config.train.packing = True
    config.train.pack_length = pack_length
    start = time.perf_counter()
    calls = {"n": 0, "real": 0}
    side = {"name": "padded"}
    phase_seconds: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="maxent-bench-") as tmp:
        trainer = Trainer(config, Path(tmp) / "run")
        trainer.reference_params = jax.tree.map(jnp.copy, trainer.state.params)
        packer = trainer.packer
        generate, score_phases = trainer.generate, {"reference_logprobs": trainer.reference_logprobs,
                                                    "rl_step": trainer.rl_step}

        def cut_generate(prompt_ids, n):
            ids, logps, stopped = generate(prompt_ids, n)
            calls["n"] += 1
            lengths = completion_lengths(lengths_kind, len(ids), config.rollout.max_completion_length, seed=calls["n"])
            ids = [x[:k] for x, k in zip(ids, lengths)]
            logps = [x[:k] for x, k in zip(logps, lengths)]
            calls["real"] += int(lengths.sum()) + n * sum(len(p) for p in prompt_ids)
            return ids, logps, np.asarray(stopped) | (lengths < config.rollout.max_completion_length)

        def timed_phase(inner):
            def call(*args, **kwargs):
                seconds, out = timed(lambda: jax.block_until_ready(inner(*args, **kwargs)))
                phase_seconds[side["name"]] = phase_seconds.get(side["name"], 0.0) + seconds
                return out
            return call

        trainer.generate = cut_generate
        for attr, inner in score_phases.items():
            setattr(trainer, attr, timed_phase(inner))
        report = Report("train-step", preset.name, repeats, {
            **preset.describe(), "lengths": lengths_kind, "mesh": dict(trainer.mesh.shape),
            "objective": "grpo" if config.objective.train_grpo_objective else "maxent",
            "attention": trainer.policy.model_cfg.attention,
            "pack_length": pack_length or "automatic (per step)",
            "sides": "one trainer; padded = its packer switched off"})
        progress("trainer built", start)
        stats: dict[str, list[float]] = {"pack/packed": [], "pack/fill": [], "pack/length": []}

        def runner(name: str):
            def run() -> dict[str, float]:
                side["name"], trainer.packer = name, packer if name == "packed" else None
                phase_seconds[name], before = 0.0, calls["real"]
                seconds, metrics = timed(trainer.train_step)
                real = calls["real"] - before
                if name == "packed":
                    for key in stats:
                        stats[key].append(float(metrics.get(f"train/{key}", 0.0)))
                return {f"{name}: real tokens/s": real / seconds, f"{name}: step time": seconds,
                        f"{name}: scoring real tokens/s": real / phase_seconds[name],
                        f"{name}: reference + update time": phase_seconds[name]}

            return run

        units = {f"{s}: {k}": u for s in ("padded", "packed")
                 for k, u in (("real tokens/s", "tokens/s"), ("step time", "s"),
                              ("scoring real tokens/s", "tokens/s"), ("reference + update time", "s"))}
        try:
            for figure in alternate({name: runner(name) for name in ("padded", "packed")}, repeats, units):
                report.add(figure)
        finally:
            trainer.close()
    counted = {k: v[-repeats:] for k, v in stats.items()}
    report.setup["packed steps"] = f"{sum(counted['pack/packed']):.0f} of {repeats} on buffers"
    if any(counted["pack/packed"]):
        report.setup["buffer lengths"] = sorted({int(x) for x in counted["pack/length"] if x})
        report.setup["mean fill"] = round(float(np.mean([f for f in counted["pack/fill"] if f])), 3)
    report.ratios["packed_vs_padded"] = (report.figure("packed: real tokens/s").median
                                         / report.figure("padded: real tokens/s").median)
    report.ratios["packed_vs_padded (reference + update)"] = (report.figure("packed: scoring real tokens/s").median
                                                              / report.figure("padded: scoring real tokens/s").median)
    report.notes.append(_peak_memory_note())
    return report


def _peak_memory_note() -> str:
    """The device's peak memory where the backend reports it (a GPU's allocator); on CPU jax has none."""
    import jax

    stats = jax.devices()[0].memory_stats()
    if not stats or "peak_bytes_in_use" not in stats:
        return (f"peak device memory: unavailable on {jax.devices()[0].platform} (jax reports no memory "
                "statistics there); the update target's `compiled temporaries` are XLA's own estimate")
    return (f"peak device memory of the whole run (both sides; the allocator's peak cannot be reset between "
            f"them): {stats['peak_bytes_in_use'] / 2**20:.0f} MiB")
