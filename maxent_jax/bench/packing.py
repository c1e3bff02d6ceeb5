"""`update --lengths skewed|equal`: the RL update on packed buffers against the padded layout.

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

