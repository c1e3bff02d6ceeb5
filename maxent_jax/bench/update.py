"""`update` target: the jitted, sharded loss + grad + optimizer step alone, in tokens/s and MFU.

The step is `parallel.train_step.make_train_step` with the next-token loss on the completion
columns of a score batch (prompt `prompt_len` + completion `new_tokens` tokens per row, rows =
prompts x G of the preset) and the config's AdamW with gradient clipping. The model processes
every position, so tokens/s counts rows x (prompt_len + new_tokens).

    FLOPs per step = rows * seq * training_flops_per_token(seq)        (parallel/flops.py)
    MFU            = FLOPs per step / time / (peak bf16 FLOP/s x devices)  on a known GPU
    fraction of measured rate = FLOPs per step / time / probe GFLOP/s      (fp32 on CPU, bf16 on GPU; probe.py)

`--lora R` adds a second side in the same alternation: the same model and batch with rank-R
adapters on every projection (`model/lora.py`), the base frozen in the step's pass-through state.
Its figures are the step time and the optimizer-state bytes beside full fine-tuning's (the FLOP
figures stay those of full fine-tuning).
"""

from __future__ import annotations

import functools
import time

from maxent_jax.bench.presets import Preset
from maxent_jax.bench.probe import matmul_probe, peak_flops, probe_label
from maxent_jax.bench.report import Figure, Report
from maxent_jax.bench.timing import alternate, progress, timed

TOKENS = "ours: update"


def model_flops(preset: Preset, seq_len: int, training: bool) -> float:
    """Model FLOPs per token of the preset's decoder (parallel/flops.py, PaLM convention)."""
    from maxent_jax.parallel.flops import decoder_flops_per_token

    m = preset.model
    return decoder_flops_per_token(vocab_size=m.vocab_size, hidden_size=m.hidden_size,
                                   intermediate_size=m.intermediate_size, num_layers=m.num_layers,
                                   num_heads=m.num_heads, num_kv_heads=m.num_kv_heads, head_dim=m.head_dim,
                                   seq_len=seq_len, training=training)


def score_batch(preset: Preset) -> dict:
    """A micro-batched `[1, rows, ...]` score batch of the preset's shape (random ordinary tokens)."""
    import numpy as np

    from maxent_jax.scoring import build_score_batch

    rng = np.random.default_rng(1)
    prompts = [p for p in preset.prompt_ids() for _ in range(preset.generations)]
    completions = rng.integers(3, preset.model.vocab_size, (preset.rows, preset.new_tokens)).tolist()
    batch = build_score_batch(prompts, completions, prompt_len=preset.prompt_len, completion_len=preset.new_tokens,
                              pad_id=preset.model.pad_token_id or 0)
    return {k: v[None] for k, v in batch.items() if k != "behaviour_logp"}


def _state_bytes(tree) -> int:
    import jax

    return sum(x.nbytes for x in jax.tree.leaves(tree) if hasattr(x, "nbytes"))


def run_update(preset: Preset, repeats: int, init: str = "eager", lora_rank: int = 0) -> Report:
    import jax
    from flax import nnx

    from maxent_jax.config import get_base_config
    from maxent_jax.model.decoder import Decoder
    from maxent_jax.optimizer import make_optimizer
    from maxent_jax.parallel.mesh import make_mesh
    from maxent_jax.parallel.next_token_loss import next_token_loss
    from maxent_jax.parallel.train_step import (
        init_sharded_model,
        init_train_state,
        make_train_step,
    )

    if preset.name == "qwen2_5_1_5b" and jax.devices()[0].platform == "cpu":
        from maxent_jax.errors import UserError

        raise UserError("--preset qwen2_5_1_5b needs GPUs (1.5B parameters plus AdamW state in bf16/fp32); "
                        "on a CPU use --preset tiny or small")
    mesh = make_mesh((1, -1, 1))
    seq = preset.prompt_len + preset.new_tokens
    report = Report("update", preset.name, repeats,
                    {**preset.describe(), "seq": seq, "mesh": dict(mesh.shape), "loss": "next-token (completion columns)",
                     "optimizer": "clip + AdamW (config defaults)", "attention": preset.model.attention,
                     "remat": preset.model.remat_policy if preset.model.remat else "off"})
    start = time.perf_counter()
    # Eager construction (the default) suits every preset: each fits one device, and
    # init_train_state then places the params by the rules. `--init sharded` times the jitted,
    # born-sharded initialiser a model too large for one device needs.
    if init == "sharded":
        graphdef, params, rest = init_sharded_model(lambda rngs: Decoder(preset.model, rngs=rngs), mesh)
    else:
        graphdef, params, rest = nnx.split(Decoder(preset.model, rngs=nnx.Rngs(0)), nnx.Param, ...)
    jax.block_until_ready(params)
    init_seconds = time.perf_counter() - start
    report.setup["init"] = f"{init}: {init_seconds:.1f} s (compile included)"
    progress(f"model initialised ({init})", start)
    optimizer, _ = make_optimizer(get_base_config().optim, 1000)
    state = init_train_state(params, optimizer, mesh)
    chunk = preset.logprob_chunk_size or preset.new_tokens
    step = make_train_step(graphdef, rest, state, optimizer, functools.partial(next_token_loss, chunk_size=chunk), mesh)
    batch = jax.device_put(score_batch(preset))
    holder = {"state": state}
    progress("model and optimizer state initialised; the first step compiles", start)

    def run() -> dict[str, float]:
        def one():
            holder["state"], metrics = step(holder["state"], batch)
            return float(metrics["loss"])  # blocks on the step

        seconds, _ = timed(one)
        return {TOKENS: preset.rows * seq / seconds, "ours: update step time": seconds}

    first = run()["ours: update step time"]
    report.setup["first step"] = f"{first:.1f} s (compile included)"
    report.setup["optimizer state bytes"] = _state_bytes(state.opt_state)
    progress("first step done", start)
    runs, units = {"ours": run}, {TOKENS: "tokens/s", "ours: update step time": "s"}
    if lora_rank:
        # The full side's step donated its parameters: the LoRA base is a copy of the current ones.
        base = jax.tree.map(lambda x: x.copy(), holder["state"].params)
        runs["lora"] = _lora_side(graphdef, base, rest, optimizer, preset, batch, mesh, lora_rank, report)
        units["ours LoRA: update step time"] = "s"
        progress("LoRA side compiled", start)
    for figure in alternate(runs, repeats, units, warmup=0):
        report.add(figure)
    if lora_rank:
        report.ratio("LoRA / full update step time", "ours LoRA: update step time", "ours: update step time")
    flops_per_step = preset.rows * seq * model_flops(preset, seq, training=True)
    seconds = report.figure("ours: update step time").median
    report.setup["model_flops_per_step"] = f"{flops_per_step:.3e}"
    achieved = flops_per_step / seconds
    report.add(Figure("achieved model FLOP/s", "GFLOP/s", [flops_per_step / s / 1e9 for s in report.figure(
        "ours: update step time").samples], report.figure(TOKENS).load))
    kind = report.machine["device_kind"]
    peak = peak_flops(kind)
    if peak is not None:
        report.ratios["MFU"] = achieved / (peak * report.machine["device_count"])
        report.notes.append(f"MFU against {peak / 1e12:.0f} TFLOP/s dense bf16 per {kind}")
    else:
        report.notes.append(f"no spec-sheet peak for device kind {kind!r}: MFU not reported")
    probe = report.add(matmul_probe())
    report.ratios[f"fraction of measured {probe_label()} rate"] = achieved / 1e9 / probe.median
    return report


def _lora_side(graphdef, params, rest, optimizer, preset: Preset, batch, mesh, rank: int, report: Report):
    """The LoRA twin of the update step (same base weights, adapters of `rank` on every projection),
    compiled and run once; returns its timed run."""
    from flax import nnx

    from maxent_jax.model.lora import LoRAParam, LoRASettings, apply_lora, resolve_targets
    from maxent_jax.parallel.next_token_loss import next_token_loss
    from maxent_jax.parallel.train_step import init_train_state, make_train_step

    model = apply_lora(nnx.merge(graphdef, params, rest), LoRASettings(rank, 2.0 * rank, resolve_targets("all-linear")),
                       seed=0)
    lora_graphdef, adapters, base = nnx.split(model, LoRAParam, ...)
    state = init_train_state(adapters, optimizer, mesh)
    chunk = preset.logprob_chunk_size or preset.new_tokens
    step = make_train_step(lora_graphdef, base, state, optimizer, functools.partial(next_token_loss, chunk_size=chunk),
                           mesh)
    holder = {"state": state}

    def run() -> dict[str, float]:
        def one():
            holder["state"], metrics = step(holder["state"], batch)
            return float(metrics["loss"])

        seconds, _ = timed(one)
        return {"ours LoRA: update step time": seconds}

    report.setup["LoRA first step"] = f"{run()['ours LoRA: update step time']:.1f} s (compile included)"
    report.setup["LoRA"] = f"rank {rank}, alpha {2 * rank}, all-linear: {_state_bytes(adapters)} adapter bytes"
    report.setup["LoRA optimizer state bytes"] = _state_bytes(state.opt_state)
    return run
