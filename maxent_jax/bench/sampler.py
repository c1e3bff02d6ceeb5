"""`sampler` target: decode tokens/s of the in-process sampler vs transformers `generate` or vLLM.

Both sides get the same weights (ours, exported as an HF directory), the same prompts, G
samples per prompt, the same number of new tokens (EOS ignored) and temperature 1 over the
full vocabulary. Tokens/s = generated tokens / wall time of one whole generate call
(prefill included), as a user of either would see it. Ours runs with the trainer's decode
streams (`rollout.decode_streams` auto: 2 on a one-device CPU, 1 elsewhere).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from maxent_jax.bench.presets import Preset
from maxent_jax.bench.report import Report
from maxent_jax.bench.timing import Run, alternate, timed

OURS = "ours: sampler"


def our_run(preset: Preset, model, streams: int) -> Run:
    import jax

    from maxent_jax.rollout.backend import SamplingParams
    from maxent_jax.rollout.sampler import Sampler

    sampler, state = Sampler.for_model(model, streams=streams)
    prompts = preset.prompt_ids()
    params = SamplingParams(n=preset.generations, max_tokens=preset.new_tokens, temperature=1.0, ignore_eos=True)
    calls = iter(range(1 << 30))

    def run() -> dict[str, float]:
        key = jax.random.key(next(calls))
        seconds, out = timed(lambda: sampler.generate(state, prompts, params, key))
        return {OURS: float(out.lengths.sum()) / seconds}

    return run


def run_sampler(preset: Preset, repeats: int, vs: str | None, vllm_python: str | None = None,
                torch_threads: int | None = None) -> Report:
    from flax import nnx

    from maxent_jax.bench import peers
    from maxent_jax.model.decoder import Decoder
    from maxent_jax.run_setup import decode_streams

    if vs not in (None, "transformers", "vllm"):
        from maxent_jax.errors import UserError

        raise UserError(f"--vs {vs!r} is not a peer of the sampler target; expected transformers or vllm")
    if vs == "transformers":
        peers.require("transformers")
    python = peers.vllm_python(vllm_python) if vs == "vllm" else None
    streams = decode_streams(0, None)
    report = Report("sampler", preset.name, repeats, {**preset.describe(), "temperature": 1.0, "ignore_eos": True,
                                                        "decode_streams": streams})
    model = Decoder(preset.model, rngs=nnx.Rngs(0))
    runs = {"ours": our_run(preset, model, streams)}
    units = {OURS: "tokens/s"}
    closer = None
    with tempfile.TemporaryDirectory(prefix="maxent-bench-") as tmp:
        if vs is not None:
            model_dir = peers.export_for_peers(model, preset.model, Path(tmp) / "model")
        if vs == "transformers":
            from maxent_jax.bench.hf_peer import generate_run

            peer = "transformers: generate"
            runs[vs] = generate_run(model_dir, preset.prompt_ids(), preset.generations, preset.new_tokens,
                                    preset.model.pad_token_id or 0, preset.model.eos_token_id, peer, torch_threads,
                                    dtype=preset.model.compute_dtype)
            report.add_package_versions(["torch", "transformers"])
            import torch

            report.setup["torch_threads"] = torch.get_num_threads()
        elif vs == "vllm":
            from maxent_jax.bench.vllm_peer import VllmPeer

            peer = "vllm: engine.generate"
            engine = VllmPeer(python, model_dir, preset.prompt_ids(), preset.generations, preset.new_tokens,
                              torch_threads)
            closer = engine.close
            runs[vs] = engine.run(peer)
            report.machine["versions"]["vllm"] = engine.version
            report.setup["vllm_torch_threads"] = torch_threads or "engine default"
        if vs is not None:
            units[peer] = "tokens/s"
        try:
            for figure in alternate(runs, repeats, units):
                report.add(figure)
        finally:
            if closer is not None:
                closer()
    if vs is not None:
        report.ratio(f"ours / {vs}", OURS, peer)
    return report
