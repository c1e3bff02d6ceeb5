"""The `vllm` rollout backend: a real vLLM engine behind the rollout server's protocol.

`python -m maxent_jax.serve --backend vllm --model DIR` builds one `VLLMBackend`; it runs a
`vllm.LLM` in this process and loads pushed weights into the running model through the
worker extension in `maxent_jax.rollout.vllm_worker`. This module needs the vLLM environment
(`make vllm-env`); it imports neither jax nor anything that does, and vllm only inside the
constructor, so importing it is cheap and the server can report a missing vLLM as one line.

What was verified against a real engine, and how, is in docs/rollout.md ("vllm backend").
"""

from __future__ import annotations

import glob
import itertools
import json
import os
import shutil
import tempfile
import warnings
from typing import Any, Iterable

import numpy as np

from maxent_jax.errors import UserError
from maxent_jax.rollout.adapters import AdapterSpec
from maxent_jax.rollout.backend import Completion, SamplingParams
from maxent_jax.rollout.protocol import HF_LAYOUT, LORA_LAYOUT, ProtocolError

WORKER_EXTENSION = "maxent_jax.rollout.vllm_worker.MaxentWeightReceiver"

# What vLLM needs to run on a CPU host, as defaults a user may still override: 1 GiB of KV
# cache (the default asks for more memory than small hosts have), no TorchDynamo (the first
# log-prob request would otherwise compile for ~16 s), a loopback host IP.
_CPU_ENV_DEFAULTS = {"VLLM_CPU_KVCACHE_SPACE": "1", "TORCHDYNAMO_DISABLE": "1", "VLLM_HOST_IP": "127.0.0.1"}
# The engine must live in this process: pushed tensors are handed to the worker by reference.
_IN_PROCESS = "VLLM_ENABLE_V1_MULTIPROCESSING"

# vLLM samples greedily below this temperature (its `_SAMPLING_EPS`) and then refuses n > 1.
_GREEDY_BELOW = 1e-5

# safetensors dtype codes -> numpy dtype names (the contract's spelling).
_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def checkpoint_tensors(model_dir: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """HF name -> (shape, dtype name) of every tensor in the directory's *.safetensors files.

    Reads only the files' headers, so it is cheap for any model size.
    """
    from safetensors import safe_open

    files = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
    if not files:
        raise UserError(f"--model {model_dir!r}: no *.safetensors files; the vllm backend needs HF safetensors weights")
    tensors: dict[str, tuple[tuple[int, ...], str]] = {}
    for path in files:
        with safe_open(path, framework="pt") as handle:
            for name in handle.keys():
                view = handle.get_slice(name)
                code = view.get_dtype()
                if code not in _SAFETENSORS_DTYPES:
                    raise UserError(
                        f"{path}: tensor {name!r} has dtype {code}; the vllm backend takes {sorted(_SAFETENSORS_DTYPES)}"
                    )
                tensors[name] = (tuple(view.get_shape()), _SAFETENSORS_DTYPES[code])
    return tensors


def _checkpoint_dtype(model_dir: str) -> str | None:
    """The dtype the HF config declares (`dtype`, or `torch_dtype` in older files), if any."""
    with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as handle:
        config = json.load(handle)
    dtype = config.get("dtype") or config.get("torch_dtype")
    return str(dtype) if dtype else None


def prompt_seed(seed: int, prompt_index: int) -> int:
    """A per-prompt vLLM seed derived from the request's seed.

    vLLM seeds each prompt's sampler independently, so one seed for every prompt of a request
    would give all prompts the same random stream (identical samples wherever their
    distributions agree), correlating the completions of a GRPO batch.
    """
    state = np.random.SeedSequence([seed, prompt_index]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def numpy_to_torch(array: np.ndarray):
    """A zero-copy torch view of a numpy tensor (ml_dtypes bfloat16 through its bit pattern).

    The server's arrays are read-only views of the request body. torch warns when it wraps
    read-only memory, but the weight loader only copies out of these tensors, so the warning is
    silenced instead of paying for a second copy of the model.
    """
    import torch

    array = np.ascontiguousarray(array)
    bfloat16 = array.dtype.name == "bfloat16"
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        tensor = torch.from_numpy(array.view(np.uint16) if bfloat16 else array)
    return tensor.view(torch.bfloat16) if bfloat16 else tensor


class VLLMBackend:
    """A `RolloutBackend` over an in-process `vllm.LLM`.

    `engine_kwargs` go to `vllm.LLM` unchanged (e.g. `max_model_len`, `gpu_memory_utilization`,
    `enforce_eager`); `dtype` defaults to the dtype the checkpoint's config declares, so an fp32
    checkpoint runs in fp32 (vLLM's CPU default would be bfloat16) and the behaviour log-probs
    are those of the weights the trainer holds.

    Started with `enable_lora=True` (and `max_lora_rank`), it also takes adapter-only pushes
    (rollout/adapters.py) and serves them through vLLM's own LoRA support: each push is written
    as a PEFT adapter directory and becomes a new `LoRARequest` (a new adapter id, the previous
    one removed), which every generate call then uses until the next push.
    """

    # Full-length sequences' worth of tokens one request may ask for by default
    # (rollout/limits.py): vLLM's paged KV cache and scheduler bound its memory whatever the
    # request, and a trainer step's request is split into pieces this large, each still more
    # than the engine's default 256 running sequences, so its batch stays full.
    default_request_sequences = 1024

    def __init__(self, model_dir: str, **engine_kwargs: Any):
        if not os.path.isfile(os.path.join(model_dir, "config.json")):
            raise UserError(f"--model {model_dir!r}: no config.json; expected a Hugging Face model directory")
        self._checkpoint = checkpoint_tensors(model_dir)
        os.environ.setdefault(_IN_PROCESS, "0")
        if os.environ[_IN_PROCESS] != "0":
            raise UserError(
                f"environment {_IN_PROCESS}={os.environ[_IN_PROCESS]!r}: the vllm backend runs the engine in-process; unset it or set 0"
            )
        from vllm.platforms import current_platform

        if current_platform.is_cpu():
            for key, value in _CPU_ENV_DEFAULTS.items():
                os.environ.setdefault(key, value)
            # vLLM's compiled forward needs TorchDynamo; with it off, the model must run eagerly.
            engine_kwargs.setdefault("enforce_eager", os.environ["TORCHDYNAMO_DISABLE"] == "1")
        import vllm
        from vllm.exceptions import VLLMClientError

        self._vllm_client_error = VLLMClientError
        engine_kwargs.setdefault("dtype", _checkpoint_dtype(model_dir) or "auto")
        engine_kwargs.setdefault("seed", 0)
        self._vllm = vllm
        self._llm = vllm.LLM(model=model_dir, worker_extension_cls=WORKER_EXTENSION, **engine_kwargs)
        self.weight_layouts = (HF_LAYOUT, LORA_LAYOUT) if engine_kwargs.get("enable_lora") else (HF_LAYOUT,)
        self._max_lora_rank = int(self._llm.llm_engine.vllm_config.lora_config.max_lora_rank) if self.weight_layouts[1:] else 0
        self._model_dir = model_dir
        self._lora = None  # the LoRARequest every generate call uses (the last adapter push), or None
        self._lora_ids = itertools.count(1)
        self._adapter_dir: str | None = None
        model_config = self._llm.llm_engine.model_config
        self._dtype = str(model_config.dtype).removeprefix("torch.")
        self._info = {
            "backend": "vllm",
            "model": model_dir,
            "vllm_version": vllm.__version__,
            "dtype": self._dtype,
            "max_model_len": int(model_config.max_model_len),
            "max_prompt_len": int(model_config.max_model_len) - 1,
            "vocab_size": int(model_config.get_vocab_size()),
        }

    def info(self) -> dict:
        return dict(self._info)

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Token ids as the engine's own tokenizer gives them (special tokens as vLLM adds them)."""
        tokenizer = self._llm.get_tokenizer()
        return [list(tokenizer.encode(text)) for text in texts]

    def generate(self, prompt_token_ids: list[list[int]], params: SamplingParams) -> list[list[Completion]]:
        """`params.n` completions per prompt; log-probs are vLLM's raw ones (temperature 1, full vocabulary).

        Greedy requests (temperature 0) with n > 1, which vLLM refuses, are generated once per
        prompt and repeated n times: greedy completions of one prompt are identical anyway.
        A request vLLM refuses is a ProtocolError (HTTP 400) with vLLM's reason.
        """
        copies = params.n if params.temperature < _GREEDY_BELOW else 1
        prompts = [{"prompt_token_ids": list(ids)} for ids in prompt_token_ids]
        try:
            per_prompt = [self._sampling_params(params, params.n // copies, i) for i in range(len(prompts))]
            outputs = self._llm.generate(prompts, per_prompt, use_tqdm=False, lora_request=self._lora)
        except self._vllm_client_error as err:
            raise ProtocolError(f"vLLM refused the request: {err}") from None
        return [[_completion(out, params.logprobs) for out in request.outputs] * copies for request in outputs]

    def _sampling_params(self, params: SamplingParams, n: int, prompt_index: int):
        return self._vllm.SamplingParams(
            n=n,
            max_tokens=params.max_tokens,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k,
            stop=list(params.stop),
            stop_token_ids=list(params.stop_token_ids),
            ignore_eos=params.ignore_eos,
            seed=None if params.seed is None else prompt_seed(params.seed, prompt_index),
            logprobs=0 if params.logprobs else None,  # 0: the sampled token's log-prob only
        )

    def expected_weights(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """The checkpoint's tensor names and shapes, in the dtype the engine computes in.

        A push in the engine's dtype is loaded without a cast; for a bfloat16 engine that also
        halves the bytes sent. A tied `lm_head` has no tensor of its own, as in the checkpoint.
        """
        return {name: (shape, self._dtype) for name, (shape, _) in self._checkpoint.items()}

    def load_weights(self, named_tensors: Iterable[tuple[str, np.ndarray]]) -> None:
        """Load validated tensors into the running model, re-pack CPU GEMMs, forget cached prefixes.

        The caller (the server) has checked names, shapes and dtypes against `expected_weights`
        and holds the engine lock, so no generation sees a half-loaded model.
        """
        # A list of zero-copy views rather than a generator, so the argument stays picklable
        # for engines whose workers are other processes (tensor parallelism; not tested on CPU).
        tensors = [(name, numpy_to_torch(array)) for name, array in named_tensors]
        self._llm.collective_rpc("maxent_load_weights", kwargs={"named_tensors": tensors})
        self._drop_adapter()  # adapters of the replaced base mean nothing on the new one
        self.reset_prefix_cache()

    def load_adapter(self, tensors: dict[str, np.ndarray], spec: AdapterSpec) -> None:
        """Serve `spec`'s adapters (PEFT tensors, validated by the server) on the loaded base, as a new LoRA id.

        Written as a PEFT directory (what vLLM loads LoRA from) and added to the engine at once,
        so an adapter vLLM cannot take is refused by this push, not by the next generate call.
        """
        from safetensors.numpy import save_file

        if spec.rank > self._max_lora_rank:
            raise ProtocolError(f"query parameter rank={spec.rank}: this vLLM engine was started with max_lora_rank="
                                f"{self._max_lora_rank} (--engine-arg max_lora_rank=...)")
        from vllm.lora.request import LoRARequest

        lora_id = next(self._lora_ids)
        directory = tempfile.mkdtemp(prefix=f"maxent-adapter-{lora_id}-")
        save_file(dict(tensors), os.path.join(directory, "adapter_model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(directory, "adapter_config.json"), "w") as f:
            json.dump(spec.peft_config(self._model_dir), f)
        request = LoRARequest(f"maxent-adapter-{lora_id}", lora_id, directory)
        try:
            self._llm.llm_engine.add_lora(request)
        except Exception as err:  # vLLM's own refusal (e.g. a target module it cannot adapt)
            shutil.rmtree(directory, ignore_errors=True)
            raise ProtocolError(f"vLLM refused the adapter: {err}") from None
        self._drop_adapter()
        self._lora, self._adapter_dir = request, directory
        self.reset_prefix_cache()

    def _drop_adapter(self) -> None:
        if self._lora is not None:
            self._llm.llm_engine.remove_lora(self._lora.lora_int_id)
            shutil.rmtree(self._adapter_dir, ignore_errors=True)
        self._lora = self._adapter_dir = None

    def reset_prefix_cache(self) -> None:
        """Drop cached KV blocks: after a weight change they hold attention of the old weights."""
        if not self._llm.reset_prefix_cache():
            raise RuntimeError("vLLM refused to reset its prefix cache (requests still running)")


def _completion(output: Any, with_logprobs: bool) -> Completion:
    """One vLLM `CompletionOutput` as the contract's `Completion`."""
    if output.finish_reason not in ("stop", "length"):
        raise RuntimeError(f"vLLM ended a completion with finish_reason={output.finish_reason!r}")
    token_ids = [int(t) for t in output.token_ids]
    logprobs = [float(step[t].logprob) for t, step in zip(token_ids, output.logprobs)] if with_logprobs else []
    return Completion(token_ids=token_ids, logprobs=logprobs, text=output.text, finish_reason=output.finish_reason)
