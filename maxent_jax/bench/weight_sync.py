"""`weight-sync` target: live params -> HF-named host tensors -> `POST /weights` of a rollout server.

A real server runs in a child process on loopback (`python -m maxent_jax.serve --backend jax`,
and with `--vs vllm` a `--backend vllm` one in the vLLM environment), started on an export of
the same weights. One run = one whole push through `RolloutClient.push_params`: cast (and, in
the HF layout, layout change) on device, one tensor at a time to the host, streamed in the
safetensors framing, validated and applied atomically by the server, answered. GB/s = tensor
bytes / wall time. Every push figure names the layout it was pushed in: the client's own
choice (`native` for the jax server, which offers it; `hf` for vLLM, which does not), and, for
the jax backend, the HF layout as well (to a second jax server), in the same alternation, as
the figure to compare with.
Each push is also split into its phases (`push_run`). Two more figures bound it from either
side: the conversion alone (params -> host tensors of each layout, no network), and the push
of HF host tensors converted beforehand (transport + server alone).

`--lora R` adds adapter-only pushes (rollout/adapters.py): rank-R adapters on every projection
of the same model, pushed as PEFT tensors to a server holding the base (a jax server of its own,
and with `--vs vllm` a vLLM server started with LoRA on), in the same alternation as the full
pushes: bytes and seconds per push, the adapters' host conversion included.

`--size M` replaces the preset's model by a random Qwen2 of about M million parameters:
blocks of width 1024 (16 heads of 64, 4 kv heads, MLP 2816, ~11.3M each), vocabulary 512.
"""

from __future__ import annotations

import secrets
import sys
import tempfile
import threading
from pathlib import Path

from maxent_jax.bench.child import ChildProcess
from maxent_jax.bench.presets import Preset
from maxent_jax.bench.report import Report
from maxent_jax.bench.timing import Run, alternate, timed

READY = "rollout server ready at "
_BLOCK = dict(hidden_size=1024, num_heads=16, num_kv_heads=4, head_dim=64, intermediate_size=2816)


def sized_model(size_m: float):
    """A Qwen2 config of about `size_m` million parameters (at least one block)."""
    from maxent_jax.model.config import ModelConfig

    d, f = _BLOCK["hidden_size"], _BLOCK["intermediate_size"]
    q, kv = _BLOCK["num_heads"] * _BLOCK["head_dim"], _BLOCK["num_kv_heads"] * _BLOCK["head_dim"]
    per_block = d * (q + 2 * kv) + q * d + 3 * d * f
    embed = 512 * d
    layers = max(1, round((size_m * 1e6 - embed) / per_block))
    return ModelConfig.tiny(num_layers=layers, **_BLOCK)


class ServerProcess(ChildProcess):
    """`python -m maxent_jax.serve` in a child process on 127.0.0.1, a free port and a fresh token."""

    def __init__(self, python: str, backend: str, model_dir: Path, workdir: Path, extra: tuple[str, ...] = ()):
        from maxent_jax.cli import REPO_ROOT

        self.token = secrets.token_hex(16)
        # One file per server: two jax servers run side by side in one workdir.
        token_file = workdir / f"token-{backend}-{self.token[:8]}"
        token_file.write_text(self.token)
        env = {"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu",
               "VLLM_LOGGING_LEVEL": "WARNING", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        super().__init__([python, "-m", "maxent_jax.serve", "--backend", backend, "--model", str(model_dir),
                          "--host", "127.0.0.1", "--port", "0", "--token-file", str(token_file),
                          "--log-level", "WARNING", *extra], env)
        line = next((text for text in self.proc.stdout if text.startswith(READY)), "")  # vLLM logs to stdout too
        if not line:
            raise self.startup_error(f"{backend} rollout server")
        self.url = line[len(READY):].strip()
        # Keep reading stdout: an undrained pipe would block a server that logs there.
        threading.Thread(target=lambda: [None for _ in self.proc.stdout], daemon=True).start()

PHASES = ("convert", "send", "server finish", "server apply")


def push_run(server: ServerProcess, params, cfg, name: str, layout: str | None = None) -> Run:
    """One whole `push_params`: GB/s, seconds, and the seconds of each phase of that push.

    `layout` None lets the client choose from the server's /info (what a trainer does); the
    figures are named `<name> [<layout pushed>]`.

    convert: producing the HF host tensors (the client's iterator); send: framing and writing
    the stream, which includes the server receiving, validating and preparing each tensor as
    it arrives (the socket blocks until the server has read); server finish: after the last
    byte, the server completing its reads and tensor preparation, and the HTTP answer; server
    apply: the server's swap under its lock. The four add up to the push time (up to
    connection set-up).
    """
    from maxent_jax.rollout.client import RolloutClient

    client = RolloutClient(server.url, token=server.token, timeout=600.0, max_retries=1)
    dtype = client.info()["dtype"]

    def run() -> dict[str, float]:
        stats = client.push_params(params, cfg, dtype=dtype, layout=layout)
        label = f"{name} [{stats['layout']}]"
        return {f"{label}: push": stats["gb_per_s"], f"{label}: push time": stats["seconds"],
                f"{label}: push bytes": stats["bytes"],
                **{f"{label}: phase {phase}": stats[f"{phase.replace(' ', '_')}_seconds"] for phase in PHASES}}

    return run


def adapter_run(server: ServerProcess, model, settings, name: str) -> Run:
    """One adapter-only push of `model`'s adapters (PEFT tensors fetched to the host, then pushed) onto the
    base the server holds: seconds (conversion included) and bytes, what a LoRA trainer's push costs."""
    from maxent_jax.model.lora_io import peft_tensors
    from maxent_jax.rollout.adapters import AdapterSpec
    from maxent_jax.rollout.client import RolloutClient

    client = RolloutClient(server.url, token=server.token, timeout=600.0, max_retries=1)
    spec = AdapterSpec(settings.rank, settings.alpha, settings.targets, client.info()["base_id"])

    def run() -> dict[str, float]:
        seconds, stats = timed(lambda: client.push_adapter(peft_tensors(model), spec))
        return {f"{name} [lora]: push time": seconds, f"{name} [lora]: push bytes": stats["bytes"]}

    return run


def transport_run(server: ServerProcess, params, cfg, name: str) -> Run:
    """The same push from HF host tensors converted beforehand: transport + server alone.

    What a push reaches once conversion costs nothing (the whole model is held on the host
    here, which a trainer's push never does).
    """
    from maxent_jax.model.hf_io import iter_hf_tensors
    from maxent_jax.rollout.client import RolloutClient

    client = RolloutClient(server.url, token=server.token, timeout=600.0, max_retries=1)
    dtype = client.info()["dtype"]
    tensors = [(hf_name, tensor.copy()) for hf_name, tensor in iter_hf_tensors(params, cfg, dtype)]

    def run() -> dict[str, float]:
        return {f"{name} [hf]: push from host tensors": client.push_weights(tensors)["gb_per_s"]}

    return run


def convert_run(params, cfg, native: bool) -> Run:
    from maxent_jax.model.hf_io import iter_hf_tensors

    def run() -> dict[str, float]:
        tensors = iter_hf_tensors(params, cfg, cfg.param_dtype, native=native)
        seconds, nbytes = timed(lambda: sum(t.nbytes for _, t in tensors))
        return {f"convert only: params -> {'native' if native else 'HF'} host tensors": nbytes / 1e9 / seconds}

    return run


def _units(servers: tuple[str, ...]) -> dict[str, str]:
    units = {"convert only: params -> HF host tensors": "GB/s", "convert only: params -> native host tensors": "GB/s"}
    for server in servers:
        for name in (f"{server} [hf]", f"{server} [native]", f"{server} [lora]"):
            units.update({f"{name}: push": "GB/s", f"{name}: push time": "s", f"{name}: push bytes": "B",
                          f"{name}: push from host tensors": "GB/s",
                          **{f"{name}: phase {phase}": "s" for phase in PHASES}})
    return units


def run_weight_sync(preset: Preset, repeats: int, size_m: float | None, vs: str | None,
                    vllm_python: str | None = None, lora_rank: int = 0) -> Report:
    from flax import nnx

    from maxent_jax.bench import peers
    from maxent_jax.model.decoder import Decoder
    from maxent_jax.parallel.flops import decoder_matmul_params

    cfg = sized_model(size_m) if size_m else preset.model
    python = str(peers.vllm_python(vllm_python)) if vs == "vllm" else None
    model = Decoder(cfg, rngs=nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    nbytes = sum(x.nbytes for x in __import__("jax").tree.leaves(params))
    report = Report("weight-sync", f"{preset.name}" if not size_m else f"--size {size_m:g}", repeats, {
        "model": f"{cfg.family} L{cfg.num_layers} D{cfg.hidden_size} V{cfg.vocab_size} {cfg.param_dtype}",
        "params_M": round(nbytes / 4 / 1e6, 2) if cfg.param_dtype == "float32" else None,
        "matmul_params_M": round(decoder_matmul_params(
            vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
            num_layers=cfg.num_layers, num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads,
            head_dim=cfg.head_dim) / 1e6, 2),
        "bytes_per_push": nbytes, "transport": "HTTP chunked on 127.0.0.1"})
    servers: list[ServerProcess] = []
    with tempfile.TemporaryDirectory(prefix="maxent-bench-") as tmp:
        model_dir = peers.export_for_peers(model, cfg, Path(tmp) / "model")
        try:
            # The HF-layout pushes go to a second jax server: a trainer never mixes layouts on one
            # server, and an HF push's state would upset the native pushes' receive-arena reuse.
            servers += [ServerProcess(sys.executable, "jax", model_dir, Path(tmp)) for _ in range(2)]
            runs = {"convert hf": convert_run(params, cfg, native=False),
                    "convert native": convert_run(params, cfg, native=True),
                    "jax": push_run(servers[0], params, cfg, "jax server"),
                    "jax hf": push_run(servers[1], params, cfg, "jax server", layout="hf"),
                    "jax host": transport_run(servers[1], params, cfg, "jax server")}
            vllm_extra: tuple[str, ...] = ()
            if lora_rank:  # adapters go to servers of their own: a full push would replace their base
                lora_model, settings = _lora_model(model, lora_rank)
                report.setup["lora"] = f"rank {lora_rank}, alpha {2 * lora_rank}, all-linear"
                servers.append(ServerProcess(sys.executable, "jax", model_dir, Path(tmp)))
                runs["jax lora"] = adapter_run(servers[-1], lora_model, settings, "jax server")
                vllm_extra = ("--engine-arg", "enable_lora=true", "--engine-arg",
                              f"max_lora_rank={next(r for r in (1, 8, 16, 32, 64, 128, 256, 320, 512) if r >= lora_rank)}")
            if vs == "vllm":
                servers.append(ServerProcess(python, "vllm", model_dir, Path(tmp)))
                runs["vllm"] = push_run(servers[-1], params, cfg, "vllm server")
                runs["vllm host"] = transport_run(servers[-1], params, cfg, "vllm server")
                if lora_rank:
                    servers.append(ServerProcess(python, "vllm", model_dir, Path(tmp), vllm_extra))
                    runs["vllm lora"] = adapter_run(servers[-1], lora_model, settings, "vllm server")
            for figure in alternate(runs, repeats, _units(("jax server", "vllm server"))):
                report.add(figure)
            report.ratio("jax server: native / hf layout push", "jax server [native]: push", "jax server [hf]: push")
            if lora_rank:
                report.ratio("jax server: full (native) / adapter push time", "jax server [native]: push time",
                             "jax server [lora]: push time")
                if vs == "vllm":
                    report.ratio("vllm server: full / adapter push time", "vllm server [hf]: push time",
                                 "vllm server [lora]: push time")
        finally:
            for server in servers:
                server.close()
    report.notes.append("goal: >= 2 GB/s on loopback")
    report.notes.append("[layout]: the layout pushed; unforced, the client pushes native where the server offers it "
                        "(jax backend), else hf (vllm)")
    return report


def _lora_model(model, rank: int):
    """A copy of `model` with rank-`rank` adapters (alpha 2 rank) on every projection, B random (not 0)."""
    import jax
    from flax import nnx

    from maxent_jax.model.lora import LoRAParam, LoRASettings, apply_lora, resolve_targets

    settings = LoRASettings(rank, 2.0 * rank, resolve_targets("all-linear"))
    lora_model = apply_lora(nnx.clone(model), settings, seed=0)
    key = jax.random.key(1)
    for i, (_, var) in enumerate(nnx.iter_graph(lora_model)):
        if isinstance(var, LoRAParam):
            var.set_value(0.01 * jax.random.normal(jax.random.fold_in(key, i), var.shape, var.dtype))
    return lora_model, settings
